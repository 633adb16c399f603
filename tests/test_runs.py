"""Runs never collide, and checkpoint writes are atomic on any filesystem.

* Two ``dlm fit`` runs of the debug config with different ``--trainer.default_root_dir`` write
  each its checkpoints under its own folder (the shipped configs pin no ``checkpoint.dirpath``).
* A fresh run into a folder that holds checkpoints stops with one line and writes nothing; a run
  resumed there with ``--ckpt_path`` goes on and repeats the uninterrupted losses exactly.
* A write that fails half way (a full disk) or a process killed while writing leaves the previous
  ``last.ckpt`` loadable and, after the next save, no partial file behind.
"""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_dlm.cli import main
from lightning_dlm.core.errors import DLMError
from lightning_dlm.training.checkpoint_io import AtomicCheckpointIO, atomic_write, remove_stale_temp_files, temp_path
from lightning_dlm.training.runs import checkpoint_dir, existing_checkpoints
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")


def fit(root, *extra):
    main(["fit", "--config", DEBUG, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps",
          "2", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra])


def digests(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if (folder / n).is_file()}


def scalars(root, tag="train/loss"):
    """{step: value} of one logged scalar over every TensorBoard run under ``root``."""
    values = {}
    for events in root.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    fit(tmp / "a")
    fit(tmp / "b", "--model.diffusion.schedule", "cosine")
    return tmp


def test_runs_with_different_root_dirs_keep_their_own_checkpoints(two_runs):
    for name in ("a", "b"):
        assert existing_checkpoints(str(two_runs / name / "checkpoints")) == [
            "last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    a = torch.load(two_runs / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(two_runs / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["hyper_parameters"]["diffusion"]["schedule"] == "linear"
    assert b["hyper_parameters"]["diffusion"]["schedule"] == "cosine"
    assert not os.path.exists(os.path.join(REPO, "runs", "debug", "checkpoints", "last-v1.ckpt"))


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(two_runs, capsys):
    before = digests(two_runs / "a" / "checkpoints")
    with pytest.raises(SystemExit) as exit_info:
        fit(two_runs / "a")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    folder = two_runs / "a" / "checkpoints"
    assert err[0] == (f"error: {folder} already holds checkpoints of a run (last.ckpt, step0000002.ckpt, "
                      f"step0000004.ckpt): resume it with --ckpt_path {folder / 'last.ckpt'}, or start this run in "
                      f"another folder (--trainer.default_root_dir)")
    assert digests(folder) == before
    # an explicit checkpoint.dirpath holding checkpoints is refused the same way
    with pytest.raises(SystemExit):
        fit(two_runs / "c", "--checkpoint.dirpath", str(folder))
    assert digests(folder) == before and not (two_runs / "c" / "checkpoints").exists()


def test_a_resumed_run_repeats_the_uninterrupted_losses(two_runs, tmp_path):
    straight = scalars(two_runs / "a")
    resumed_root = tmp_path / "resumed"
    fit(resumed_root, "--checkpoint.dirpath", str(tmp_path / "ck_half"), "--trainer.max_steps", "2")
    fit(resumed_root, "--checkpoint.dirpath", str(tmp_path / "ck_half"),
        "--ckpt_path", str(tmp_path / "ck_half" / "last.ckpt"))
    resumed = scalars(resumed_root)
    assert sorted(straight) == [0, 1, 2, 3] and sorted(resumed) == [0, 1, 2, 3]
    assert [resumed[s] for s in (2, 3)] == [straight[s] for s in (2, 3)]  # to the last bit


def test_checkpoint_dir_defaults_under_the_root():
    assert checkpoint_dir({"trainer": {"default_root_dir": "x/y"}, "checkpoint": {"dirpath": None}}) == "x/y/checkpoints"
    assert checkpoint_dir({"trainer": {}, "checkpoint": {"dirpath": "z"}}) == "z"
    assert checkpoint_dir({}) == os.path.join("runs", "checkpoints")


# --- atomic writes --------------------------------------------------------------------------------

def _checkpoint(value: float):
    return {"state_dict": {"w": torch.full((1000,), value)}, "global_step": int(value)}


def test_a_write_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    before = path.read_bytes()
    calls = []

    def disk_full(fh, chunk):
        if calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(1)
        fh.write(chunk[: len(chunk) // 2])

    payload = b"x" * (3 << 22)  # three chunks: the second write fails
    with pytest.raises(DLMError, match=r"could not write checkpoint .*last.ckpt \(the disk is full\); the previous "
                                       r"checkpoint there is intact: free space"):
        atomic_write(str(path), payload, write=disk_full)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no partial file behind


def test_the_trainer_writes_through_the_atomic_io(two_runs):
    # dlm fit installs it: a checkpoint of the debug run was written by it (no temp left, loadable)
    folder = two_runs / "a" / "checkpoints"
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
    from lightning_dlm.training.cli import DLMCLI, lightning_kwargs

    cli = DLMCLI(args=["--config", DEBUG, "--trainer.max_steps", "1"], run=False, **lightning_kwargs())
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


KILLED_WRITER = r"""
import sys, time, torch
from lightning_dlm.training.checkpoint_io import atomic_write
def slow(fh, chunk):
    fh.write(chunk); fh.flush(); time.sleep(0.2)
atomic_write(sys.argv[1], b"y" * (40 << 22), write=slow)
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(2.0), path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env=dict(os.environ, PYTHONPATH=REPO))
    tmp = temp_path(str(path)).replace(str(os.getpid()), str(proc.pid))
    deadline = time.time() + 60
    while not (os.path.exists(tmp) and os.path.getsize(tmp) > (1 << 22)) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(tmp)  # it was killed mid-write
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["global_step"] == 2
    # the next save in the folder clears what the killed writer left
    AtomicCheckpointIO().save_checkpoint(_checkpoint(3.0), tmp_path / "step3.ckpt")
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step3.ckpt"]
    assert remove_stale_temp_files(str(tmp_path)) == []


# --- resume with changed options --------------------------------------------------------------------

def test_a_resume_applies_and_prints_a_new_learning_rate_and_schedule(two_runs, tmp_path, capsys):
    ckpt = two_runs / "a" / "checkpoints" / "last.ckpt"  # step 4 (the step files hold no optimizer state)
    fit(tmp_path, "--ckpt_path", str(ckpt), "--model.optim.lr", "1e-7", "--model.optim.lr_schedule", "constant",
        "--model.optim.warmup_steps", "0", "--trainer.max_steps", "6")
    err = capsys.readouterr().err
    assert "resume: model.optim.lr changed from 0.002 (checkpoint) to 1e-07" in err
    assert "resume: model.optim.lr_schedule changed from 'cosine' (checkpoint) to 'constant'" in err
    assert "resume: model.optim.warmup_steps changed from 5 (checkpoint) to 0" in err
    lrs = scalars(tmp_path, "train/lr")
    assert sorted(lrs) == [4, 5] and all(v == pytest.approx(1e-7, rel=1e-6) for v in lrs.values())
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["lr_schedulers"][0]["base_lrs"] == [1e-7, 1e-7]
    assert [g["lr"] for g in state["optimizer_states"][0]["param_groups"]] == [1e-7, 1e-7]


@pytest.mark.parametrize("extra, message", [
    (["--model.backbone.config.hidden_size", "128"],
     "with model.backbone.config.hidden_size = 128: the checkpoint was trained with 64"),
    (["--model.diffusion.shift", "false"], "with model.diffusion.shift = False: the checkpoint was trained with True"),
    (["--model.seed", "5"], "with model.seed = 5: the checkpoint was trained with 0"),
])
def test_a_resume_that_changes_the_model_or_objective_is_refused(two_runs, tmp_path, capsys, extra, message):
    ckpt = two_runs / "a" / "checkpoints" / "last.ckpt"
    before = digests(two_runs / "a" / "checkpoints")
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--ckpt_path", str(ckpt), *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume {ckpt} ") and message in err[0], err
    assert "start a new run in another folder" in err[0]
    assert digests(two_runs / "a" / "checkpoints") == before and not (tmp_path / "checkpoints").exists()


def test_a_missing_or_truncated_ckpt_path_is_one_line(two_runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path / "r1", "--ckpt_path", str(tmp_path / "nope.ckpt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --ckpt_path {tmp_path / 'nope.ckpt'} does not exist: give a checkpoint written by dlm fit "
                   f"(e.g. runs/<run>/checkpoints/last.ckpt)"]
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes((two_runs / "a" / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    with pytest.raises(SystemExit):
        fit(tmp_path / "r2", "--ckpt_path", str(truncated))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --ckpt_path {truncated} is not a readable checkpoint (")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2" / "checkpoints").exists()
