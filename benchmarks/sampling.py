"""Sampling strategies: speed and quality at equal output length, on one table.

What it measures
----------------
Every row decodes ``--length`` tokens after the same prompt, ``--num-samples`` times (one batch,
each repeat with its own seed), with one configuration of :func:`lightning_dlm.sampling.generate`:

* ``random, T=L``: the paper's ancestral sampler with as many steps as tokens (about one forward
  pass per committed token; steps that commit nothing skip the pass). The baseline.
* ``confidence, T=L/4``: the most confident ceil(remaining / steps left) slots per step.
* ``threshold 0.9`` / ``threshold <low>``: Fast-dLLM parallel decoding over the whole region (at
  least the confidence count per step, so at most T = L/4 passes).
* ``blocks 32 + confidence``: semi-autoregressive, blocks of 32, confidence inside a block.
* ``... + prefix cache`` / ``... + dual cache``: the same with the approximate KV caches.
* ``... + dual cache + threshold``: the fastest configuration.
* ``blocks 32 + random + dual cache, T=L`` / ``3L/4`` / ``L/2``: the baseline's own rule (random order,
  tokens drawn from the model's marginals) made fast by blocks and the dual cache alone, with
  one to two tokens per step. Only the cache approximation and the block order separate it
  from the baseline, so its quality proxies can be compared with the baseline's directly.

The verdict lines at the end name the fastest row that is at least 5x the baseline's tokens/s
with the quality proxy within 10 % of the baseline's: by the model's own NELBO (the issue's
proxy), and by every proxy at once (NELBO, gen PPL, distinct-2, entropy). "Within 10 %" counts
both ways, because a much lower perplexity with collapsed distinct-2 and entropy means
repetition, not better text.

Columns: forward passes (full + cached), wall time of the decode (the sampler's own clock),
generated tokens/s, speed-up in tokens/s over the baseline, and quality proxies of the outputs:

* ``NELBO``: the diffusion model's own negative ELBO per token (nats) of prompt + output, on a
  fixed grid (``--nelbo-levels`` levels of t, fixed masks: ``DiffusionLM.nelbo_per_token``).
* ``gen PPL``: generative perplexity of the output given the prompt under the ORIGINAL causal LM
  (``--ar-model``, default ``assets/smollm2-135m``; skipped for ``--model tiny`` or if absent).
* ``distinct-2`` (unique bigrams / bigrams, per sample, averaged) and ``entropy`` (of the token
  unigram distribution of each sample, bits, averaged) — low values flag repetition, which
  lowers the perplexity without being better text.

How to run
----------
    python benchmarks/sampling.py                         # the demo checkpoint, length 256
    python benchmarks/sampling.py --model tiny            # a tiny random model (no assets needed)
    python benchmarks/sampling.py --length 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_dlm.evaluation.genppl import score_samples  # noqa: E402
from lightning_dlm.evaluation.metrics import distinct_n, unigram_entropy  # noqa: E402
from lightning_dlm.model.loading import start_and_pad_ids  # noqa: E402
from lightning_dlm.sampling import generate  # noqa: E402

DEMO_CKPTS = ["/tmp/fresh/runs/smollm2_shakespeare/checkpoints/last.ckpt",
              str(REPO / "runs/smollm2_shakespeare/checkpoints/last.ckpt")]
DEFAULT_PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\n"
TINY_TOKENIZER = REPO / "data" / "fixtures" / "tiny_tokenizer"


def default_ckpt() -> str:
    for path in DEMO_CKPTS:
        if os.path.isfile(path):
            return path
    return DEMO_CKPTS[-1]


def tiny_module():
    """A tiny random LLaMA-shaped DiffusionLM on the fixture tokenizer (built from config)."""
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.training.module import DiffusionConfig, DiffusionLM

    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=0)
    module = DiffusionLM(backbone=BackboneConfig(config=config, tokenizer=str(TINY_TOKENIZER),
                                                 mask_token=MaskTokenConfig(mode="add")),
                         diffusion=DiffusionConfig(anneal_steps=0), val_t_levels=4)
    module.configure_model()
    module.eval()
    return module


def configs(length: int, block: int, low: float, threshold_steps: Optional[int] = None,
            random_steps: Sequence[int] = ()) -> List[Dict]:
    quarter = max(1, length // 4)
    tq = threshold_steps or quarter
    blk = dict(block_size=block)
    return [
        dict(name=f"random, T={length} (baseline)", strategy="random", steps=length),
        dict(name=f"confidence, T={quarter}", strategy="confidence", steps=quarter),
        dict(name=f"threshold 0.9, T<={tq}", strategy="threshold", steps=tq, threshold=0.9),
        dict(name=f"threshold {low}, T<={tq}", strategy="threshold", steps=tq, threshold=low),
        dict(name=f"blocks {block} + confidence, T={quarter}", strategy="confidence", steps=quarter, **blk),
        dict(name=f"blocks {block} + confidence + prefix cache", strategy="confidence", steps=quarter, cache="prefix",
             **blk),
        dict(name=f"blocks {block} + confidence + dual cache", strategy="confidence", steps=quarter, cache="dual",
             **blk),
        dict(name=f"blocks {block} + dual cache + threshold 0.9, T<={tq}", strategy="threshold", steps=tq, cache="dual",
             threshold=0.9, **blk),
        dict(name=f"blocks {block} + dual cache + threshold {low}, T<={tq}", strategy="threshold", steps=tq, cache="dual",
             threshold=low, **blk),
    ] + [dict(name=f"blocks {block} + random + dual cache, T={steps}", strategy="random", steps=steps, cache="dual",
              **blk) for steps in (random_steps or (length, length * 3 // 4, length // 2))]


QUALITY = ("nelbo", "gen_ppl", "distinct2", "entropy")


def within(value: Optional[float], ref: Optional[float], tol: float) -> bool:
    """|value / ref - 1| <= tol (a missing proxy on both sides counts as within)."""
    if value is None or ref is None:
        return value is None and ref is None
    return abs(value / ref - 1.0) <= tol if ref else value == ref


def verdict(results: List[Dict], proxies=QUALITY, speedup: float = 5.0, tol: float = 0.10) -> Optional[Dict]:
    """The fastest row with >= ``speedup`` x the baseline's tokens/s and ``proxies`` within ``tol``."""
    base = results[0]
    ok = [r for r in results[1:] if r["speedup"] >= speedup and all(within(r[q], base[q], tol) for q in proxies)]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


@torch.inference_mode()
def own_nelbo(module, prompt_ids: List[int], outputs: List[List[int]], levels: int) -> float:
    start, _ = start_and_pad_ids(module.tokenizer)
    rows = [([start] if start is not None else []) + prompt_ids + out for out in outputs]
    x0 = torch.tensor(rows, dtype=torch.long)
    nelbo, _ = module.nelbo_per_token(x0, torch.ones_like(x0), batch_key=0, levels=levels)
    return float(nelbo)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ckpt", choices=["ckpt", "tiny"],
                        help="ckpt: the adapted checkpoint (--ckpt); tiny: a tiny random model (fixture tokenizer)")
    parser.add_argument("--ckpt", default=default_ckpt())
    parser.add_argument("--ar-model", default=str(REPO / "assets" / "smollm2-135m"),
                        help="the original causal LM for generative perplexity ('' to skip)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--low-threshold", type=float, default=0.7)
    parser.add_argument("--threshold-steps", type=int, default=0,
                        help="T of the threshold rows (0 = length/4; = length is Fast-dLLM's at-least-one-per-step)")
    parser.add_argument("--random-steps", default="",
                        help="comma-separated T of the 'blocks + random + dual cache' rows (default: L, 3L/4, L/2)")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nelbo-levels", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated row indices to run (0 = baseline)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default="", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "tiny":
        module, what = tiny_module(), "tiny random LLaMA (64 hidden, 2 layers), fixture tokenizer"
    else:
        if not os.path.isfile(args.ckpt):
            sys.exit(f"checkpoint '{args.ckpt}' does not exist: train the demo first, or use --model tiny")
        from lightning_dlm.training.module import load_diffusion_lm
        module, what = load_diffusion_lm(args.ckpt), args.ckpt
    judge = None  # the original causal LM, scoring the samples' text (evaluation.genppl)
    if args.model != "tiny" and args.ar_model and os.path.isdir(args.ar_model):
        from lightning_dlm.evaluation import load_evaluator
        judge = load_evaluator(args.ar_model, kind="ar")

    tok = module.tokenizer
    prompt_ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
    random_steps = [int(x) for x in args.random_steps.split(",") if x.strip()]
    rows = configs(args.length, args.block_size, args.low_threshold, args.threshold_steps, random_steps)
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        rows = [r for i, r in enumerate(rows) if i in keep]
    header = (f"device: cpu ({platform.machine()}) | torch {torch.__version__} | threads {torch.get_num_threads()}\n"
              f"model: {what}\nlength {args.length} | prompt {len(prompt_ids)} tokens | {args.num_samples} samples "
              f"in one batch | temperature {args.temperature} top-p {args.top_p} | seed {args.seed}")
    print(header, flush=True)
    with torch.inference_mode():  # warm-up (first calls allocate and pick kernels)
        generate(module, [args.prompt] * args.num_samples, length=8, steps=2, seed=args.seed)
    results = []
    for cfg in rows:
        opts = {k: v for k, v in cfg.items() if k != "name"}
        with torch.inference_mode():
            gen = generate(module, [args.prompt] * args.num_samples, length=args.length,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed, **opts)
        s = gen.stats
        t0 = time.perf_counter()
        res = dict(name=cfg["name"], config=opts, forward_passes=s.forward_passes, full_passes=s.full_passes,
                   steps=s.steps, wall_s=s.wall_time_s, tokens=s.tokens, tokens_per_s=s.tokens_per_s,
                   tokens_per_forward=s.tokens_per_forward,
                   nelbo=own_nelbo(module, prompt_ids, gen.token_ids, args.nelbo_levels),
                   gen_ppl=score_samples(judge, args.prompt, gen.texts)["gen_ppl"] if judge is not None else None,
                   distinct2=sum(distinct_n(t, 2) for t in gen.token_ids) / len(gen.token_ids),
                   entropy=sum(unigram_entropy(t) for t in gen.token_ids) / len(gen.token_ids),
                   texts=gen.texts)
        res["quality_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"  {res['name']}: {res['forward_passes']} passes, {res['wall_s']:.1f}s, "
              f"{res['tokens_per_s']:.1f} tok/s, NELBO {res['nelbo']:.3f}, gen PPL {res['gen_ppl']}, "
              f"eval {res['quality_s']:.1f}s", flush=True)

    base = results[0] if results and results[0]["config"]["strategy"] == "random" else None
    print()
    print("| configuration | forward passes (full) | wall s | tokens/s | speed-up | NELBO (nats/tok) | gen PPL | "
          "distinct-2 | entropy (bits) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        r["speedup"] = speed
        ppl = f"{r['gen_ppl']:.1f}" if r["gen_ppl"] is not None else "-"
        print(f"| {r['name']} | {r['forward_passes']} ({r['full_passes']}) | {r['wall_s']:.1f} | "
              f"{r['tokens_per_s']:.1f} | {speed:.2f}x | {r['nelbo']:.3f} | {ppl} | {r['distinct2']:.3f} | "
              f"{r['entropy']:.2f} |")
    if base:
        print()
        for proxies, what in ((("nelbo",), "the NELBO proxy"), (QUALITY, "every quality proxy")):
            best = verdict(results, proxies)
            print(f"verdict ({what}): {best['name']} runs at {best['speedup']:.2f}x the baseline within 10%" if best
                  else f"verdict ({what}): no row is >= 5x the baseline within 10%")
    out = dict(header=header, args=vars(args), results=results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
