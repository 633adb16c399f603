"""Sweeps: one base config, a grid of overrides, one isolated run folder per arm.

A grid file is either a map from config keys to lists of values (every combination is an arm)::

    model.diffusion.schedule: [linear, cosine, loglinear]
    model.optim.lr: [1.0e-4, 3.0e-4]

or a list of named arms, each a map of overrides::

    - name: full
    - name: no_shift
      model.diffusion.shift: false

or a map with ``arms`` (either form above) and ``common``: overrides every arm shares (an arm's
own overrides win)::

    common: {trainer.max_steps: 48}
    arms:
      - name: full
      - name: no_shift
        model.diffusion.shift: false

That map may also hold ``seeds``, a list of seeds: every arm is then repeated once per seed as
``<arm>.seed<N>`` with ``seed_everything``, ``model.seed`` (initialisation, noise draws) and
``data.seed`` (the document order where ``data.shuffle_buffer`` > 0; with 0 every seed reads the
corpus in its file order) set to N; ``dlm compare --by_seed`` averages the repeats.

Each arm becomes ``<out>/<arm>/`` holding ``config.yaml`` (the resolved config, written by the
CLI's own ``--print_config``, so a key that is not a config key is refused before anything runs),
``arm.json`` (its overrides and the base config's hash) and, once its fit has ended, ``DONE``.
Every new arm is resolved before any arm folder is made, so a bad key or value in any arm is
refused with nothing written. Locally the arms run one after another, each ``dlm fit`` in its own
process, in the arm's folder, which is locked while the arm runs: a finished arm is skipped, an
interrupted one (Ctrl-C, ``kill``) resumes from its ``last.ckpt``, also after the sweep folder moved. ``--launcher slurm`` submits the arms
as one SLURM job array through ``submitit`` (``--dry_run`` writes the sbatch script instead).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from lightning_dlm.core.errors import DLMError
from lightning_dlm.training.runs import LOCK_FD_ENV, RunLock, launching_rank

DONE, RECORD, CONFIG = "DONE", "arm.json", "config.yaml"


@dataclass
class Arm:
    name: str
    overrides: Dict[str, Any] = field(default_factory=dict)


def _value_name(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def _read_yaml(path: str) -> Any:
    """The grid file as plain data (``yaml.safe_load``): a tag that would build an object
    (``!!python/...``), invalid YAML or a file that is not text is one line naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.constructor.ConstructorError as err:
        where = f", line {err.problem_mark.line + 1}" if err.problem_mark else ""
        problem = err.problem or "a tag"
        tag = problem.split("tag ")[-1].strip("'").replace("tag:yaml.org,2002:", "!!") if "tag " in problem else problem
        raise DLMError(f"grid '{path}' holds a YAML tag the sweep does not load ({tag}{where}): use plain YAML values "
                       f"(strings, numbers, booleans, lists, maps)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DLMError(f"grid '{path}' is not valid YAML ({problem}{where}): fix the YAML (a map of key -> list of "
                       f"values, or a list of named arms)") from None
    except UnicodeDecodeError:
        raise DLMError(f"grid '{path}' is not a UTF-8 text file: give a YAML file") from None


SEED_KEYS = ("seed_everything", "model.seed", "data.seed")
SEED_SUFFIX = re.compile(r"\.seed(-?\d+)$")


def seed_arm_name(name: str, seed: int) -> str:
    return f"{name}.seed{seed}"


def split_seed(name: str):
    """``(arm, seed)`` of a repeated arm's name (``full.seed2`` -> ``("full", 2)``), else ``(name, None)``."""
    match = SEED_SUFFIX.search(name)
    return (name[:match.start()], int(match.group(1))) if match else (name, None)


def _seeds(path: str, value: Any) -> List[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DLMError(f"grid '{path}': seeds must be a non-empty list of integers (e.g. seeds: [0, 1, 2])")
    if len(set(value)) != len(value):
        raise DLMError(f"grid '{path}': seeds lists a seed twice: give each seed once")
    return list(value)


def plain_arm_name(name: str) -> bool:
    """A plain folder name: letters, digits and ``. _ , = + -``; not ``.`` or ``..``, not starting
    with ``-`` (it would read as an option)."""
    return bool(re.fullmatch(r"[A-Za-z0-9._,=+-]+", name)) and name not in (".", "..") and not name.startswith("-")


def load_grid(path: str) -> List[Arm]:
    """The arms of a grid file (see the module docstring); one-line errors for bad grids."""
    if not os.path.isfile(path):
        raise DLMError(f"grid file '{path}' does not exist: give a YAML map of key -> values, or a list of named arms")
    grid = _read_yaml(path)
    if not grid:
        raise DLMError(f"grid '{path}' is empty: give at least one key with values, or one named arm")
    common: Dict[str, Any] = {}
    seeds: Optional[List[int]] = None
    if isinstance(grid, dict) and "arms" in grid and set(grid) <= {"arms", "common", "seeds"}:
        if "seeds" in grid:
            seeds = _seeds(path, grid["seeds"])
        common = grid.get("common") or {}
        if not isinstance(common, dict):
            raise DLMError(f"grid '{path}': common must be a map of config key -> value")
        grid = grid["arms"]
        if not grid:
            raise DLMError(f"grid '{path}' has no arms: give at least one named arm under arms")
    if isinstance(grid, list):
        arms = []
        for i, entry in enumerate(grid):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise DLMError(f"grid '{path}': arm {i + 1} needs a name (- name: ..., then its overrides)")
            overrides = {k: v for k, v in entry.items() if k != "name"}
            arms.append(Arm(entry["name"], overrides))
    elif isinstance(grid, dict):
        lists = {}
        for key, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise DLMError(f"grid '{path}': key '{key}' has no values")
            lists[key] = values
        arms = []
        for combo in itertools.product(*lists.values()):
            overrides = dict(zip(lists, combo))
            varying = [k for k in lists if len(lists[k]) > 1] or list(lists)
            name = ",".join(f"{k.split('.')[-1]}={_value_name(overrides[k])}" for k in varying)
            arms.append(Arm(name, overrides))
    else:
        raise DLMError(f"grid '{path}' must be a map of key -> list of values, or a list of named arms")
    arms = [Arm(arm.name, {**common, **arm.overrides}) for arm in arms]
    if seeds is not None:
        for arm in arms:
            pinned = [key for key in SEED_KEYS if key in arm.overrides]
            if pinned:
                raise DLMError(f"grid '{path}': arm '{arm.name}' sets {pinned[0]} while the grid repeats every arm over "
                               f"seeds: remove {pinned[0]} from the arm (or drop seeds)")
        arms = [Arm(seed_arm_name(arm.name, seed), {**arm.overrides, **{key: seed for key in SEED_KEYS}})
                for seed in seeds for arm in arms]  # seed by seed: a sweep cut short has every arm of its first seeds
    names = [arm.name for arm in arms]
    for arm in arms:
        if not plain_arm_name(arm.name):
            raise DLMError(f"grid '{path}': arm name {arm.name!r} is not a plain folder name: use letters, digits and "
                           f". _ , = + - (not . or .., not starting with -)")
        if names.count(arm.name) > 1:
            raise DLMError(f"grid '{path}' names the arm '{arm.name}' twice: give every arm its own name")
    return arms


def _override_args(overrides: Dict[str, Any]) -> List[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def base_hash(base: str) -> str:
    with open(base, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def resolve_arm(base: str, arm: Arm, folder: str) -> str:
    """Write the arm's resolved config (the CLI's ``--print_config``); returns its text."""
    args = ["-m", "lightning_dlm", "fit", "--config", base, *_override_args(arm.overrides),
            "--trainer.default_root_dir", folder, "--print_config"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        key = next((line for line in lines if "not expected" in line or "Key" in line or "error" in line.lower()),
                   lines[-1] if lines else "")
        key = re.sub(r"^error: |: see dlm fit --help$", "", key.strip())  # the CLI's own one line, inside ours
        raise DLMError(f"arm '{arm.name}' does not parse against {base} ({key[:200]}): check the grid's keys "
                       f"(they are config keys such as model.diffusion.schedule) and values")
    return proc.stdout


def prepare(base: str, arms: List[Arm], out: str) -> List[str]:
    """Create (or check) every arm's folder; returns the folders. An existing folder must hold the
    same arm of the same base config: another sweep's arm is never overwritten. Every new arm is
    resolved (the CLI's ``--print_config``) before any folder is made: a bad key or value in any
    arm is refused with nothing written."""
    if not os.path.isfile(base):
        raise DLMError(f"base config '{base}' does not exist: give the YAML the sweep varies")
    digest = base_hash(base)
    folders, new = [], []
    for arm in arms:
        folder = os.path.join(out, arm.name)
        record = {"name": arm.name, "overrides": arm.overrides, "base": os.path.abspath(base), "base_sha256": digest}
        record_path = os.path.join(folder, RECORD)
        if os.path.isfile(record_path):
            with open(record_path, encoding="utf-8") as fh:
                old = json.load(fh)
            if old.get("base_sha256") != digest or old.get("overrides") != arm.overrides:
                raise DLMError(f"{folder} holds arm '{arm.name}' of another sweep (base {old.get('base')} or other "
                               f"overrides): give this sweep another --out")
        elif os.path.isdir(folder) and os.listdir(folder):
            raise DLMError(f"{folder} exists and is not an arm of this sweep: give this sweep another --out")
        else:
            new.append((folder, record, arm))
        folders.append(folder)
    resolved = [(folder, record, resolve_arm(base, arm, folder)) for folder, record, arm in new]
    for folder, record, text in resolved:  # every arm parsed: now write
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as fh:
            fh.write(text)
        with open(os.path.join(folder, RECORD), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2)
    return folders


def arm_command(folder: str) -> List[str]:
    """The ``dlm fit`` of an arm: fresh, or resumed from its last.ckpt; in the folder the arm is in
    now (its config.yaml names the folder it was resolved in, which a moved sweep left)."""
    command = [sys.executable, "-m", "lightning_dlm", "fit", "--config", os.path.join(folder, CONFIG),
               "--trainer.default_root_dir", folder]
    last = os.path.join(folder, "checkpoints", "last.ckpt")
    if os.path.exists(last):
        command += ["--ckpt_path", last]
    return command


def run_arm(folder: str) -> int:
    """Run one arm to its end (skipped if done); writes DONE on success. Returns the exit code.

    The arm's folder is locked for the arm's lifetime (:class:`~lightning_dlm.training.runs.RunLock`,
    handed to its ``dlm fit``): the same arm running elsewhere (another ``dlm sweep`` of this
    folder) is one line. On Ctrl-C the arm's ``dlm fit`` (which has the SIGINT too, or is passed
    it) stops gracefully; then the KeyboardInterrupt goes on. The other tasks of a multi-GPU SLURM
    arm (``SLURM_PROCID`` > 0) run their rank of the fit only: rank 0 locks and writes DONE."""
    if os.path.isfile(os.path.join(folder, DONE)):
        return 0
    if not launching_rank():  # another task of a multi-GPU SLURM arm: a rank of the fit rank 0 locked
        return subprocess.call(arm_command(folder))
    lock = RunLock(folder, command="dlm sweep",
                   fix="wait for it to end, or give this sweep another --out").acquire()
    try:
        if os.path.isfile(os.path.join(folder, DONE)):  # the other sweep finished it meanwhile
            return 0
        began = time.time()
        env = dict(os.environ, **{LOCK_FD_ENV: str(lock.fd)})
        proc = subprocess.Popen(arm_command(folder), env=env, pass_fds=(lock.fd,))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            if _stop(proc) == 0:  # it had just finished
                _done(folder, began)
            raise
        if code == 0:
            _done(folder, began)
        return code
    finally:
        lock.release()


def _done(folder: str, began: float) -> None:
    with open(os.path.join(folder, DONE), "w", encoding="utf-8") as fh:
        json.dump({"seconds": round(time.time() - began, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, fh)


def _stop(proc: "subprocess.Popen", grace_s: float = 5.0, limit_s: float = 120.0) -> int:
    """After a Ctrl-C: the arm's process stops (Lightning's graceful stop: the last checkpoint it
    saved stays its last.ckpt). A Ctrl-C on a terminal reaches it too; if it is still running after
    ``grace_s`` (only the sweep was signalled), it is passed the SIGINT; killed after ``limit_s``,
    or at once on a second Ctrl-C. Returns its exit code."""
    try:
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    except KeyboardInterrupt:
        proc.kill()
    return proc.wait()


def slurm_script(folders: List[str], out: str, partition: Optional[str], gpus: int, time_min: int,
                 cpus: int) -> str:
    """The sbatch script of the job array ``submitit`` submits for these arms (see :func:`submit_slurm`)."""
    return _slurm("script", folders, out, partition, gpus, time_min, cpus)


def submit_slurm(folders: List[str], out: str, partition: Optional[str], gpus: int, time_min: int, cpus: int) -> str:
    """Submit the arms as one job array through ``submitit``; returns the array's job id.

    submitit configures the logging module when it is imported (``logging.config.dictConfig``,
    which shuts every existing handler down), so it only ever runs in a process of its own
    (:mod:`lightning_dlm.research.slurm`)."""
    return _slurm("submit", folders, out, partition, gpus, time_min, cpus)


def _slurm(action: str, folders, out, partition, gpus, time_min, cpus) -> str:
    spec = dict(action=action, folders=[os.path.abspath(f) for f in folders], out=os.path.abspath(out),
                partition=partition, gpus=gpus, time=time_min, cpus=cpus)
    proc = subprocess.run([sys.executable, "-m", "lightning_dlm.research.slurm", json.dumps(spec)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise DLMError(f"submitit could not {action} the job array ({lines[-1][:200] if lines else proc.returncode}): "
                       f"check that sbatch is on the PATH (a SLURM login node), or use --dry_run true")
    return proc.stdout
