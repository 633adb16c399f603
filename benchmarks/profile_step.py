"""Where a training step's GPU time goes: torch.profiler tables of train_step.py's variants.

Runs the chosen variants of ``benchmarks/train_step.py`` (same shapes, same steps), warms each up
(FlexAttention compiles then), profiles ``--steps`` steps of each and prints, per variant, the
kernels that take the most GPU time, with the step's total, so two variants can be read side by
side (e.g. where the FlexAttention annealing step loses time against the causal step).

    python benchmarks/profile_step.py --shape smollm2-135m --batch-size 16 --seq-len 2048 \\
        --variants causal,after,anneal-flex,after-flex --out /tmp/profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(train_step.SHAPES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--variants", default="causal,after,anneal-flex,after-flex")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=12, help="kernels listed per variant")
    p.add_argument("--out", default=None, help="also write each table and a chrome trace here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    targs = train_step.parse_args(["--shape", args.shape, "--batch-size", str(args.batch_size), "--seq-len",
                                   str(args.seq_len), "--variants", args.variants, "--device", str(device),
                                   "--precision", "bf16" if device.type == "cuda" else "fp32"])
    variants = train_step.make_variants(targs, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for name, step in variants.items():
        for _ in range(args.warmup):
            step()
        train_step.sync(device)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            train_step.sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
        print(f"## {name} ({args.shape}, {args.batch_size}x{args.seq_len}, {args.steps} steps)\n{table}", flush=True)
        if out:
            slug = name.split("(")[-1].rstrip(")").replace(", ", "_").replace(" ", "_")
            (out / f"profile_{slug}.txt").write_text(table)


if __name__ == "__main__":
    main()
