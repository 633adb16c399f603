"""`dlm sweep`: arms as isolated run folders, skipped when done, resumed when interrupted; SLURM
job arrays through submitit (checked without a cluster); one-line errors for bad grids."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from lightning_dlm.cli import main
from lightning_dlm.research.sweep import load_grid, resolve_arm
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
SHORT = {"trainer.max_steps": 4, "trainer.limit_val_batches": 1, "trainer.val_check_interval": 2,
         "checkpoint.every_n_train_steps": 2, "trainer.enable_progress_bar": False}


def write_grid(path, arms):
    path.write_text(yaml.safe_dump(arms, sort_keys=False))
    return str(path)


def test_a_two_arm_sweep_runs_then_skips_both_arms(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", [dict(name="linear", **SHORT),
                                               {"name": "cosine", "model.diffusion.schedule": "cosine", **SHORT}])
    out = tmp_path / "sweep"
    main(["sweep", "--config", DEBUG, "--grid", grid, "--out", str(out)])
    for arm in ("linear", "cosine"):
        assert (out / arm / "DONE").is_file() and (out / arm / "checkpoints" / "last.ckpt").is_file()
        resolved = yaml.safe_load((out / arm / "config.yaml").read_text())
        assert resolved["trainer"]["default_root_dir"] == str(out / arm) and resolved["trainer"]["max_steps"] == 4
    assert yaml.safe_load((out / "cosine" / "config.yaml").read_text())["model"]["diffusion"]["schedule"] == "cosine"
    stamp = os.path.getmtime(out / "linear" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    main(["sweep", "--config", DEBUG, "--grid", grid, "--out", str(out)])
    err = capsys.readouterr().err
    assert err.count("done already, skipped") == 2
    assert os.path.getmtime(out / "linear" / "checkpoints" / "last.ckpt") == stamp
    main(["compare", str(out / "*"), "--format", "csv"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header + 2 arms


def wait_for_lock_release(path, limit_s: float = 60.0) -> None:
    """Until no process holds the run lock at ``path``: SIGKILL is delivered at once, but a killed
    grandchild releases its files when the kernel has torn it down, which a loaded box delays."""
    import fcntl

    deadline = time.time() + limit_s
    while time.time() < deadline:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                time.sleep(0.2)
    raise AssertionError(f"{path} still locked {limit_s:.0f} s after the kill")


def test_an_interrupted_sweep_resumes_the_unfinished_arm(tmp_path):
    longer = dict(SHORT, **{"trainer.max_steps": 60, "checkpoint.every_n_train_steps": 5,
                            "trainer.val_check_interval": 30})
    grid = write_grid(tmp_path / "grid.yaml", [dict(name="first", **SHORT), dict(name="second", **longer)])
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lightning_dlm", "sweep", "--config", DEBUG, "--grid", grid, "--out", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = out / "second" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the arm's dlm fit
    proc.wait()
    wait_for_lock_release(out / "second" / ".dlm.lock")  # the killed dlm fit (not our child) exits on its own time
    assert (out / "first" / "DONE").is_file() and not (out / "second" / "DONE").exists() and last.exists()
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "arm 1/2 first: done already, skipped" in rerun.stderr
    assert "arm 2/2 second: resuming from its last.ckpt" in rerun.stderr
    assert (out / "second" / "DONE").is_file()


def test_slurm_dry_run_writes_the_job_array(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("model.diffusion.schedule: [linear, cosine, loglinear]\n")
    out = tmp_path / "sweep"
    main(["sweep", "--config", DEBUG, "--grid", str(grid), "--out", str(out), "--launcher", "slurm", "--partition",
          "gpu", "--gpus", "8", "--time", "120", "--dry_run", "true"])
    script = (out / "slurm" / "array.sbatch").read_text()
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=120", "#SBATCH --job-name=dlm-sweep", "#SBATCH --nodes=1"):
        assert line in script.splitlines(), line
    # one task per GPU, all started by srun: every task is one rank of the arm's dlm fit (Lightning's SLURM mode)
    assert "#SBATCH --ntasks-per-node=8" in script.splitlines()
    (launch,) = [line for line in script.splitlines() if "-m submitit.core._submit" in line]
    assert launch.startswith("srun ") and "%A_%a_%t_log.out" in launch  # a log per task
    assert sorted(os.listdir(out)) == ["schedule=cosine", "schedule=linear", "schedule=loglinear", "slurm"]
    assert not any((out / arm / "DONE").exists() for arm in os.listdir(out))  # nothing ran
    # submitit reconfigures logging when imported (it shuts every handler down): never in this process
    assert "submitit" not in sys.modules


def test_slurm_cpu_arms_run_one_task(tmp_path):
    from lightning_dlm.research.sweep import slurm_script

    script = slurm_script([str(tmp_path / "a")], str(tmp_path), None, 0, 60, 4).splitlines()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=4" in script
    assert not any("--gpus-per-node" in line for line in script)


def test_the_dry_run_script_is_what_submitit_submits(tmp_path, monkeypatch):
    """submitit's own rendering of the job (through a stand-in ``sbatch`` that keeps the script it is
    given, and a stand-in ``srun``, which submitit looks for) is the dry run's script, line for line."""
    from lightning_dlm.research.sweep import slurm_script, submit_slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$KEEP_SCRIPT"\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KEEP_SCRIPT", str(tmp_path / "submitted.sbatch"))
    folders = [str(tmp_path / "sweep" / arm) for arm in ("a", "b")]
    for folder in folders:
        os.makedirs(folder)
    assert submit_slurm(folders, str(tmp_path / "sweep"), "gpu", 8, 120, 8) == "4242"
    submitted = (tmp_path / "submitted.sbatch").read_text()
    assert submitted == slurm_script(folders, str(tmp_path / "sweep"), "gpu", 8, 120, 8)
    assert "#SBATCH --ntasks-per-node=8" in submitted.splitlines()


def test_other_tasks_of_a_multi_gpu_arm_run_their_rank_without_the_lock(tmp_path, monkeypatch):
    """SLURM_PROCID > 0: the arm's fit runs (as that rank) while rank 0 holds the arm's lock; only
    rank 0 writes DONE."""
    from lightning_dlm.research import sweep as sweep_module
    from lightning_dlm.training.runs import RunLock

    folder = tmp_path / "arm"
    folder.mkdir()
    ran = tmp_path / "ran"
    monkeypatch.setattr(sweep_module, "arm_command",
                        lambda f: [sys.executable, "-c", f"open({str(ran)!r}, 'w').write('rank 1')"])
    held = RunLock(str(folder), command="dlm sweep", fix="wait").acquire()  # rank 0's lock
    try:
        monkeypatch.setenv("SLURM_PROCID", "1")
        assert sweep_module.run_arm(str(folder)) == 0
        assert ran.read_text() == "rank 1" and not (folder / "DONE").exists()
    finally:
        held.release()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert sweep_module.run_arm(str(folder)) == 0 and (folder / "DONE").is_file()  # rank 0: lock, run, DONE


def test_grid_forms_and_names(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("model.diffusion.schedule: [linear, cosine]\nmodel.optim.lr: [1.0e-4, 3.0e-4]\n")
    arms = load_grid(str(grid))
    assert [a.name for a in arms] == ["schedule=linear,lr=0.0001", "schedule=linear,lr=0.0003",
                                      "schedule=cosine,lr=0.0001", "schedule=cosine,lr=0.0003"]
    assert arms[3].overrides == {"model.diffusion.schedule": "cosine", "model.optim.lr": 3.0e-4}
    # common overrides reach every arm; an arm's own value wins
    grid.write_text("common: {trainer.max_steps: 48, model.diffusion.anneal_steps: 16}\n"
                    "arms:\n  - name: full\n  - name: no_anneal\n    model.diffusion.anneal_steps: 0\n")
    arms = load_grid(str(grid))
    assert [(a.name, a.overrides) for a in arms] == [
        ("full", {"trainer.max_steps": 48, "model.diffusion.anneal_steps": 16}),
        ("no_anneal", {"trainer.max_steps": 48, "model.diffusion.anneal_steps": 0}),
    ]


@pytest.mark.parametrize("grid, message", [
    ("", "is empty"),
    ("- name: a\n- name: a\n", "names the arm 'a' twice"),
    ("- {model.seed: 1}\n", "arm 1 needs a name"),
    ("common: {model.seed: 1}\narms: []\n", "has no arms"),
    ("model.diffusion.schedul: [linear]\n", "does not parse against"),
])
def test_bad_grids_are_one_line(tmp_path, capsys, grid, message):
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--config", DEBUG, "--grid", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_folder_of_another_sweep_is_refused(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", [{"name": "a", "model.seed": 1}])
    out = tmp_path / "sweep"
    main(["sweep", "--config", DEBUG, "--grid", grid, "--out", str(out), "--launcher", "slurm", "--dry_run", "true"])
    other = write_grid(tmp_path / "other.yaml", [{"name": "a", "model.seed": 2}])
    before = (out / "a" / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["sweep", "--config", DEBUG, "--grid", other, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'a'} holds arm 'a' of another sweep") and "another --out" in err
    assert (out / "a" / "config.yaml").read_text() == before


@pytest.mark.parametrize("grid", sorted(glob.glob(os.path.join(REPO, "experiments", "*", "arms.yaml"))
                                        + [os.path.join(REPO, "experiments", "sweeps", "schedules.yaml")]))
def test_shipped_grids_resolve_against_the_demo_config(tmp_path, grid):
    """Every shipped grid's arms parse against the config its header names (nothing is trained)."""
    arms = load_grid(grid)
    assert arms and len({a.name for a in arms}) == len(arms)
    base = os.path.join(REPO, "experiments", "smollm2_shakespeare.yaml")
    text = resolve_arm(base, arms[-1], str(tmp_path / arms[-1].name))
    for key, value in arms[-1].overrides.items():
        assert key.split(".")[-1] in text, key
