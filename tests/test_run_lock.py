"""Nothing lost, nothing run twice: a run folder belongs to one run at a time, moves and copies
resume in place, and sweeps refuse bad arms before anything is written.

* ``dlm fit`` locks its run folder (``<root>/.dlm.lock``: flock, PID and host) for its lifetime: a
  second fit into it stops with one line naming the holder; a lock a ``kill -9`` left is taken over;
  the lock goes on exit (errors and Ctrl-C included); only rank 0 of a multi-process run locks.
* A run folder moved or copied elsewhere resumes there: ``last.ckpt`` of the folder it is in holds
  the later step and no ``-v1`` file appears; step files a ``kill -9`` left beyond ``keep_last_k``
  go at the next save.
* ``dlm sweep``: arm names are plain names; a grid that is not plain YAML is one line; every arm is
  resolved before any folder is made; Ctrl-C is one line and exit code 130, and the interrupted arm
  resumes (in a moved sweep folder too); an arm running elsewhere is one line.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from lightning_dlm.cli import main
from lightning_dlm.core.errors import DLMError
from lightning_dlm.training import runs
from lightning_dlm.training.runs import LOCK_NAME, RunLock, existing_checkpoints, launching_rank, lock_run
from tests.conftest import REPO, default_sigint
from tests.test_sweep import SHORT, write_grid

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
HOST = socket.gethostname()
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
HOLDER = ("import sys, time\nfrom lightning_dlm.training.runs import RunLock\nRunLock(sys.argv[1]).acquire()\n"
          "print('locked', flush=True)\ntime.sleep(600)\n")


def fit_args(root, steps=4, *extra):
    return ["fit", "--config", DEBUG, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--checkpoint.every_n_train_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra]


def fit(root, steps=4, *extra):
    main(fit_args(root, steps, *extra))


def step_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def versioned(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*-v[0-9]*"))


def contents(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def hold_lock(folder):
    """A process holding the run lock of ``folder`` (as a running dlm fit does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def one_error_line(capsys, exit_info):
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- one run per folder ---------------------------------------------------------------------------

def test_two_fits_started_together_into_one_root_one_runs_the_other_is_one_line(tmp_path):
    root = tmp_path / "R"
    logs = [open(tmp_path / f"err{n}.txt", "w+") for n in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-m", "lightning_dlm", *fit_args(root, 10), "--seed_everything", str(n),
                               "--model.seed", str(n)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
             for n, log in zip((1, 2), logs)]
    results = []
    for proc, log in zip(procs, logs):
        proc.wait(timeout=600)
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = procs[0] if results[0][0] == 0 else procs[1]
    err = [line for line in dict(results)[2].strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {root} is in use by another run (dlm fit, PID {winner.pid} on "
                                               f"host {HOST}, since "), err
    assert err[0].endswith("wait for it to end, or start this run in another folder (--trainer.default_root_dir)")
    folder = root / "checkpoints"
    assert existing_checkpoints(str(folder)) == ["last.ckpt", *(f"step{s:07d}.ckpt" for s in (2, 4, 6, 8, 10))]
    assert versioned(root) == [] and len(list((root / "lightning_logs").iterdir())) == 1
    assert not (root / LOCK_NAME).exists()  # released when the run ended


def test_a_live_holder_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    root = tmp_path / "run"
    holder = hold_lock(root)
    try:
        with pytest.raises(SystemExit) as exit_info:
            fit(root)
        line = one_error_line(capsys, exit_info)
        assert line.startswith(f"error: {root} is in use by another run (dlm fit, PID {holder.pid} on host {HOST}, "
                               f"since ") and f"lock file {root / LOCK_NAME}" in line, line
        assert os.listdir(root) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()  # kill -9: the lock file stays, naming a process that is gone
        holder.wait()
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == holder.pid
    fit(root)
    err = capsys.readouterr().err
    assert (f"lock: {root} was left locked by PID {holder.pid} on host {HOST}, which ended without releasing it: this "
            f"run takes it over") in err
    assert step_of(root / "checkpoints" / "last.ckpt") == 4 and not (root / LOCK_NAME).exists()


class LockWitness(L.Callback):
    """Records the run lock while the run trains, then presses Ctrl-C (a KeyboardInterrupt)."""

    seen = {}

    def __init__(self, root: str):
        self.root = root

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        path = os.path.join(self.root, LOCK_NAME)
        LockWitness.seen = json.loads(open(path).read()) if os.path.exists(path) else {}
        raise KeyboardInterrupt


def test_the_lock_is_held_while_training_and_released_on_ctrl_c(tmp_path):
    root = tmp_path / "run"
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.test_run_lock.LockWitness", "init_args": {"root": str(root)}}]}}))
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from its graceful stop on
    try:
        with pytest.raises(SystemExit):
            main(fit_args(root, 4, "--config", str(callbacks)))
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert LockWitness.seen.get("pid") == os.getpid() and LockWitness.seen.get("host") == HOST
    assert not (root / LOCK_NAME).exists()
    RunLock(str(root)).acquire().release()  # free again


class CtrlCAt(L.Callback):
    """Presses Ctrl-C (a KeyboardInterrupt) at the end of training step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop_at, expected", [
    (3, "interrupted at step 3: resume from its last checkpoint (step 2) with --ckpt_path {ckpt}"),
    (1, "interrupted at step 1, before its first checkpoint: nothing was saved to resume from"),
])
def test_ctrl_c_in_a_fit_is_one_line_naming_what_to_resume_and_exit_130(tmp_path, capsys, stop_at, expected):
    """Lightning catches the interrupt, stops gracefully and exits 1 without a word in quiet mode:
    dlm says where the run stands and exits 130 like any Ctrl-C; the line's resume command works."""
    root = tmp_path / "run"
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.test_run_lock.CtrlCAt", "init_args": {"step": stop_at}}]}}))
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT from its graceful stop on
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(root, 6, "--config", str(callbacks)))
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert exit_info.value.code == 130
    ckpt = root / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == expected.format(ckpt=ckpt) and not any("Traceback" in line for line in err)
    assert not (root / LOCK_NAME).exists()
    if stop_at == 3:
        assert step_of(ckpt) == 2
        fit(root, 4, "--ckpt_path", str(ckpt))  # the command the line gives
        assert step_of(ckpt) == 4


def test_only_rank_zero_locks_and_the_other_ranks_share_its_lock(tmp_path, monkeypatch):
    config = {"trainer": {"default_root_dir": str(tmp_path / "ddp")}, "checkpoint": {"dirpath": None}}
    for name in runs.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    assert launching_rank()
    locks = lock_run(config, "fit")
    try:
        assert [lock.path for lock in locks] == [str(tmp_path / "ddp" / LOCK_NAME)]
        for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
            monkeypatch.setenv(name, "1")
            assert not launching_rank() and lock_run(config, "fit") == []  # no wait, no error
            monkeypatch.setenv(name, "0")
        assert lock_run(config, "validate") == []
    finally:
        runs.release_run(locks)
    assert not (tmp_path / "ddp").exists()  # the folder made for the lock alone is gone again


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "fcntl", None)  # a filesystem without locks
    folder = tmp_path / "nolock"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": HOST, "command": "dlm fit"}))
    lock = RunLock(str(folder)).acquire()
    assert lock.took_over["pid"] == gone.pid
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_NAME).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host in (HOST, "elsewhere"):
            (folder / LOCK_NAME).write_text(json.dumps({"pid": alive.pid if host == HOST else 1, "host": host}))
            with pytest.raises(DLMError, match=f"is in use by another run \\(a run, PID .* on host {host}"):
                RunLock(str(folder)).acquire()
    finally:
        alive.kill()
        alive.wait()


# --- moved, copied, pruned ------------------------------------------------------------------------

def test_a_moved_or_copied_run_folder_resumes_in_place(tmp_path):
    fit(tmp_path / "mv1", 4)
    shutil.move(tmp_path / "mv1", tmp_path / "mv2")
    moved = tmp_path / "mv2"
    fit(moved, 6, "--ckpt_path", str(moved / "checkpoints" / "last.ckpt"))
    assert step_of(moved / "checkpoints" / "last.ckpt") == 6
    assert existing_checkpoints(str(moved / "checkpoints")) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt",
                                                                 "step0000006.ckpt"]
    assert versioned(moved) == [] and not (tmp_path / "mv1").exists()
    shutil.copytree(moved, tmp_path / "copy")
    copy, before = tmp_path / "copy", contents(moved / "checkpoints")
    fit(copy, 8, "--ckpt_path", str(copy / "checkpoints" / "last.ckpt"))
    assert step_of(copy / "checkpoints" / "last.ckpt") == 8 and versioned(copy) == []
    assert contents(moved / "checkpoints") == before  # the original is untouched


def test_step_files_a_kill_left_beyond_keep_last_k_go_at_the_next_save(tmp_path):
    fit(tmp_path, 4, "--checkpoint.keep_last_k", "1")
    folder = tmp_path / "checkpoints"
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000004.ckpt"]
    # what a kill -9 during saves leaves: a step file pruned too late, one written after last.ckpt
    shutil.copy(folder / "step0000004.ckpt", folder / "step0000002.ckpt")
    shutil.copy(folder / "step0000004.ckpt", folder / "step0000006.ckpt")
    fit(tmp_path, 8, "--checkpoint.keep_last_k", "1", "--ckpt_path", str(folder / "last.ckpt"))
    assert existing_checkpoints(str(folder)) == ["last.ckpt", "step0000008.ckpt"]
    assert step_of(folder / "last.ckpt") == 8


# --- sweeps (SHORT and write_grid are test_sweep's) -----------------------------------------------


def sweep(grid, out):
    main(["sweep", "--config", DEBUG, "--grid", str(grid), "--out", str(out)])


def test_arm_names_must_be_plain_names(tmp_path, capsys):
    out = tmp_path / "swdots" / "inner"
    for name in ("..", ".", "-rf", "a/b", "../x", "a\0b", ""):
        grid = tmp_path / "grid.yaml"
        grid.write_text(f"- name: {json.dumps(name)}\n  model.seed: 1\n")
        with pytest.raises(SystemExit) as exit_info:
            sweep(grid, out)
        line = one_error_line(capsys, exit_info)
        if name:
            assert line == (f"error: grid '{grid}': arm name {name!r} is not a plain folder name: use letters, digits "
                            f"and . _ , = + - (not . or .., not starting with -)"), line
        else:
            assert "arm 1 needs a name" in line
        assert sorted(os.listdir(tmp_path)) == ["grid.yaml"], name  # nothing written, above --out neither


@pytest.mark.parametrize("text, message", [
    ("- name: a\n  model.seed: !!python/object/apply:os.system ['echo pwned']\n",
     "holds a YAML tag the sweep does not load (!!python/object/apply:os.system, line 2): use plain YAML values"),
    ("model.diffusion.schedule: [linear, cosine\n", "is not valid YAML ("),
    ("- name: a\n\tmodel.seed: 1\n", "is not valid YAML ("),
])
def test_a_grid_that_is_not_plain_yaml_is_one_line(tmp_path, capsys, text, message):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        sweep(grid, tmp_path / "out")
    line = one_error_line(capsys, exit_info)
    assert line.startswith(f"error: grid '{grid}' ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_a_bad_value_in_arm_three_is_refused_before_any_arm_folder_is_made(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", [{"name": "a", **SHORT}, {"name": "b", **SHORT},
                                               {"name": "c", **SHORT, "trainer.max_steps": "many"}])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        sweep(grid, out)
    line = one_error_line(capsys, exit_info)
    assert line.startswith(f"error: arm 'c' does not parse against {DEBUG} ("), line
    assert not out.exists()  # no arm folder, empty or not, and nothing trained


def test_an_arm_running_elsewhere_is_one_line(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", [{"name": "a", **SHORT}])
    out = tmp_path / "out"
    main(["sweep", "--config", DEBUG, "--grid", grid, "--out", str(out), "--launcher", "slurm", "--dry_run", "true"])
    holder = hold_lock(out / "a")  # the arm's dlm fit of another dlm sweep of this folder
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            sweep(grid, out)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2
        assert err[-1].startswith(f"error: {out / 'a'} is in use by another run (dlm fit, PID {holder.pid} on host "
                                  f"{HOST}, since ") and err[-1].endswith("wait for it to end, or give this sweep "
                                                                          "another --out"), err
        assert not [line for line in err if line.startswith("error:")][:-1]
        assert sorted(os.listdir(out / "a")) == [LOCK_NAME, "arm.json", "config.yaml"]  # nothing ran
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_in_a_sweep_is_one_line_and_the_arm_resumes_after_the_sweep_moved(tmp_path):
    longer = dict(SHORT, **{"trainer.max_steps": 60, "checkpoint.every_n_train_steps": 5,
                            "trainer.val_check_interval": 30})
    grid = write_grid(tmp_path / "grid.yaml", [dict(name="first", **SHORT), dict(name="second", **longer)])
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lightning_dlm", "sweep", "--config", DEBUG, "--grid", grid]
    log = open(tmp_path / "sweep.err", "w+")
    proc = subprocess.Popen(command + ["--out", str(out)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True, preexec_fn=default_sigint)
    last = out / "second" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on a terminal: the sweep and its arm's dlm fit
    proc.wait(timeout=300)
    log.seek(0)
    err = log.read()
    log.close()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("interrupted: arms done: first; second was interrupted and resumes from "
                                            "its last.ckpt on the next run (run the same dlm sweep again to continue)")
    assert (out / "first" / "DONE").is_file() and not (out / "second" / "DONE").exists() and last.exists()
    assert not (out / "second" / LOCK_NAME).exists()
    interrupted_at = step_of(last)
    assert 5 <= interrupted_at < 60
    shutil.move(out, tmp_path / "moved")
    moved = tmp_path / "moved"
    rerun = subprocess.run(command + ["--out", str(moved)], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "arm 1/2 first: done already, skipped" in rerun.stderr
    assert "arm 2/2 second: resuming from its last.ckpt" in rerun.stderr
    assert (moved / "second" / "DONE").is_file() and step_of(moved / "second" / "checkpoints" / "last.ckpt") == 60
    assert versioned(moved) == [] and not out.exists()  # nothing written where the sweep was
