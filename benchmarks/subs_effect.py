"""What SUBS would change in a trained model's held-out NELBO, measured after training.

SUBS (MDLM / BD3-LM) takes the mask token out of the softmax of every target. Training applies it
for an added mask token only (``model.diffusion.subs``, auto); a reused token is a real token that
targets can be, so training refuses it there. The micro world reuses a *reserved* token
(``<|mask|>``, id 1) that no text holds, so for its held-out blocks taking it out is exact too.
This script measures, for each checkpoint, the held-out NELBO (the likelihood task's estimator,
the same blocks, levels and draws) as trained and with the mask column removed afterwards: an
upper bound on what SUBS at evaluation gains, and a measure of how much probability the trained
model still puts on the mask token.

    python benchmarks/subs_effect.py runs/micro/ablation/full.seed*/checkpoints/last.ckpt \\
        --data assets/shakespeare/val --seq-len 256 --max-blocks 128
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lightning_dlm.core.config import DiffusionConfig  # noqa: E402
from lightning_dlm.evaluation.evaluators import load_evaluator  # noqa: E402
from lightning_dlm.evaluation.tasks.builtin import LikelihoodTask  # noqa: E402


def nelbo(evaluator, blocks, args) -> float:
    out = evaluator.likelihood(blocks, levels=args.levels, draws=args.draws, batch_size=8, seed=0)
    return float(out["nll_per_token"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="assets/shakespeare/val")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-blocks", type=int, default=128)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--draws", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for path in args.checkpoints:
        evaluator = load_evaluator(path, kind="diffusion")
        net = evaluator.net
        task = LikelihoodTask(name="heldout", data=args.data, seq_len=args.seq_len, max_blocks=args.max_blocks)
        blocks = task.blocks(evaluator.tokenizer)
        if bool((blocks == net.mask_token_id).any()):
            sys.exit(f"error: the held-out blocks hold the mask token id {net.mask_token_id}: removing it would not be "
                     f"exact here")
        plain = nelbo(evaluator, blocks, args)
        trained_subs = net.diffusion.subs_on(net.mask_token_added)
        net.mask_token_added = True  # the reserved token is absent from every block (checked above)
        net.diffusion = DiffusionConfig(**{**net.diffusion.__dict__, "subs": True})
        dropped = nelbo(evaluator, blocks, args)
        rows.append((path, trained_subs, plain, dropped))
        print(f"{path}: NELBO {plain:.4f} -> {dropped:.4f} with the mask column removed", flush=True)
    print("\n| checkpoint | SUBS in training | held-out NELBO | mask column removed | difference | ppl bound ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for path, trained, plain, dropped in rows:
        print(f"| {path} | {'on' if trained else 'off'} | {plain:.4f} | {dropped:.4f} | {dropped - plain:+.6f} | "
              f"{math.exp(dropped - plain):.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
