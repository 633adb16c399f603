"""The micro world's tools: the AR model exported as a plain causal LM (the "pretrained model"
every later step loads), grids repeated over seeds, and the seed statistics of the results."""

import json
import math
import os
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_dlm.commands.export import export
from lightning_dlm.core.annealing import causal_allowed
from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.format import EXPORT_CONFIG
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.research.compare import RunSummary
from lightning_dlm.research.seeds import by_seed, curve_of, mean_se, tokens_to_reach
from lightning_dlm.research.sweep import load_grid, split_seed
from lightning_dlm.training.module import load_diffusion_lm
from tests.conftest import REPO
from tests.test_export import fit_checkpoint
from tests.test_training import make_module

MICRO = os.path.join(REPO, "experiments", "micro")


# --- the AR model as a plain causal LM folder ---------------------------------------------------------
@pytest.fixture(scope="module")
def ar_ckpt(tmp_path_factory):
    return fit_checkpoint(tmp_path_factory.mktemp("ar"), make_module(objective="ar"))


def test_an_ar_run_exports_as_a_plain_causal_lm_with_its_logits(ar_ckpt, tmp_path):
    out = Path(export(str(ar_ckpt), str(tmp_path / "ar"), causal_lm=True))
    assert not (out / EXPORT_CONFIG).exists()  # no diffusion record: an ordinary pretrained model
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert hf.config.is_causal is True
    ids = torch.randint(2, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits
        net = load_diffusion_lm(str(ar_ckpt)).net
        ours = net(ids, allowed=causal_allowed(ids.shape[1], ids.device))  # the forward the AR objective trains
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # causal: the logits at position 5 do not depend on later tokens
    changed = ids.clone()
    changed[:, 10:] = 3
    with torch.no_grad():
        assert torch.equal(hf(changed).logits[:, :10], theirs[:, :10])
    # and it is what model.backbone.pretrained adapts
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    cfg = BackboneConfig(pretrained=str(out), mask_token=MaskTokenConfig(mode="reuse", token=tokenizer.mask_token))
    model = DiffusionModel.from_config(cfg, tokenizer)
    assert model.config.is_causal is False and model.mask_token_id == tokenizer.mask_token_id
    torch.testing.assert_close(model.model.get_input_embeddings().weight, hf.get_input_embeddings().weight)


def test_a_diffusion_run_is_not_exported_as_a_causal_lm(tmp_path):
    ckpt = fit_checkpoint(tmp_path / "fit", make_module())
    with pytest.raises(DLMError, match="not ar: export it without --causal_lm"):
        export(str(ckpt), str(tmp_path / "out"), causal_lm=True)
    assert not (tmp_path / "out").exists()


# --- grids repeated over seeds --------------------------------------------------------------------------
def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_seeds_repeat_every_arm_seed_by_seed(tmp_path):
    grid = write(tmp_path / "g.yaml", {"seeds": [0, 7], "common": {"trainer.max_steps": 5},
                                        "arms": [{"name": "full"}, {"name": "no_shift", "model.diffusion.shift": False}]})
    arms = load_grid(grid)
    assert [a.name for a in arms] == ["full.seed0", "no_shift.seed0", "full.seed7", "no_shift.seed7"]
    assert arms[3].overrides == {"trainer.max_steps": 5, "model.diffusion.shift": False,
                                 "seed_everything": 7, "model.seed": 7, "data.seed": 7}
    assert split_seed("no_shift.seed7") == ("no_shift", 7) and split_seed("lr=1e-3") == ("lr=1e-3", None)


@pytest.mark.parametrize("grid, message", [
    ({"seeds": [], "arms": [{"name": "a"}]}, "seeds must be a non-empty list of integers"),
    ({"seeds": [1, 1], "arms": [{"name": "a"}]}, "lists a seed twice"),
    ({"seeds": "0,1", "arms": [{"name": "a"}]}, "seeds must be a non-empty list"),
    ({"seeds": [0], "arms": [{"name": "a", "model.seed": 3}]}, "arm 'a' sets model.seed while the grid repeats"),
])
def test_bad_seed_grids_are_one_line(tmp_path, grid, message):
    with pytest.raises(DLMError, match=message):
        load_grid(write(tmp_path / "g.yaml", grid))


def test_the_micro_grids_resolve_to_three_seeds_each():
    for name in ("ablation", "scratch", "schedules", "block"):
        arms = load_grid(os.path.join(MICRO, f"{name}.yaml"))
        seeds = {split_seed(a.name)[1] for a in arms}
        assert seeds == {0, 1, 2}, name


# --- seed statistics --------------------------------------------------------------------------------------
def row(arm, nelbo, evals=None, tokens=1000.0):
    return RunSummary(arm, nelbo, 0.01, math.exp(nelbo), tokens, 10, 60.0, f"runs/{arm}", evals=evals or {})


def test_by_seed_means_and_standard_errors_over_the_seeds():
    rows = [row("full.seed0", 5.0, {"mc acc": (0.30, 0.02)}), row("full.seed1", 5.2, {"mc acc": (0.34, 0.02)}),
            row("full.seed2", 5.6, {"mc acc": (0.35, 0.02)}), row("ar", 4.0)]
    full, ar = by_seed(rows)
    assert full.arm == "full" and full.seeds == [0, 1, 2]
    assert full.val_nelbo == pytest.approx(5.2666666666666)
    assert full.val_nelbo_se == pytest.approx(statistics.stdev([5.0, 5.2, 5.6]) / math.sqrt(3))
    assert full.ppl_bound == pytest.approx(math.exp(full.val_nelbo))
    value, se = full.evals["mc acc"]
    assert value == pytest.approx(0.33) and se == pytest.approx(statistics.stdev([0.30, 0.34, 0.35]) / math.sqrt(3))
    assert ar.seeds == [] and ar.val_nelbo == 4.0 and ar.val_nelbo_se == 0.01  # one run: its own se
    assert mean_se([1.0]) == (1.0, None) and mean_se([]) == (None, None)


def point(steps, tokens, nelbo):
    return SimpleNamespace(steps=steps, tokens=tokens, nelbo=nelbo)


def test_curves_align_seeds_by_step_and_tokens_to_reach_interpolates():
    curve = curve_of([[point(50, 100.0, 6.0), point(100, 200.0, 5.0)],
                      [point(50, 100.0, 6.4), point(100, 200.0, 5.4)]])
    assert [(p.steps, p.tokens, p.n) for p in curve] == [(50, 100.0, 2), (100, 200.0, 2)]
    assert curve[0].nelbo == pytest.approx(6.2) and curve[0].se == pytest.approx(0.2)
    assert tokens_to_reach(curve, 5.7) == pytest.approx(150.0)  # halfway between 6.2 and 5.2
    assert tokens_to_reach(curve, 6.5) == 100.0  # reached at the first validation
    assert tokens_to_reach(curve, 5.0) is None  # never


def test_the_micro_configs_name_files_the_repository_has():
    pretrain = yaml.safe_load(open(os.path.join(MICRO, "pretrain.yaml")))
    assert pretrain["model"]["objective"] == "ar"
    assert os.path.isfile(os.path.join(REPO, pretrain["model"]["backbone"]["tokenizer"], "tokenizer.json"))
    tok = json.load(open(os.path.join(MICRO, "tokenizer", "tokenizer.json")))
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert specials == {"<|endoftext|>": 0, "<|mask|>": 1}
    assert len(tok["model"]["vocab"]) == pretrain["model"]["backbone"]["config"]["vocab_size"]


# --- the demo's arc: an AR model, adapted two ways, beside it ---------------------------------------------
def test_the_demo_shows_the_ar_model_beside_both_adapted_models(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_dlm.cli import main
    from lightning_dlm.evaluation.evaluators import load_evaluator
    from tests.conftest import TINY_TOKENIZER

    torch.manual_seed(0)
    folder = tmp_path / "ar_model"  # a plain causal LM folder, as experiments/micro/model is
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(folder)
    base = yaml.safe_load(open(os.path.join(REPO, "experiments", "debug.yaml")))
    base["model"]["backbone"] = {"pretrained": str(folder), "mask_token": {"mode": "add"}}
    base["trainer"].update(default_root_dir=str(tmp_path / "full"), max_steps=4, val_check_interval=4,
                           limit_val_batches=2)
    base["checkpoint"] = {"every_n_train_steps": 4}
    base["model"]["diffusion"]["anneal_steps"] = 2
    block = json.loads(json.dumps(base))
    block["trainer"]["default_root_dir"] = str(tmp_path / "block")
    block["model"]["diffusion"] = {"attention": "block", "block_size": 4, "block_t": "block"}
    config, block_config = write(tmp_path / "full.yaml", base), write(tmp_path / "block.yaml", block)
    main(["demo", "--config", config, "--block_config", block_config, "--length", "8", "--steps", "8",
          "--speed_length", "12", "--prompt", "Once upon a time", "--prompts", '["The end"]'])
    out = capsys.readouterr().out
    for line in ("AR model, exact NLL", "val/nelbo after adaptation", "block model, val/nelbo",
                 "decoding 12 tokens, batch 1 : AR generate", "samples of the AR model (its own generate)",
                 "samples of the block diffusion LM", "--- diffusion LM (full recipe)\nOnce upon a time\u27e6",
                 "Prompt 2: 8 tokens each"):
        assert line in out, line
    # the AR line is the AR model's exact NLL over the validation targets: as its own evaluator computes it
    nll = float(re.search(r"AR model, exact NLL\s+:\s+([0-9.]+)", out).group(1))
    after = float(re.search(r"after adaptation\s+:\s+([0-9.]+)", out).group(1))
    ratio = float(re.search(r"([0-9.]+)x the AR perplexity", out).group(1))
    assert ratio == pytest.approx(math.exp(after) / math.exp(nll), rel=2e-2)
    assert load_evaluator(str(folder), kind="ar").kind == "ar"
    assert os.path.isfile(tmp_path / "block" / "checkpoints" / "last.ckpt")


def write_logs(folder, points):
    """TensorBoard logs of a run: ``(steps, tokens, nelbo)`` validations, as the training writes them."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(folder), name="", version=0)
    for steps, tokens, nelbo in points:
        logger.log_metrics({"val/nelbo": nelbo, "val/nelbo_se": 0.01, "val/tokens_seen": tokens}, step=steps - 1)
    logger.finalize("success")
    return str(folder)


def test_compare_by_seed_merges_seeds_and_reads_tokens_to_reach(tmp_path, capsys):
    from lightning_dlm.cli import main

    for seed, (a, b) in enumerate([(6.0, 5.0), (6.4, 5.4), (6.2, 5.2)]):
        write_logs(tmp_path / f"full.seed{seed}", [(50, 1000.0, a), (100, 2000.0, b)])
    for seed, (a, b, c) in enumerate([(7.0, 6.0, 5.0), (7.0, 6.2, 5.1)]):
        write_logs(tmp_path / f"scratch.seed{seed}", [(50, 1000.0, a), (100, 2000.0, b), (200, 4000.0, c)])
    write_logs(tmp_path / "slow.seed0", [(50, 1000.0, 7.5), (100, 2000.0, 6.5)])
    main(["compare", str(tmp_path / "*"), "--by_seed", "true", "--reach", "full", "--out", str(tmp_path / "cmp")])
    lines = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "| full | 3 | 5.2000 ± 0.1155 |" in lines["full"]  # sd 0.2 over 3 seeds
    # full's final mean is 5.2: each scratch seed reaches it between its 2000- and 4000-token validations
    seed0 = 2000 + (6.0 - 5.2) / (6.0 - 5.0) * 2000
    seed1 = 2000 + (6.2 - 5.2) / (6.2 - 5.1) * 2000
    assert f"{(seed0 + seed1) / 2:,.0f} ± {abs(seed0 - seed1) / 2:,.0f} |" in lines["scratch"]
    assert lines["slow"].endswith("| not reached (1 seed) |")
    # full's own seeds: seed 0 passes 5.2 at 1800 tokens, seed 2 ends on it at 2000, seed 1 (5.4) never
    assert lines["full"].endswith("| 1,900 ± 100 (2 of 3 seeds reached it) |")
    assert os.path.isfile(tmp_path / "cmp" / "val_nelbo_seeds.png") and os.path.isfile(tmp_path / "cmp" / "compare_seeds.md")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path / "full.seed0"), "--by_seed", "true", "--reach", "nothing"])
    assert exit_info.value.code == 2 and "--reach 'nothing' is not an arm" in capsys.readouterr().err


def test_the_micro_model_loads_as_a_plain_causal_lm_not_as_a_release():
    """Its tokenizer names a reserved mask token, as DiffuLLaMA's does; it is still a plain LLaMA
    that adaptation starts from (causal, no release conventions), not a released diffusion LM."""
    import lightning_dlm.io.releases  # noqa: F401 - registers every release loader
    from lightning_dlm.io.releases.base import RELEASES, release_of

    folder = os.path.join(MICRO, "model")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["is_causal"] is True and not os.path.exists(os.path.join(folder, EXPORT_CONFIG))
    assert len(RELEASES) >= 7 and release_of(folder) is None
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) <= 10 * 2**20


# --- the micro tokenizer and the shipped model's checksums ------------------------------------------------
def run_tokenizer(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, os.path.join(REPO, "data", "make_micro_tokenizer.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_the_tokenizer_trainer_round_trips_text(tmp_path):
    corpus = tmp_path / "plays"
    corpus.mkdir()
    text = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\nAy me!\n" * 50
    (corpus / "a.txt").write_text(text)
    (corpus / "b.txt").write_text("HAMLET.\nTo be, or not to be, that is the question.\n" * 50)
    proc = run_tokenizer("--text", str(corpus), "--out", str(tmp_path / "tok"), "--vocab", "320")
    assert proc.returncode == 0, proc.stderr
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (tok.eos_token_id, tok.bos_token_id, tok.mask_token_id, len(tok)) == (0, 0, 1, 320)
    for sample in (text[:200], "Unseen wörds, ☃ and\ttabs\n\n"):
        ids = tok(sample, add_special_tokens=False)["input_ids"]
        assert 1 not in ids and tok.decode(ids) == sample  # byte-level: every text round-trips, no mask in it
    again = run_tokenizer("--text", str(corpus), "--out", str(tmp_path / "tok"), "--vocab", "320")
    assert again.returncode != 0 and "holds a tokenizer already" in again.stderr  # nothing overwritten


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, ["--vocab", "320"], "no .txt files at"),
    (lambda d: (d / "empty.txt").write_text("  \n\n"), ["--vocab", "320"], "is empty"),
    (lambda d: (d / "a.txt").write_text("words " * 100), ["--vocab", "100"], "--vocab 100 is too small"),
])
def test_bad_tokenizer_input_is_one_line_and_writes_nothing(tmp_path, make, args, message):
    corpus = tmp_path / "plays"
    corpus.mkdir()
    make(corpus)
    proc = run_tokenizer("--text", str(corpus), "--out", str(tmp_path / "tok"), *args)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tok").exists()


def test_the_shipped_micro_model_matches_its_checksums_and_an_altered_copy_is_refused(tmp_path):
    import shutil

    from lightning_dlm.io.checksums import verify_folder
    from lightning_dlm.model.loading import resolve_hf_config

    shipped = os.path.join(MICRO, "model")
    assert verify_folder(shipped) == shipped + ".sha256"  # the committed folder is intact
    copy = tmp_path / "model"
    shutil.copytree(shipped, copy)
    shutil.copy(shipped + ".sha256", str(copy) + ".sha256")
    resolve_hf_config(BackboneConfig(pretrained=str(copy)))  # intact: loads
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DLMError, match="model.safetensors' differs from its checksum"):
        resolve_hf_config(BackboneConfig(pretrained=str(copy)))
    (copy / "model.safetensors").unlink()
    with pytest.raises(DLMError, match="lacks model.safetensors"):
        resolve_hf_config(BackboneConfig(pretrained=str(copy)))
    shutil.rmtree(copy)
    with pytest.raises(DLMError, match="is missing .*make micro-model`$"):
        resolve_hf_config(BackboneConfig(pretrained=str(copy)))


def test_the_shipped_block_model_is_intact_and_an_altered_copy_does_not_load(tmp_path):
    """The micro world's block-diffusion LM (block16.seed0, exported in bf16 for the GPU suite's
    decoding-quality rows): checked against its checksums by DiffusionModel.from_pretrained."""
    import shutil

    from lightning_dlm.io.checksums import verify_folder
    from lightning_dlm.model import DiffusionModel

    shipped = os.path.join(MICRO, "block_model")
    assert verify_folder(shipped) == shipped + ".sha256"
    net = DiffusionModel.from_pretrained(shipped)
    assert net.diffusion.attention == "block" and net.diffusion.block_size == 16 and net.shift
    assert net.mask_token_id == 1 and not net.mask_token_added and net.info["tokens_seen"] == 409600
    copy = tmp_path / "block_model"
    shutil.copytree(shipped, copy)
    shutil.copy(shipped + ".sha256", str(copy) + ".sha256")
    (copy / "diffusion_config.json").write_text((copy / "diffusion_config.json").read_text().replace('"shift": true',
                                                                                                   '"shift": false'))
    with pytest.raises(DLMError, match=r"diffusion_config.json' differs from its checksum .*"
                                       r"`make micro-block-model`$"):
        DiffusionModel.from_pretrained(str(copy))


def test_a_seq_len_beyond_the_micro_models_positions_is_one_line(tmp_path, capsys):
    from lightning_dlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        corpus = os.path.join(REPO, "data", "fixtures", "tiny_corpus.txt")  # the test needs no assets/
        main(["fit", "--config", os.path.join(MICRO, "adapt.yaml"), "--data.seq_len", "1024",
              "--data.train", json.dumps([{"path": corpus}]), "--data.val", json.dumps([{"path": corpus}]),
              "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1, err
    assert "data.seq_len 1024 is above the model's position limit 512" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
