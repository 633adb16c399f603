"""Block diffusion decoding against the original model's own AR decoding: speed and quality.

What it measures
----------------
The same prompts, ``--length`` generated tokens each (default 256), at batch 1 (``--num-samples``
prompts decoded one at a time) and at batch ``--batch`` (default 8, one batch of prompts of
different lengths), for three decoders:

* ``AR generate``: the ORIGINAL causal LM (``--ar-model``, default assets/smollm2-135m) with
  transformers' ``generate`` and its KV cache, sampled (temperature / top-p as below);
* ``block model``: a block diffusion checkpoint (``--block-ckpt``, e.g. the one
  experiments/smollm2_block.yaml trains), decoded block by block with the exact KV cache of
  committed blocks, threshold parallel decoding inside a block (``--threshold``; ``--sub-block``
  for Fast-dLLM v2's sub-blocks);
* ``bidirectional demo``: the bidirectional demo checkpoint (``--bidir-ckpt``) in its fastest
  configuration of benchmarks/sampling.py: blocks of 32 + dual cache + threshold.

Columns: tokens/s (generated tokens / wall time of the whole call, tokenization included, the
same clock for every row), forward passes, tokens per forward, and quality proxies of the
outputs under the ORIGINAL model: generative perplexity of the output given its prompt,
distinct-2 and unigram entropy (bits), averaged over samples (lightning_dlm.evaluation.genppl).
The verdict: block model tokens/s >= ``--target`` x AR's at batch 1 with every proxy within 10 %.

How to run
----------
    python benchmarks/decode_vs_ar.py --block-ckpt runs/smollm2_block/checkpoints/last.ckpt \\
        --bidir-ckpt runs/smollm2_shakespeare/checkpoints/last.ckpt --markdown benchmarks/RESULTS.md
    python benchmarks/decode_vs_ar.py --quick          # tiny random models, seconds (the test runs this)
    python benchmarks/decode_vs_ar.py --device cuda ...  # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_dlm.evaluation.evaluators import CausalEvaluator  # noqa: E402
from lightning_dlm.evaluation.genppl import score_samples  # noqa: E402
from lightning_dlm.sampling import generate  # noqa: E402

PROMPTS = [
    "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\n",
    "KING HENRY.\nOnce more unto the breach, dear friends,",
    "HAMLET.\nTo be, or not to be:",
    "FIRST CITIZEN.\nBefore we proceed any further, hear me speak.\n\nALL.\n",
    "MACBETH.\nIs this a dagger which I see before me,",
    "PORTIA.\nThe quality of mercy is not strain'd;",
    "GLOUCESTER.\nNow is the winter of our discontent",
    "PROSPERO.\nWe are such stuff as dreams are made on,",
]
TINY_TOKENIZER = REPO / "data" / "fixtures" / "tiny_tokenizer"
QUALITY = ("gen_ppl", "distinct_2", "entropy")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tiny_models():
    """(AR causal LM, tokenizer, block DiffusionModel, bidirectional DiffusionModel) of one tiny
    random LLaMA on the fixture tokenizer: the same weights in all three (no assets needed)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lightning_dlm.core.config import DiffusionConfig
    from lightning_dlm.model import DiffusionModel

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok) + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    ar = LlamaForCausalLM(cfg).eval()
    block = DiffusionModel(copy.deepcopy(ar), len(tok), True, tokenizer=tok,
                           diffusion=DiffusionConfig(attention="block", block_size=8))
    bidir = DiffusionModel(copy.deepcopy(ar), len(tok), True, tokenizer=tok, diffusion=DiffusionConfig())
    return ar, tok, block, bidir


def load_diffusion(path: str, device: str):
    from lightning_dlm.model import DiffusionModel

    return DiffusionModel.from_pretrained(path, map_location=device)


def run_ar(judge: CausalEvaluator, prompts: List[str], length: int, batch: int, args) -> Dict:
    texts: List[str] = []
    sync(args.device)
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch):
        texts += judge.generate(prompts[lo: lo + batch], length, batch_size=batch, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    sync(args.device)
    wall = time.perf_counter() - start
    tokens = len(prompts) * length  # min_new_tokens = length, no EOS stop
    passes = (len(prompts) + batch - 1) // batch * length  # one prefill + length - 1 cached steps per batch
    return dict(texts=texts, wall_s=wall, tokens=tokens, forward_passes=passes)


def run_diffusion(net, prompts: List[str], length: int, batch: int, args, **options) -> Dict:
    texts: List[str] = []
    tokens = passes = 0
    sync(args.device)
    start = time.perf_counter()
    for lo in range(0, len(prompts), batch):
        out = generate(net, prompts[lo: lo + batch], length=length, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, **options)
        texts += out.texts
        tokens += out.stats.tokens
        passes += out.forward_passes
    sync(args.device)
    return dict(texts=texts, wall_s=time.perf_counter() - start, tokens=tokens, forward_passes=passes)


def within(value: float, ref: float, tol: float) -> bool:
    return abs(value / ref - 1.0) <= tol if ref else value == ref


def table(rows: List[Dict]) -> str:
    lines = ["| decoder | batch | tokens/s | speed-up vs AR | forward passes | tokens/forward | gen PPL | distinct-2 "
             "| entropy (bits) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['forward_passes']} | {r['tokens'] / max(r['forward_passes'], 1):.2f} | {r['gen_ppl']:.2f} | "
                     f"{r['distinct_2']:.3f} | {r['entropy']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, length 16, batches 1 and 2")
    parser.add_argument("--ar-model", default=str(REPO / "assets" / "smollm2-135m"))
    parser.add_argument("--block-ckpt", nargs="+", default=[str(REPO / "runs/smollm2_block/checkpoints/last.ckpt")],
                        help="one or more block diffusion checkpoints (a row each)")
    parser.add_argument("--bidir-ckpt", default=str(REPO / "runs/smollm2_shakespeare/checkpoints/last.ckpt"),
                        help="the bidirectional demo checkpoint ('' to skip its row)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=2, help="prompts decoded one at a time at batch 1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--block-steps", type=int, default=0,
                        help="denoising passes for the whole length (e.g. length / 4: 4 slots a pass at least, the "
                             "confidence order, threshold on top); 0 = one slot a pass at least")
    parser.add_argument("--sub-block", type=int, default=0, help="Fast-dLLM v2 sub-blocks of the block model (0 = off)")
    parser.add_argument("--sub-block-cache", action="store_true",
                        help="with --sub-block: Fast-dLLM v2's approximate sub-block cache")
    parser.add_argument("--bidir-block", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=1.5, help="speed-up over AR at batch 1 the verdict asks for")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="", help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        ar, tok, block, bidir = tiny_models()
        blocks = [block]
        args.length, args.batch, args.num_samples = 16, 2, 2
        what = "tiny random LLaMA (64 hidden, 2 layers), fixture tokenizer; block size 8"
    else:
        from lightning_dlm.model.config import BackboneConfig
        from lightning_dlm.model.loading import load_causal_lm, load_tokenizer

        for path in (args.ar_model, *args.block_ckpt):
            if not os.path.exists(path):
                sys.exit(f"'{path}' does not exist: build the assets (make assets) / train "
                         f"experiments/smollm2_block.yaml, or run --quick")
        ar = load_causal_lm(BackboneConfig(pretrained=args.ar_model, dtype="float32"))
        tok = load_tokenizer(args.ar_model)
        blocks = [load_diffusion(path, args.device) for path in args.block_ckpt]
        bidir = load_diffusion(args.bidir_ckpt, args.device) if args.bidir_ckpt and os.path.exists(args.bidir_ckpt) else None
        what = f"AR {args.ar_model} | block " + ", ".join(
            f"{path} (block size {b.diffusion.block_size})" for path, b in zip(args.block_ckpt, blocks))
    judge = CausalEvaluator(ar.to(args.device), tok, name="ar")
    prompts = (PROMPTS * ((args.batch + len(PROMPTS) - 1) // len(PROMPTS)))[: args.batch]
    block_opts = dict(strategy="threshold", threshold=args.threshold)
    if args.block_steps:
        block_opts["steps"] = args.block_steps
    if args.sub_block:
        block_opts["sub_block"] = args.sub_block
        block_opts["sub_block_cache"] = args.sub_block_cache
    bidir_opts = dict(strategy="threshold", threshold=args.threshold, block_size=min(args.bidir_block, args.length),
                      cache="dual", steps=max(1, args.length // 4))
    header = (f"device: {args.device} ({platform.machine()}) | torch {torch.__version__} | threads "
              f"{torch.get_num_threads()}\nmodels: {what}\nlength {args.length} | temperature {args.temperature} "
              f"top-p {args.top_p} | seed {args.seed}")
    print(header, flush=True)
    with torch.inference_mode():  # warm-up
        judge.generate(prompts[:1], 4)
        generate(blocks[0], prompts[:1], length=min(8, args.length), **block_opts)
    rows: List[Dict] = []
    for batch, chosen in ((1, prompts[: args.num_samples]), (args.batch, prompts)):
        runs = [("AR generate (KV cache)", lambda: run_ar(judge, chosen, args.length, batch, args))]
        for block in blocks:
            runs.append((f"block model, block size {block.diffusion.block_size} (exact cache, threshold {args.threshold}"
                         + (f", {args.block_steps} steps" if args.block_steps else "")
                         + (f", sub-blocks of {args.sub_block}" if args.sub_block else "")
                         + (" + sub-block cache" if args.sub_block_cache else "") + ")",
                         lambda block=block: run_diffusion(block, chosen, args.length, batch, args, **block_opts)))
        if bidir is not None:
            runs.append((f"bidirectional demo (blocks {bidir_opts['block_size']} + dual cache + threshold)",
                         lambda: run_diffusion(bidir, chosen, args.length, batch, args, **bidir_opts)))
        for name, fn in runs:
            with torch.inference_mode():
                res = fn()
                quality = score_samples(judge, chosen, res["texts"])
            row = dict(name=name, batch=batch, tokens=res["tokens"], wall_s=res["wall_s"],
                       tokens_per_s=res["tokens"] / res["wall_s"], forward_passes=res["forward_passes"],
                       gen_ppl=quality["gen_ppl"], distinct_2=quality["distinct_2"], entropy=quality["entropy"])
            base = next((r for r in rows if r["batch"] == batch), row)
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            rows.append(row)
            print(f"{name:<60} batch {batch}: {row['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x), "
                  f"{row['forward_passes']} passes, gen PPL {row['gen_ppl']:.2f}, distinct-2 {row['distinct_2']:.3f}, "
                  f"entropy {row['entropy']:.2f}", flush=True)
    ar1 = next(r for r in rows if r["batch"] == 1 and r["name"].startswith("AR"))
    blk1 = max((r for r in rows if r["batch"] == 1 and r["name"].startswith("block")), key=lambda r: r["tokens_per_s"])
    ok_speed = blk1["tokens_per_s"] >= args.target * ar1["tokens_per_s"]
    ok_quality = all(within(blk1[q], ar1[q], 0.10) for q in QUALITY)
    verdict = (f"verdict: the fastest block model at batch 1 is {blk1['speedup']:.2f}x AR (target {args.target}x: "
               f"{'met' if ok_speed else 'not met'}); quality proxies within 10 % of AR: {'yes' if ok_quality else 'no'}")
    print(table(rows))
    print(verdict)
    result = dict(header=header, rows=rows, verdict=verdict, met=ok_speed and ok_quality)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write(f"\n## Block diffusion decoding vs AR (benchmarks/decode_vs_ar.py)\n\n```\n{header}\n```\n\n"
                     f"{table(rows)}\n\n{verdict}\n")
    return result


if __name__ == "__main__":
    main()
