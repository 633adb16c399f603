"""`dlm export`: checkpoint (file or sharded folder) -> Hugging Face folder that plain transformers,
load_diffusion_lm and `dlm sample` load with the checkpoint's exact logits; bad input is refused."""

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_dlm.cli import main
from lightning_dlm.commands.export import export
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.format import EXPORT_CONFIG
from lightning_dlm.io.safe_read import is_diffusion_checkpoint
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.training.module import CHECKPOINT_KEY, DiffusionLM, load_diffusion_lm
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import REPO, TINY_GPT2, TINY_TOKENIZER
from tests.test_training import make_data, make_module, make_trainer

# GPT-2 with tied embeddings, a reused mask id and a non-default schedule: the other path of every switch
GPT2 = dict(TINY_GPT2, vocab_size=512)


def gpt2_module():
    return DiffusionLM(
        backbone=BackboneConfig(config=dict(GPT2), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="reuse", id=100)),
        diffusion=DiffusionConfig(schedule="polynomial", schedule_kwargs={"power": 2.0}, shift=True),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
    )


def fit_checkpoint(root, module):
    """A checkpoint written by a Trainer after 2 optimiser steps on the fixture corpus."""
    L.seed_everything(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ck", every_n_train_steps=2)
    make_trainer(root, 2, [ckpt]).fit(module, make_data())
    return Path(ckpt.best_model_path or root / "ck" / os.listdir(root / "ck")[0])


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    return fit_checkpoint(tmp_path_factory.mktemp("llama"), make_module())


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    return fit_checkpoint(tmp_path_factory.mktemp("gpt2"), gpt2_module())


@pytest.fixture(scope="module")
def llama_export(llama_ckpt, tmp_path_factory):
    return Path(export(str(llama_ckpt), str(tmp_path_factory.mktemp("exported") / "llama")))


IDS = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(0))


def ckpt_logits(path, ids=IDS):
    with torch.no_grad():
        return load_diffusion_lm(str(path))(ids)


def plain_logits(folder, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert not model.training
    with torch.no_grad():
        return model(ids).logits


def snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = (fh.read(), os.stat(path).st_mtime_ns)
    return out


# --- the round trip ----------------------------------------------------------------------------------
def test_export_round_trip_with_plain_transformers(llama_ckpt, llama_export):
    assert sorted(os.listdir(llama_export)) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", EXPORT_CONFIG]
    )
    assert not [n for n in os.listdir(llama_export.parent) if n.startswith(".")]  # no staging folder left
    expected = ckpt_logits(llama_ckpt)
    assert torch.equal(plain_logits(llama_export), expected)  # fp32: exactly the checkpoint's logits

    config = json.loads((llama_export / "config.json").read_text())
    assert config["is_causal"] is False and config["vocab_size"] == 513  # resized for the added mask token
    diff = json.loads((llama_export / EXPORT_CONFIG).read_text())
    raw = torch.load(llama_ckpt, weights_only=False)
    assert diff["mask_token_id"] == raw[CHECKPOINT_KEY]["mask_token_id"] == 512
    assert diff["mask_token"] == "<|mask|>" and diff["mask_token_added"] is True
    hp = raw["hyper_parameters"]["diffusion"]
    assert (diff["shift"], diff["schedule"], diff["schedule_kwargs"], diff["normalization"], diff["eps"]) == (
        hp["shift"], hp["schedule"], hp["schedule_kwargs"], hp["normalization"], hp["eps"])
    assert diff["tokens_seen"] == raw[CHECKPOINT_KEY]["tokens_seen"] == 2 * 4 * 32 and diff["global_step"] == 2
    assert diff["source_checkpoint"] == str(llama_ckpt) and diff["lightning_dlm_version"] == "0.1.0"
    tokenizer = AutoTokenizer.from_pretrained(str(llama_export))
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == diff["mask_token_id"]


def test_exported_model_attends_both_ways_in_plain_transformers(llama_export):
    model = AutoModelForCausalLM.from_pretrained(str(llama_export))
    assert model.config.is_causal is False
    changed = IDS.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    with torch.no_grad():
        a, b = model(IDS).logits, model(changed).logits
    # the first position sees the last token: a causal model's first logits could not change
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


def test_load_diffusion_lm_takes_the_exported_folder(llama_ckpt, llama_export):
    original = load_diffusion_lm(str(llama_ckpt))
    loaded = load_diffusion_lm(str(llama_export))
    assert not loaded.training and not loaded.net.model.training
    assert loaded.mask_token_id == 512 and loaded.net.mask_token_added is True
    assert loaded.diffusion_cfg == original.diffusion_cfg and loaded.tokens_seen == original.tokens_seen
    assert loaded.tokenizer.mask_token_id == 512 and len(loaded.tokenizer) == len(original.tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), original(IDS))
        x0 = IDS[:2, :16]
        assert torch.equal(loaded.nelbo_per_token(x0)[0], original.nelbo_per_token(x0)[0])
    assert is_diffusion_checkpoint(str(llama_export)) and is_diffusion_checkpoint(str(llama_ckpt))


def test_gpt2_reused_mask_and_bfloat16_export(gpt2_ckpt, tmp_path):
    out = Path(export(str(gpt2_ckpt), str(tmp_path / "fp32")))
    assert torch.equal(plain_logits(out), ckpt_logits(gpt2_ckpt))
    diff = json.loads((out / EXPORT_CONFIG).read_text())
    assert diff["mask_token_id"] == 100 and diff["mask_token_added"] is False
    assert diff["schedule"] == "polynomial" and diff["schedule_kwargs"] == {"power": 2.0}
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.mask_token_id == 100 and len(tokenizer) == 512  # the reused id is named, nothing added
    assert load_diffusion_lm(str(out)).schedule.alpha(torch.tensor(0.5)) == pytest.approx(0.75)

    half = Path(export(str(gpt2_ckpt), str(tmp_path / "bf16"), dtype="bfloat16"))
    with safe_open(str(half / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in fh.keys()  # tied to the input embeddings, stored once
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_diffusion_lm(str(half))
    assert loaded.net.model.dtype == torch.bfloat16
    reference = load_diffusion_lm(str(gpt2_ckpt)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), reference(IDS))


# --- prefixes and shards -----------------------------------------------------------------------------
def test_compile_and_wrapper_prefixes_are_stripped(llama_ckpt, tmp_path):
    raw = torch.load(llama_ckpt, weights_only=False)
    wrapped = {}
    for i, (key, value) in enumerate(raw["state_dict"].items()):
        # torch.compile of the whole module or of the backbone, DDP, Fabric, activation checkpointing
        forms = [f"_orig_mod.{key}", key.replace("net.", "net._orig_mod.", 1), f"module.{key}",
                 "_forward_module.module." + re.sub(r"(layers\.\d+)\.", r"\1._checkpoint_wrapped_module.", key)]
        wrapped[forms[i % len(forms)]] = value
    assert len(wrapped) == len(raw["state_dict"]) and not set(wrapped) & set(raw["state_dict"])
    raw["state_dict"] = wrapped
    torch.save(raw, tmp_path / "wrapped.ckpt")
    out = export(str(tmp_path / "wrapped.ckpt"), str(tmp_path / "out"))
    assert torch.equal(plain_logits(out), ckpt_logits(llama_ckpt))
    assert torch.equal(ckpt_logits(tmp_path / "wrapped.ckpt"), ckpt_logits(llama_ckpt))


def write_sharded(ckpt_path, folder, one_file_per_tensor=False):
    """Lightning's FSDP `state_dict_type: sharded` layout, written from one process: the model (and
    optimizer) through torch.distributed.checkpoint, everything else in meta.pt. The keys carry FSDP's
    and activation checkpointing's wrapper names."""
    from lightning.fabric.strategies.fsdp import _METADATA_FILENAME, _distributed_checkpoint_save
    from torch.distributed.checkpoint import FileSystemWriter, save

    checkpoint = torch.load(ckpt_path, weights_only=False)
    model = {key.replace("layers.", "_fsdp_wrapped_module.layers.").replace(".self_attn", "._checkpoint_wrapped_module.self_attn"): v
             for key, v in checkpoint.pop("state_dict").items()}
    state = {"model": model, **{f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states"))}}
    if one_file_per_tensor:
        save(state, storage_writer=FileSystemWriter(folder, single_file_per_rank=False), no_dist=True)
    else:
        _distributed_checkpoint_save(state, Path(folder))  # what FSDPStrategy.save_checkpoint calls
    torch.save(checkpoint, Path(folder) / _METADATA_FILENAME)
    return folder


def test_sharded_checkpoint_is_consolidated(llama_ckpt, tmp_path):
    sharded = write_sharded(llama_ckpt, tmp_path / "sharded")
    assert sorted(os.listdir(sharded)) == [".metadata", "__0_0.distcp", "meta.pt"]
    assert is_diffusion_checkpoint(str(sharded))
    out = export(str(sharded), str(tmp_path / "out"))
    expected = ckpt_logits(llama_ckpt)
    assert torch.equal(plain_logits(out), expected)
    assert torch.equal(ckpt_logits(sharded), expected)  # load_diffusion_lm takes the folder as well
    assert json.loads((Path(out) / EXPORT_CONFIG).read_text())["mask_token_id"] == 512


def test_sharded_checkpoint_with_missing_parts_is_refused(llama_ckpt, tmp_path):
    sharded = write_sharded(llama_ckpt, tmp_path / "sharded", one_file_per_tensor=True)
    shards = sorted(n for n in os.listdir(sharded) if n.endswith(".distcp"))
    assert len(shards) > 10
    os.remove(sharded / shards[3])
    with pytest.raises(DLMError, match=f"missing 1 of its {len(shards)} shard files \\({shards[3]}\\)"):
        export(str(sharded), str(tmp_path / "out"))
    with pytest.raises(DLMError, match=shards[3]):
        load_diffusion_lm(str(sharded))
    with open(sharded / shards[4], "r+b") as fh:
        fh.truncate(2)
    with pytest.raises(DLMError, match="missing 1 of"):  # the missing file is named first
        export(str(sharded), str(tmp_path / "out"))
    os.remove(sharded / ".metadata")
    with pytest.raises(DLMError, match=r"missing \.metadata"):
        export(str(sharded), str(tmp_path / "out"))
    other = write_sharded(llama_ckpt, tmp_path / "other")
    with open(other / "__0_0.distcp", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DLMError, match=r"truncated \(__0_0.distcp\)"):
        export(str(other), str(tmp_path / "out"))
    os.remove(other / "meta.pt")
    with pytest.raises(DLMError, match=r"missing meta\.pt"):
        export(str(other), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def _save_rank(rank, world, store, ckpt_path, folder):
    """One rank of a 2-rank run: every tensor sharded along dim 0 (as FSDP shards), saved with
    torch.distributed.checkpoint as Lightning's FSDPStrategy does."""
    import torch.distributed as dist
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        checkpoint = torch.load(ckpt_path, weights_only=False)
        mesh = init_device_mesh("cpu", (world,))
        model = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in checkpoint.pop("state_dict").items()}
        _distributed_checkpoint_save({"model": model}, Path(folder))
        if rank == 0:
            checkpoint.pop("optimizer_states")
            torch.save(checkpoint, Path(folder) / "meta.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_sharded_checkpoint_is_consolidated(llama_ckpt, tmp_path):
    # fork: the workers reuse this process's imports (a spawned worker would spend seconds importing)
    context = mp.start_processes(_save_rank, args=(2, str(tmp_path / "store"), str(llama_ckpt), str(tmp_path / "sharded")),
                                 nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank save did not finish in 120 s")
    assert sorted(os.listdir(tmp_path / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    out = export(str(tmp_path / "sharded"), str(tmp_path / "out"))
    assert torch.equal(plain_logits(out), ckpt_logits(llama_ckpt))


# --- refusals ----------------------------------------------------------------------------------------
def test_non_empty_out_folder_is_refused_and_left_untouched(llama_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    with pytest.raises(DLMError, match="is not empty"):
        export(str(llama_ckpt), str(out))
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DLMError, match="is a file"):
        export(str(llama_ckpt), str(tmp_path / "file"))
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is a fine destination
    assert torch.equal(plain_logits(export(str(llama_ckpt), str(empty))), ckpt_logits(llama_ckpt))


def test_a_failed_export_leaves_nothing(llama_ckpt, tmp_path, monkeypatch):
    import lightning_dlm.io.export as export_module

    def fail(folder, mask_id):
        assert os.path.isfile(os.path.join(folder, "model.safetensors"))  # failing after the weights were written
        raise DLMError("injected failure")

    monkeypatch.setattr(export_module, "_check_saved_tokenizer", fail)
    with pytest.raises(DLMError, match="injected failure"):
        export(str(llama_ckpt), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_bad_sources_are_refused(llama_export, tmp_path):
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(str(llama_export)).save_pretrained(plain)
    with pytest.raises(DLMError, match=r"is not a diffusion model .*diffusion_config\.json.*for an AR model use"):
        load_diffusion_lm(str(plain))
    with pytest.raises(DLMError, match="is not a diffusion model"):
        export(str(plain), str(tmp_path / "out"))
    with pytest.raises(DLMError, match="written by `dlm export`, not a training checkpoint"):
        export(str(llama_export), str(tmp_path / "out"))
    with pytest.raises(DLMError, match="does not exist"):
        export(str(tmp_path / "none.ckpt"), str(tmp_path / "out"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DLMError, match="not a lightning_dlm diffusion checkpoint"):
        export(str(foreign), str(tmp_path / "out"))
    assert not is_diffusion_checkpoint(str(plain)) and not is_diffusion_checkpoint(str(foreign))
    assert not is_diffusion_checkpoint(str(tmp_path / "none.ckpt")) and not is_diffusion_checkpoint(str(tmp_path))
    assert not os.path.exists(tmp_path / "out")


# --- the command ---------------------------------------------------------------------------------------
def test_cli_export_then_sample_from_the_folder(llama_ckpt, tmp_path, capsys):
    main(["export", "--ckpt", str(llama_ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "[dlm export] reading" in err and "[dlm export] exported to" in err
    args = ["--prompt", "[Once upon a time, The dog]", "--length", "6", "--steps", "6", "--seed", "3", "--format", "jsonl"]
    main(["sample", "--ckpt", str(tmp_path / "out"), *args])
    from_folder = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    main(["sample", "--ckpt", str(llama_ckpt), *args])
    from_ckpt = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in from_folder] == ["Once upon a time", "The dog"]
    assert all(len(row["token_ids"]) == 6 and 512 not in row["token_ids"] for row in from_folder)
    assert [r["token_ids"] for r in from_folder] == [r["token_ids"] for r in from_ckpt]  # same model, same samples


def test_cli_errors_exit_with_code_2(llama_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    for args, message in [
        (["--ckpt", str(llama_ckpt), "--out", str(out)], "is not empty"),
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "new")], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(llama_ckpt), "--out", str(tmp_path / "new"), "--dtype", "float8"])
    assert exit_info.value.code == 2
    assert (out / "x").read_text() == "x" and not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_module_entry_point_exports(llama_ckpt, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_dlm", "export", "--ckpt", str(llama_ckpt), "--out",
                             str(tmp_path / "out"), "--dtype", "float32"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "[dlm export] exported to" in result.stderr and result.stdout == ""
    assert torch.equal(plain_logits(tmp_path / "out"), ckpt_logits(llama_ckpt))


def test_every_entry_point_loads_the_same_diffusion_model(llama_ckpt, llama_export, tmp_path):
    """The same trained weights through each source DiffusionModel.from_pretrained takes: the
    .ckpt, a sharded folder, the exported folder, and a folder written by save_pretrained (and a
    DiffusionLM around it): identical logits, mask token, diffusion config and tokenizer."""
    from lightning_dlm import DiffusionModel
    from lightning_dlm.training.module import DiffusionLM

    sharded = write_sharded(llama_ckpt, tmp_path / "sharded")
    models = {name: DiffusionModel.from_pretrained(str(path))
              for name, path in [("ckpt", llama_ckpt), ("sharded", sharded), ("export", llama_export)]}
    models["saved"] = DiffusionModel.from_pretrained(models["ckpt"].save_pretrained(str(tmp_path / "saved")))
    reference = models["ckpt"]
    with torch.no_grad():
        expected = reference(IDS)
        for name, model in models.items():
            assert not model.training and model.mask_token_id == reference.mask_token_id, name
            assert model.diffusion == reference.diffusion and model.tokenizer.mask_token_id == reference.mask_token_id
            assert torch.equal(model(IDS), expected), name
        assert torch.equal(DiffusionLM.from_model(models["export"])(IDS), expected)
    assert reference.info["global_step"] == models["export"].info["global_step"] > 0


def test_exported_files_are_readable_like_their_siblings(llama_export):
    # safetensors writes its file 0600 through a temporary file; every file of the export gets the umask's mode
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(llama_export, name)).st_mode) for name in os.listdir(llama_export)}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
