"""``dlm sweep``: run a base config under a grid of overrides, one isolated run folder per arm.

    dlm sweep --config experiments/smollm2_shakespeare.yaml --grid experiments/sweeps/schedules.yaml
    dlm sweep --config base.yaml --grid grid.yaml --out runs/my_sweep --launcher slurm --partition gpu --gpus 8
    dlm sweep ... --launcher slurm --dry_run          # write the job array's sbatch script, submit nothing

Run it again to continue: finished arms are skipped, an interrupted arm resumes from its last.ckpt.
Then ``dlm compare runs/<sweep>/*``.
"""

from __future__ import annotations

import os
import sys
from typing import List, Literal, Optional

from jsonargparse import ArgumentParser

from lightning_dlm.commands import parse_or_one_line
from lightning_dlm.core.errors import DLMError


def sweep(config: str, grid: str, out: Optional[str] = None, launcher: Literal["local", "slurm"] = "local",
          partition: Optional[str] = None, gpus: int = 1, time: int = 24 * 60, cpus: int = 8,
          dry_run: bool = False) -> List[str]:
    """Run every arm of ``grid`` on ``config``.

    Args:
        config: the base experiment YAML.
        grid: a YAML map of config key -> list of values (every combination is an arm), or a list
            of named arms ({name: ..., key: value, ...}).
        out: the sweep folder (default: runs/<grid file name>); each arm is a folder in it.
        launcher: local (one arm after another, here) or slurm (one job array through submitit).
        partition: SLURM partition (slurm).
        gpus: GPUs per arm (slurm): the arm runs one task per GPU, each a rank of its dlm fit, so the
            arm's trainer.devices must equal it.
        time: time limit of an arm in minutes (slurm).
        cpus: CPUs per task, i.e. per GPU (slurm).
        dry_run: slurm: write the job array's sbatch script to <out>/slurm/array.sbatch, submit nothing.
    """
    from lightning_dlm.research.sweep import DONE, load_grid, prepare, run_arm, slurm_script, submit_slurm

    arms = load_grid(grid)
    out = out or os.path.join("runs", os.path.splitext(os.path.basename(grid))[0])
    folders = prepare(config, arms, out)
    say = lambda line: print(f"[dlm sweep] {line}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{len(arms)} arm(s) in {out}: {', '.join(arm.name for arm in arms)}")
    if launcher == "slurm":
        script = slurm_script(folders, out, partition, gpus, time, cpus)
        os.makedirs(os.path.join(out, "slurm"), exist_ok=True)
        path = os.path.join(out, "slurm", "array.sbatch")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(script)
        if dry_run:
            say(f"dry run: the job array's sbatch script is {path}; nothing was submitted")
            return folders
        job = submit_slurm(folders, out, partition, gpus, time, cpus)
        say(f"submitted job array {job} ({len(folders)} arms); logs in {out}/slurm")
        return folders
    current = 0
    try:
        for current, (arm, folder) in enumerate(zip(arms, folders)):
            index = current + 1
            if os.path.isfile(os.path.join(folder, DONE)):
                say(f"arm {index}/{len(arms)} {arm.name}: done already, skipped")
                continue
            resumed = os.path.exists(os.path.join(folder, "checkpoints", "last.ckpt"))
            say(f"arm {index}/{len(arms)} {arm.name}: {'resuming from its last.ckpt' if resumed else 'starting'}")
            code = run_arm(folder)
            if code != 0:
                raise DLMError(f"arm '{arm.name}' failed (dlm fit exited {code}; its output is above): fix it and run "
                               f"the same dlm sweep again (finished arms are skipped)")
    except KeyboardInterrupt:
        raise SweepInterrupted(interrupted_line(arms, folders, current)) from None
    say(f"all arms done: dlm compare {out}/*")
    return folders


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during the arms: ``str()`` is the one line ``dlm sweep`` prints."""


def interrupted_line(arms, folders: List[str], current: int) -> str:
    """What a Ctrl-C left: the arms done, the one interrupted (resumed from its last.ckpt next time,
    or started over when it had saved none) and those not started."""
    from lightning_dlm.research.sweep import DONE

    done = [arm.name for arm, folder in zip(arms, folders) if os.path.isfile(os.path.join(folder, DONE))]
    parts = [f"arms done: {', '.join(done) if done else 'none'}"]
    if not os.path.isfile(os.path.join(folders[current], DONE)):
        name = arms[current].name
        if os.path.exists(os.path.join(folders[current], "checkpoints", "last.ckpt")):
            parts.append(f"{name} was interrupted and resumes from its last.ckpt on the next run")
        else:
            parts.append(f"{name} was interrupted before its first checkpoint and starts over on the next run")
    later = [arm.name for arm, folder in list(zip(arms, folders))[current + 1:]
             if not os.path.isfile(os.path.join(folder, DONE))]
    if later:
        parts.append(f"not started: {', '.join(later)}")
    return "interrupted: " + "; ".join(parts) + " (run the same dlm sweep again to continue)"


def sweep_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm sweep", exit_on_error=False,
                            description="Run a base config under a grid of overrides, one run folder per arm.")
    parser.add_function_arguments(sweep, as_group=False)
    cfg = parse_or_one_line(parser, args)
    try:
        sweep(**cfg.as_dict())
    except SweepInterrupted as interrupted:  # finished arms are intact; exit code 130 as for any SIGINT
        print(str(interrupted), file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:  # before the first arm ran (grid, arm folders): nothing half written
        print("interrupted: no arm was started (run the same dlm sweep again)", file=sys.stderr, flush=True)
        sys.exit(130)
