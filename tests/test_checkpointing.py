"""Step checkpoints keep what a resume needs, and nothing twice (lightning_dlm.training.callbacks.StepCheckpoint).

* ``last.ckpt`` holds the full state (optimizer, lr schedule, callbacks); the step files hold the
  weights only, are about a third of its size, and load for inference like any checkpoint.
* ``checkpoint.keep_last_k`` keeps the k most recent step files, across a resume too.
* Resuming from a weights-only step file is one line naming ``last.ckpt``.
* ``make clean`` keeps ``runs/``; ``make clean-runs`` deletes it and says so.
"""

import os
import shutil
import subprocess

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dlm.cli import main
from lightning_dlm.commands.export import export
from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.safe_read import is_diffusion_checkpoint
from lightning_dlm.model.diffusion_model import DiffusionModel
from lightning_dlm.training.callbacks import StepCheckpoint
from lightning_dlm.training.runs import existing_checkpoints
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "callbacks")


def fit(root, *extra):
    main(["fit", "--config", DEBUG, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps",
          "2", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    fit(root)
    return root / "checkpoints"


def test_last_holds_the_full_state_and_step_files_the_weights_only(run):
    assert existing_checkpoints(str(run)) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt", "step0000006.ckpt"]
    last = load(run / "last.ckpt")
    assert all(key in last for key in TRAINING_STATE)
    assert last["optimizer_states"][0]["state"] and last["lr_schedulers"][0]["last_epoch"] == 6
    # a file of its own, not a link to (or a copy of) a weights-only step file
    assert not os.path.islink(run / "last.ckpt") and os.stat(run / "last.ckpt").st_nlink == 1
    full = os.path.getsize(run / "last.ckpt")
    for name in ("step0000002.ckpt", "step0000004.ckpt", "step0000006.ckpt"):
        step = load(run / name)
        assert not [key for key in TRAINING_STATE if key in step], name
        assert step["lightning_dlm"]["backbone"] and step["hyper_parameters"] and step["state_dict"]
        assert os.path.getsize(run / name) < 0.4 * full  # fp32 weights vs weights + two AdamW moments
    # saved at the same step, the last step file and last.ckpt hold the same weights
    step = load(run / "step0000006.ckpt")
    assert step["global_step"] == last["global_step"] == 6
    assert step["state_dict"].keys() == last["state_dict"].keys()
    assert all(torch.equal(step["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])


def test_a_weights_only_step_file_loads_for_inference(run, tmp_path, capsys):
    step, last = str(run / "step0000006.ckpt"), str(run / "last.ckpt")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = DiffusionModel.from_pretrained(step)(ids)
        expected = DiffusionModel.from_pretrained(last)(ids)
    assert torch.equal(logits, expected)
    assert is_diffusion_checkpoint(step)  # dlm eval --kind auto takes it
    main(["sample", "--ckpt", step, "--prompt", "Once upon a time", "--length", "4", "--steps", "4"])
    assert "Once upon a time\u27e6" in capsys.readouterr().out
    export(step, str(tmp_path / "exported"))
    with torch.no_grad():
        assert torch.equal(DiffusionModel.from_pretrained(str(tmp_path / "exported"))(ids), expected)
    main(["validate", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path / "val"), "--ckpt_path", step,
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert "val/nelbo" in capsys.readouterr().out


def test_resuming_from_a_weights_only_step_file_is_one_line(run, tmp_path, capsys):
    step = run / "step0000004.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path / "r", "--ckpt_path", str(step), "--trainer.max_steps", "8")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot resume from {step}: it is a weights-only step checkpoint (no optimizer or "
                   f"learning-rate schedule state); resume from {run / 'last.ckpt'}, which holds the full state "
                   f"(step files load for dlm sample, eval, export and validate)"]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_keep_last_k_keeps_the_most_recent_step_files_across_a_resume(tmp_path):
    fit(tmp_path, "--checkpoint.keep_last_k", "1", "--trainer.max_steps", "4")
    folder = tmp_path / "checkpoints"
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000004.ckpt"]
    fit(tmp_path, "--checkpoint.keep_last_k", "1", "--ckpt_path", str(folder / "last.ckpt"))
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000006.ckpt"]
    assert load(folder / "last.ckpt")["global_step"] == 6


def test_a_step_file_written_after_the_last_ckpt_is_rewritten_on_resume_not_versioned(tmp_path):
    """Ctrl-C between a step file and last.ckpt (both written at a checkpoint step, step file
    first) leaves a step file newer than last.ckpt. The resumed run reaches that step again with
    the same state (resume is exact) and rewrites the file; Lightning's version counter would add
    a step0000004-v1.ckpt beside it (seen in the sweep's Ctrl-C test)."""
    fit(tmp_path, "--trainer.max_steps", "2")
    folder = tmp_path / "checkpoints"
    shutil.copy(folder / "step0000002.ckpt", folder / "step0000004.ckpt")  # what the interrupted run left
    fit(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", str(folder / "last.ckpt"))
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    assert load(folder / "step0000004.ckpt")["global_step"] == 4  # rewritten by the resumed run


def test_full_step_files_on_request_and_none_with_keep_last_k_0(tmp_path):
    fit(tmp_path / "full", "--checkpoint.save_weights_only", "false", "--trainer.max_steps", "2")
    folder = tmp_path / "full" / "checkpoints"
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000002.ckpt"]
    assert all(key in load(folder / "step0000002.ckpt") for key in TRAINING_STATE)  # Lightning's behaviour
    fit(tmp_path / "none", "--checkpoint.keep_last_k", "0", "--trainer.max_steps", "2")
    folder = tmp_path / "none" / "checkpoints"
    assert existing_checkpoints(str(folder)) == ["last.ckpt"]
    assert all(key in load(folder / "last.ckpt") for key in TRAINING_STATE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(save_last="link"), "would point last.ckpt at a weights-only step file"),
    (dict(save_last=False), "leaves no checkpoint to resume from"),
    (dict(keep_last_k=-1), "keep_last_k must be 0 or more"),
    (dict(keep_last_k=2, monitor="val/nelbo"), "use it with save_top_k -1 and no monitor"),
])
def test_settings_that_lose_the_resumable_state_are_refused(kwargs, message):
    with pytest.raises(DLMError, match=message):
        StepCheckpoint(every_n_train_steps=2, **kwargs)


def test_a_run_checkpointed_by_lightnings_callback_resumes_its_state():
    # the same state key: last_model_path comes back, so last.ckpt is rewritten, not joined by last-v1.ckpt
    assert StepCheckpoint(every_n_train_steps=2).state_key == ModelCheckpoint(every_n_train_steps=2).state_key


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_keeps_runs_and_clean_runs_deletes_them(tmp_path):
    shutil.copy(os.path.join(REPO, "Makefile"), tmp_path / "Makefile")
    (tmp_path / "runs" / "demo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt").write_bytes(b"x" * 1000)
    (tmp_path / "build").mkdir()

    def make(target):
        proc = subprocess.run(["make", "-s", target], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = make("clean")
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "build").exists()
    assert "kept runs/" in out and "make clean-runs" in out
    out = make("clean-runs")
    assert not (tmp_path / "runs").exists()
    assert out.startswith("deleting runs/ (") and "runs/demo" in out
    assert make("clean-runs").strip() == "no runs/ to delete"


def test_a_weights_only_sharded_folder_is_told_apart(tmp_path):
    from lightning_dlm.training.resume import check_full_state

    folder = tmp_path / "step0000002.ckpt"  # FSDP sharded: the optimizer lives in the shards, never in meta.pt
    folder.mkdir()
    check_full_state(str(folder), {"state_dict": {}, "lr_schedulers": [], "callbacks": {}})
    with pytest.raises(DLMError, match=f"resume from {tmp_path / 'last.ckpt'}, which holds the full state"):
        check_full_state(str(folder), {"state_dict": {}})
