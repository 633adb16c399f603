"""SLURM through submitit, in a process of its own (submitit reconfigures logging on import).

    python -m lightning_dlm.research.slurm '{"action": "script" | "submit", "folders": [...], "out": ...,
                                             "partition": ..., "gpus": 8, "time": 1440, "cpus": 8}'

``script`` prints the sbatch script of the job array submitit would submit; ``submit`` submits it
(each array task runs :func:`lightning_dlm.research.sweep.run_arm` on one arm) and prints the
array's job id.
"""

from __future__ import annotations

import json
import os
import sys


def main(spec: dict) -> str:
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    from lightning_dlm.research.sweep import run_arm

    folders, out = spec["folders"], spec["out"]
    if spec["action"] == "script":
        folder = os.path.join(out, "slurm", "%j")
        command = f"{sys.executable} -u -m submitit.core._submit {folder}"  # what submitit's job array runs
        return _make_sbatch_string(command=command, folder=folder, job_name="dlm-sweep", partition=spec["partition"],
                                   time=spec["time"], gpus_per_node=spec["gpus"] or None, cpus_per_task=spec["cpus"],
                                   map_count=len(folders), array_parallelism=len(folders))
    executor = submitit.AutoExecutor(folder=os.path.join(out, "slurm"), cluster="slurm")
    executor.update_parameters(slurm_partition=spec["partition"], gpus_per_node=spec["gpus"] or None,
                               timeout_min=spec["time"], cpus_per_task=spec["cpus"], name="dlm-sweep",
                               slurm_array_parallelism=len(folders))
    jobs = executor.map_array(run_arm, folders)
    return jobs[0].job_id.split("_")[0]


if __name__ == "__main__":
    sys.stdout.write(main(json.loads(sys.argv[1])))
