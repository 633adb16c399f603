"""Start-up time of `dlm`: `dlm --help`, and a debug fit until its first training step is printed.

    python benchmarks/startup.py                       # this checkout, 3 runs of each
    python benchmarks/startup.py --repo /path/to/other/checkout --runs 5

Each command runs as `python -m lightning_dlm ...` in a fresh process with PYTHONPATH set to the
checkout, so two checkouts are compared on the same interpreter and packages. Prints a markdown
table (median and min over the runs, seconds). Time is wall-clock from the process start to the
end (`--help`) or to the line `step 1/` (the fit), on a machine as idle as you can make it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def timed(argv, repo: str, until: str = None) -> float:
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lightning_dlm", *argv], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = None
    for line in proc.stdout:
        if until is not None and elapsed is None and line.startswith(until):
            elapsed = time.perf_counter() - start
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode} in {repo}")
    if until is not None and elapsed is None:
        raise SystemExit(f"no line starting with {until!r} from {' '.join(argv)}")
    return elapsed if until is not None else time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", help="checkout(s) to measure (default: this one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    repos = args.repo or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    print("| checkout | command | median s | min s |\n|---|---|---:|---:|")
    for repo in repos:
        with tempfile.TemporaryDirectory() as tmp:
            cases = [("dlm --help", ["--help"], None),
                     ("dlm fit debug.yaml: first step", ["fit", "--config", "experiments/debug.yaml", "--trainer.max_steps", "1",
                                                          "--trainer.default_root_dir", tmp + "/run{}"], "step 1/")]
            for name, argv, until in cases:
                times = []
                for run in range(args.runs):
                    times.append(timed([a.format(run) for a in argv], repo, until))
                print(f"| {os.path.basename(os.path.abspath(repo))} | {name} | {statistics.median(times):.2f} | {min(times):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
