"""SFT data layout and loss: prompt never noised nor scored, EOS padding scored, chats, resume, bad input."""

import json
import os

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer

from lightning_dlm.core import corrupt, get_schedule, maskable_positions
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.data.sft import SFTBatchStream, SFTEncoder, SFTSource, collate_sft, padded_length
from lightning_dlm.data.sft_datamodule import SFTDataModule
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.objectives.ar import causal_terms
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import TINY_TOKENIZER
from tests.test_diffusion import hand_training_nelbo
from tests.test_training import LossRecorder, StopAfter

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
RECORDS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(12)]


def tokenizer(chat=False):
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def make_module(seed=0):
    return DiffusionLM(backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig()),
                       diffusion=DiffusionConfig(anneal_steps=0), optim=OptimConfig(lr=3e-3, lr_schedule="constant"),
                       seed=seed, val_t_levels=2)


def encoded_batch(seq_len=40):
    enc = SFTEncoder(tokenizer(), seq_len)
    src = SFTSource(path="-")
    examples = [enc.encode(r, f"x:{i}", src) for i, r in enumerate(RECORDS[:3])]
    return examples, collate_sft(examples, enc.eos, seq_len)


def test_layout_prompt_protected_response_eos_and_padding_are_targets():
    examples, batch = encoded_batch()
    tok = tokenizer()
    first = examples[0]
    n_prompt = 1 + len(tok(RECORDS[0]["prompt"], add_special_tokens=False)["input_ids"])  # BOS + prompt
    n_resp = len(tok(RECORDS[0]["response"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert first.targets == [False] * n_prompt + [True] * n_resp
    assert batch["prompt_mask"][0].tolist() == [True] * n_prompt + [False] * (40 - n_prompt)
    assert batch["input_ids"][0, n_prompt + n_resp:].eq(tok.eos_token_id).all()  # EOS padding
    # at t = 1 every maskable position is masked: exactly the response, its EOS and the padding
    maskable = maskable_positions(batch["input_ids"].shape, True, None, protected=batch["prompt_mask"])
    assert torch.equal(maskable, ~batch["prompt_mask"])
    _, masked = corrupt(batch["input_ids"], torch.ones(3), 511, get_schedule("linear"), maskable)
    assert torch.equal(masked, ~batch["prompt_mask"])
    assert masked[0, n_prompt + n_resp:].all()  # padding after EOS is masked (and so scored)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_sft_training_step_is_the_hand_computed_nelbo_of_the_response():
    """The SFT loss of ``training_step`` is the NELBO computed by hand over the response tokens, their
    EOS and the EOS padding (all targets), divided by their number: the prompt is never scored, so
    the logits of the rows that would predict it cannot change the loss."""
    examples, batch = encoded_batch()
    batch = {**batch, "index": 3}
    padding = torch.zeros_like(batch["prompt_mask"])
    for b, example in enumerate(examples):
        padding[b, len(example.ids):] = True
    module = make_module(seed=4)
    module.configure_model()
    module.eval()
    loss = module.training_step(batch, 0)
    elbo, _, masked, scored, targets = hand_training_nelbo(module, batch, "linear", True)
    prompt = batch["prompt_mask"]
    assert targets == int((~prompt).sum()) and not (masked & prompt).any() and (masked & padding).any()
    assert loss.item() == pytest.approx(elbo, rel=1e-5)


def test_module_terms_never_score_prompt_positions():
    module = make_module()
    module.configure_model()
    net, objective = module.net, module.objective_impl
    _, batch = encoded_batch()
    x0, prompt = batch["input_ids"], batch["prompt_mask"]
    terms, masked, maskable = objective.diffusion_terms(net, x0, None, torch.ones(3), None,
                                                        torch.Generator().manual_seed(0), protected=prompt)
    assert not (masked & prompt).any() and torch.equal(maskable, ~prompt)
    assert int(terms.num_targets) == int((~prompt).sum()) and int(terms.num_scored) == int((~prompt).sum())
    # the training step's loss does not move when the prompt logits do: the scored rows skip them
    seen = {}
    original = net.scored_logits

    def spy(xt, sources, **kw):
        seen["sources"] = sources.clone()
        return original(xt, sources, **kw)

    net.scored_logits = spy
    objective.diffusion_terms(net, x0, None, torch.full((3,), 0.5), None, torch.Generator().manual_seed(0),
                              protected=prompt)
    prompt_rows = torch.zeros_like(prompt)
    prompt_rows[:, :-1] = prompt[:, 1:]
    assert not (seen["sources"] & prompt_rows).any()


def test_chat_scores_assistant_turns_only():
    tok = tokenizer(chat=True)
    enc = SFTEncoder(tok, 128)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Two plus two?"},
                {"role": "assistant", "content": "Four"}]
    example = enc.encode({"messages": messages}, "chat:1", SFTSource(path="-"))
    ids = torch.tensor(example.ids)
    targets = torch.tensor(example.targets)
    target_text = tok.decode(ids[targets])
    assert target_text == "Hello<|end|>Four<|end|>"
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    with pytest.raises(DLMError, match=r"chat:2: .*chat template"):
        SFTEncoder(tokenizer(), 128).encode({"messages": messages}, "chat:2", SFTSource(path="-"))


def test_padding_switch_and_too_long_switch(tmp_path):
    assert padded_length([5, 17], 64, "bucket", 8) == 24
    assert padded_length([5, 17], 64, "fixed", 8) == 64
    assert padded_length([70], 64, "bucket", 32) == 64
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3] + [{"prompt": "q", "response": "word " * 80}])
    cut, stats = SFTEncoder(tokenizer(), 32, too_long="cut").encode_all([SFTSource(path=path)])
    assert (len(cut), stats.cut, stats.refused) == (4, 1, 0) and len(cut[-1].ids) == 32
    kept, stats = SFTEncoder(tokenizer(), 32, too_long="refuse").encode_all([SFTSource(path=path)])
    assert (len(kept), stats.cut, stats.refused) == (3, 0, 1) and stats.refused_where == [f"{path}:4"]
    assert "1 refused" in stats.line()


def test_bad_records_name_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"prompt": "only a prompt"}])
    with pytest.raises(DLMError, match=r"bad.jsonl:2: the record has no 'response' field"):
        SFTEncoder(tokenizer(), 64).encode_all([SFTSource(path=path)])
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 80, "response": "x"}])
    with pytest.raises(DLMError, match=r"long.jsonl:1: the prompt is \d+ tokens.*seq_len 32"):
        SFTEncoder(tokenizer(), 32).encode_all([SFTSource(path=path)])
    path = write_jsonl(tmp_path / "broken.jsonl", [RECORDS[0], "{not json"])
    with pytest.raises(DLMError, match=r"broken.jsonl:2: not a JSON object"):
        SFTEncoder(tokenizer(), 64).encode_all([SFTSource(path=path)])
    with pytest.raises(DLMError, match="does not exist"):
        SFTEncoder(tokenizer(), 64).encode_all([SFTSource(path=str(tmp_path / "missing.jsonl"))])


def test_stream_batches_are_a_function_of_the_counter():
    examples, _ = encoded_batch()
    examples = examples * 3
    stream = SFTBatchStream(examples, 0, 40, 2, "bucket", 8, seed=3)
    later = SFTBatchStream(examples, 0, 40, 2, "bucket", 8, seed=3, start_batch=5)
    first = [b for _, b in zip(range(8), iter(stream))]
    resumed = next(iter(later))
    assert int(resumed["index"]) == 5 and torch.equal(resumed["input_ids"], first[5]["input_ids"])
    assert torch.equal(resumed["prompt_mask"], first[5]["prompt_mask"])
    ranks = [SFTBatchStream(examples, 0, 40, 2, seed=3, rank=r, world_size=2).batch(0)["input_ids"] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])


def test_sft_fit_resume_is_exact(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)

    def data():
        return SFTDataModule(train=[SFTSource(path=path)], val=[SFTSource(path=path)], tokenizer=TINY_TOKENIZER,
                             seq_len=48, batch_size=4, bucket_size=8, val_max_examples=4)

    def trainer(root, callbacks):
        return L.Trainer(default_root_dir=str(root), max_steps=5, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks, deterministic=True)

    full = LossRecorder()
    L.seed_everything(0)
    trainer(tmp_path / "full", [full]).fit(make_module(), data())
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    L.seed_everything(0)
    trainer(tmp_path / "a", [ckpt, StopAfter(2)]).fit(make_module(), data())
    resumed = LossRecorder()
    ck = os.path.join(tmp_path / "ck", os.listdir(tmp_path / "ck")[0])
    trainer(tmp_path / "b", [resumed]).fit(make_module(), data(), ckpt_path=ck)
    assert sorted(resumed.losses) == [2, 3, 4]
    for step in (2, 3, 4):
        assert resumed.losses[step] == full.losses[step], step
    module = make_module()
    result = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       default_root_dir=str(tmp_path)).validate(module, data(), verbose=False)[0]
    assert result["val/nelbo"] > 0


def test_dlm_sft_fit_with_lora_then_export(tmp_path, caplog):
    import logging

    import yaml

    from lightning_dlm.cli import main
    from lightning_dlm.model import DiffusionModel

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "limit_val_batches": 1, "val_check_interval": 3,
                    "check_val_every_n_epoch": None, "default_root_dir": str(tmp_path / "run"),
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1},
        "checkpoint": {"every_n_train_steps": 3},
        "model": {"val_t_levels": 2, "backbone": {"tokenizer": TINY_TOKENIZER, "config": dict(MODEL),
                                                   "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                  "optim": {"lr": 1e-3}},
        "data": {"train": [{"path": data}], "val": [{"path": data}], "seq_len": 48, "batch_size": 4,
                 "padding": "fixed", "too_long": "refuse"},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    caplog.set_level(logging.INFO)
    main(["sft", "fit", "--config", str(path)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert "sft data: 12 examples, 0 cut from the response side, 0 refused as too long" in caplog.text
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    model = DiffusionModel.from_pretrained(str(tmp_path / "export"))
    assert not any("lora" in name for name, _ in model.named_parameters())
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "test", "--config", str(path)])
    assert exit_info.value.code == 2


def test_experiment_configs_parse_with_the_sft_data_module():
    from lightning_dlm.training.cli import DLMCLI, lightning_kwargs
    from tests.conftest import REPO

    base = os.path.join(REPO, "experiments", "sft", "smollm2_arith.yaml")
    kwargs = {**lightning_kwargs(), "datamodule_class": SFTDataModule}
    cli = DLMCLI(args=["--config", base], run=False, **kwargs)
    assert isinstance(cli.datamodule, SFTDataModule) and cli.datamodule.template == "chat"
    assert cli.datamodule.tokenizer == "assets/smollm2-135m"  # linked from the model
    assert cli.model.diffusion_cfg.anneal_steps == 0 and cli.model.objective == "diffusion"
    ar = DLMCLI(args=["--config", base, "--config", base.replace(".yaml", "_ar.yaml")], run=False, **kwargs)
    assert ar.model.objective == "ar" and ar.trainer.default_root_dir.endswith("smollm2_arith_ar")


def test_ar_objective_scores_the_same_targets():
    module = DiffusionLM(backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig()),
                         objective="ar")
    _, batch = encoded_batch()
    module.configure_model()
    terms, targets = causal_terms(module.net, batch["input_ids"], None, protected=batch["prompt_mask"])
    assert torch.equal(targets, ~batch["prompt_mask"]) and int(terms.num_targets) == int((~batch["prompt_mask"]).sum())
