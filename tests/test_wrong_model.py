"""No silent wrong model: a pretrained folder and a config block that disagree are refused in one
line, and a load that leaves weights missing or unused is an error unless allowed."""

import pytest
import torch
import transformers

from lightning_dlm.cli import main
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, load_causal_lm
from tests.conftest import REPO, TINY_TOKENIZER

DEBUG = f"{REPO}/experiments/debug.yaml"

GPT2 = dict(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
LLAMA = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)


@pytest.fixture
def gpt2_folder(tmp_path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(tmp_path / "gpt2")
    return str(tmp_path / "gpt2")


def test_the_debug_config_with_a_gpt2_folder_is_refused_in_one_line(gpt2_folder, tmp_path, capsys):
    # the obvious one-liner: the config's llama block must not silently win over the pretrained folder
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEBUG, "--model.backbone.pretrained", gpt2_folder,
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and "Traceback" not in "\n".join(err), err
    assert errors[0].startswith("error: model.backbone.pretrained") and "is a gpt2 model" in errors[0]
    assert "model_type llama" in errors[0] and "--model.backbone.config null" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_shape_override_on_a_pretrained_model_is_refused(gpt2_folder):
    with pytest.raises(DLMError, match=r"sets n_embd: 64 but the pretrained model .* has n_embd: 32"):
        load_causal_lm(BackboneConfig(pretrained=gpt2_folder, config={"n_embd": 64}))


def test_option_overrides_still_apply(gpt2_folder):
    model = load_causal_lm(BackboneConfig(pretrained=gpt2_folder, config={"model_type": "gpt2", "resid_pdrop": 0.0}))
    assert model.config.resid_pdrop == 0.0 and model.config.n_embd == 32


def test_missing_weights_are_an_error_unless_allowed(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.1.mlp")}
    model.save_pretrained(tmp_path / "cut", state_dict=state)
    with pytest.raises(DLMError, match=r"left weights unloaded or unused: model\.layers\.1\.mlp\..* \(missing\)"):
        load_causal_lm(BackboneConfig(pretrained=str(tmp_path / "cut")))
    loaded = load_causal_lm(BackboneConfig(pretrained=str(tmp_path / "cut"), allow_missing=["model.layers.1.mlp.*"]))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_a_complete_pretrained_folder_loads_its_weights_exactly(gpt2_folder):
    reference = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder)
    loaded = load_causal_lm(BackboneConfig(pretrained=gpt2_folder, tokenizer=TINY_TOKENIZER))
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
