"""SLURM through submitit, in a process of its own (submitit reconfigures logging on import).

    python -m lightning_dlm.research.slurm '{"action": "script" | "submit", "folders": [...], "out": ...,
                                             "partition": ..., "gpus": 8, "time": 1440, "cpus": 8}'

``script`` prints the sbatch script of the job array that ``submit`` has submitit submit (written
here: submitit renders it only inside a submission, on a machine with ``srun``); ``submit`` submits
it through submitit's public executor API (each array task runs
:func:`lightning_dlm.research.sweep.run_arm` on one arm) and prints the array's job id.

An arm with several GPUs runs one task per GPU (``--ntasks-per-node`` = ``gpus``, all started by
``srun``), as Lightning's SLURM support expects: every task is one rank of the arm's ``dlm fit``
(its rank, world size and master address come from the SLURM environment), so the arm's
``trainer.devices`` must be ``gpus`` (Lightning refuses a mismatch when the fit starts). ``cpus`` is
per task.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Dict, List

JOB_NAME = "dlm-sweep"
SIGNAL_DELAY_S = 90  # submitit's default: SIGUSR2 this long before the time limit, for its requeue / checkpoint


def _folder(spec: dict) -> str:
    return os.path.abspath(os.path.join(spec["out"], "slurm"))  # submitit's executor folder (made absolute)


def tasks_per_node(spec: dict) -> int:
    """One task per GPU (``srun`` starts them; each runs the arm's ``dlm fit`` as one rank, which
    Lightning's SLURM environment reads from ``SLURM_PROCID`` / ``SLURM_NTASKS``), one for a CPU arm."""
    return max(1, int(spec["gpus"] or 0))


def sbatch_script(spec: dict) -> str:
    """The sbatch script of the array ``submit`` submits: the ``#SBATCH`` options of the executor's
    parameters (in submitit's format: sorted, its log paths, its wckey and signal) and the command
    its job array runs (submitit's ``_submit`` entry point on the executor folder, through srun)."""
    folder, count = _folder(spec), len(spec["folders"])
    stdout, stderr = (os.path.join(folder, f"%A_%a_%t_log.{ext}") for ext in ("out", "err"))
    options: Dict[str, object] = {
        "array": f"0-{count - 1}%{count}",
        "cpus-per-task": spec["cpus"],
        "error": stderr.replace("%t", "0"),
        "job-name": JOB_NAME,
        "nodes": 1,
        "open-mode": "append",
        "output": stdout.replace("%t", "0"),
        "signal": f"USR2@{SIGNAL_DELAY_S}",
        "time": spec["time"],
        "wckey": "submitit",
    }
    options["ntasks-per-node"] = tasks_per_node(spec)
    if spec["gpus"]:
        options["gpus-per-node"] = spec["gpus"]
    if spec.get("partition"):
        options["partition"] = spec["partition"]
    lines: List[str] = ["#!/bin/bash", "", "# Parameters"]
    lines += [f"#SBATCH --{key}={shlex.quote(str(value))}" for key, value in sorted(options.items())]
    srun = shlex.join(["srun", "--unbuffered", "--output", stdout, "--error", stderr])
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    lines += ["", "# command", "export SUBMITIT_EXECUTOR=slurm", f"{srun} {command}", ""]
    return "\n".join(lines)


def main(spec: dict) -> str:
    if spec["action"] == "script":
        return sbatch_script(spec)  # no submitit import: nothing is submitted
    import submitit

    from lightning_dlm.research.sweep import run_arm

    folders = spec["folders"]
    executor = submitit.AutoExecutor(folder=_folder(spec), cluster="slurm")
    executor.update_parameters(slurm_partition=spec["partition"], gpus_per_node=spec["gpus"] or None,
                               tasks_per_node=tasks_per_node(spec),
                               timeout_min=spec["time"], cpus_per_task=spec["cpus"], name=JOB_NAME,
                               slurm_array_parallelism=len(folders), slurm_signal_delay_s=SIGNAL_DELAY_S)
    jobs = executor.map_array(run_arm, folders)
    return jobs[0].job_id.split("_")[0]


if __name__ == "__main__":
    sys.stdout.write(main(json.loads(sys.argv[1])))
