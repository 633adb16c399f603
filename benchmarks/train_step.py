"""Training-step throughput: plain causal LM vs masked-diffusion LM on the same weights.

What it measures
----------------
Three variants of one optimiser step, on the same weights, batch, sequence length and precision:

* ``causal LM``: ``model(input_ids, labels=input_ids).loss`` -> backward -> AdamW step -> zero_grad
  (the step the pretrained model was trained with; transformers shifts the labels itself).
* ``diffusion (annealing, dense mask)``: what ``DiffusionLM.training_step`` does while the
  attention is being annealed (ratio 0.5): ``sample_t`` -> ``annealing_allowed`` (one random
  L x L mask) -> ``DiffusionLM.diffusion_terms`` (corruption, the backbone with the mask as a 4-D
  additive float mask, the LM head on the scored rows, the ELBO terms) -> backward -> AdamW step
  -> zero_grad.
* ``diffusion (after annealing)``: the same with ratio 1: no dense mask, the bidirectional kernel.

Both models use the same vocabulary (the mask token reuses an existing id), so the LM head and the
cross-entropy are the same size. The diffusion model is a deep copy of the causal one: identical
weights, separate AdamW state. After warm-up the variants run round-robin (A, B, C, A, B, C, ...) so
machine noise hits all of them equally; the table reports the median over ``--steps`` repeats and
the ratio of medians, diffusion time / causal time, against the targets (<= 1.05 after annealing,
<= 1.15 during annealing). "paired ratio" is the median over rounds of the same ratio taken within
one round, which is less sensitive to load that drifts during the run (shared machines).

How to run
----------
    python benchmarks/train_step.py                     # assets/smollm2-135m if present, else a built-in ~35M LLaMA
    python benchmarks/train_step.py --model builtin     # the built-in ~35M LLaMA-shaped model (random init)
    python benchmarks/train_step.py --model assets/smollm2-135m --steps 3 --warmup 1
    python benchmarks/train_step.py --device cuda --precision bf16 --batch-size 8 --seq-len 1024 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import transformers  # noqa: E402

from lightning_dlm.diffusion import annealing_allowed, sample_t  # noqa: E402
from lightning_dlm.model import BackboneConfig, MaskTokenConfig, resolve_hf_config  # noqa: E402
from lightning_dlm.module import DiffusionLM  # noqa: E402

DEFAULT_MODEL = REPO / "assets" / "smollm2-135m"
CAUSAL, ANNEALING, AFTER = "causal LM", "diffusion (annealing, dense mask)", "diffusion (after annealing)"
TARGETS = {ANNEALING: 1.15, AFTER: 1.05}
ANNEAL_RATIO = 0.5
EPS = 1e-3
LR = 1e-5

# A LLaMA-shaped model of ~35M parameters (tied embeddings), built from config with random init.
BUILTIN_CONFIG = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


# --- setup ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"local HF model folder (default: {DEFAULT_MODEL.relative_to(REPO)} if it exists, "
                        "else the built-in ~35M LLaMA-shaped config with random init; `builtin` forces the latter)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant before timing")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast on the device")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _short_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def backbone_config(args) -> BackboneConfig:
    """The BackboneConfig of the benchmarked model, with a reused (existing) mask id."""
    model = args.model
    if model is None and DEFAULT_MODEL.is_dir():
        model = str(DEFAULT_MODEL)
    if model == "builtin":
        model = None
    args.model_label = _short_path(model) if model else "built-in llama (random init)"
    cfg = BackboneConfig(
        pretrained=model,
        config=None if model else dict(BUILTIN_CONFIG),
        attn_implementation=args.attn,
        dtype="float32",
    )
    vocab = resolve_hf_config(cfg).vocab_size
    cfg.mask_token = MaskTokenConfig(mode="reuse", id=vocab - 1)
    return cfg


def build_models(args, device):
    """(causal HF model, DiffusionLM) with identical weights on ``device``."""
    torch.manual_seed(args.seed)
    module = DiffusionLM(backbone=backbone_config(args))
    module.configure_model()
    causal = copy.deepcopy(module.net.model)  # own config object, so is_causal can differ
    causal.config.is_causal = True
    return causal.to(device).train(), module.to(device).train()


@torch.no_grad()
def check_attention(causal, backbone, device) -> None:
    """Guard the comparison: the causal copy must be causal, the backbone bidirectional."""
    x = torch.randint(0, backbone.vocab_size, (1, 16), device=device)
    y = x.clone()
    y[0, 8] = (x[0, 8] + 1) % backbone.vocab_size
    causal_leak = not torch.allclose(causal(input_ids=x).logits[0, :8], causal(input_ids=y).logits[0, :8])
    bidir_sees = not torch.allclose(backbone(x)[0, :8], backbone(y)[0, :8])
    if causal_leak or not bidir_sees:
        raise RuntimeError(f"attention check failed: causal leaks future={causal_leak}, diffusion sees future={bidir_sees}")


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --- the steps ------------------------------------------------------------------------------------

def autocast_for(args, device) -> Callable[[], contextlib.AbstractContextManager]:
    if args.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def causal_step(model, optimizer, x0, autocast) -> torch.Tensor:
    with autocast():
        loss = model(input_ids=x0, labels=x0, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def diffusion_step(module, optimizer, x0, ratio, generator, autocast) -> torch.Tensor:
    """One step of ``DiffusionLM.training_step`` (uniform t, random annealing mask, shift, ELBO),
    through the module's own ``diffusion_terms`` (corruption, backbone, loss)."""
    batch, length = x0.shape
    with autocast():
        t = sample_t(batch, EPS, "uniform", generator, x0.device)
        allowed = annealing_allowed(length, ratio, "random", generator, x0.device)
        terms, _, _ = module.diffusion_terms(x0, None, t, allowed, generator)
        loss = terms.normalized("elbo")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_variants(args, device) -> Dict[str, Callable[[], torch.Tensor]]:
    causal, module = build_models(args, device)
    backbone = module.net
    check_attention(causal, backbone, device)
    args.params = count_params(causal)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.randint(0, backbone.vocab_size, (args.batch_size, args.seq_len), generator=gen, device=device)
    autocast = autocast_for(args, device)
    opt_causal = torch.optim.AdamW(causal.parameters(), lr=LR)
    opt_diff = torch.optim.AdamW(backbone.parameters(), lr=LR)
    return {
        CAUSAL: lambda: causal_step(causal, opt_causal, x0, autocast),
        ANNEALING: lambda: diffusion_step(module, opt_diff, x0, ANNEAL_RATIO, gen, autocast),
        AFTER: lambda: diffusion_step(module, opt_diff, x0, 1.0, gen, autocast),
    }


# --- timing ---------------------------------------------------------------------------------------

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(variants, warmup: int, steps: int, device) -> Dict[str, List[float]]:
    """Seconds per step of each variant; rounds of A, B, C, ..., the first ``warmup`` rounds dropped."""
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for round_idx in range(warmup + steps):
        for name, step in variants.items():
            sync(device)
            start = time.perf_counter()
            loss = step()
            sync(device)
            elapsed = time.perf_counter() - start
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss.item()}")
            if round_idx >= warmup:
                times[name].append(elapsed)
    return times


def summarize(times: Dict[str, List[float]], tokens: int) -> List[dict]:
    """Per variant: median/min/max ms, tokens/s, ratio of medians vs causal, and the paired ratio
    (median over rounds of t_variant / t_causal in the same round, robust to slow drifts of load)."""
    base = statistics.median(times[CAUSAL])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        target = TARGETS.get(name)
        ratio = med / base
        paired = statistics.median(t / c for t, c in zip(ts, times[CAUSAL]))
        rows.append(dict(
            variant=name, ms_median=1e3 * med, ms_min=1e3 * min(ts), ms_max=1e3 * max(ts),
            tokens_per_s=tokens / med, ratio=ratio, paired_ratio=paired, target=target,
            meets_target=None if target is None else ratio <= target, times_s=ts,
        ))
    return rows


# --- report ---------------------------------------------------------------------------------------

def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def header(args, device) -> str:
    return "\n".join([
        f"device: {device_name(device)} | torch {torch.__version__} | transformers {transformers.__version__} "
        f"| threads {torch.get_num_threads()}",
        f"model: {args.model_label} | params {args.params / 1e6:.1f}M | attn {args.attn} | precision {args.precision}",
        f"batch {args.batch_size} x seq_len {args.seq_len} = {args.batch_size * args.seq_len} tokens/step "
        f"| warmup {args.warmup} | {args.steps} timed steps per variant, round-robin",
    ])


def table(rows: List[dict]) -> str:
    cols = ["variant", "ms/step (median)", "min-max ms", "tokens/s", "ratio vs causal", "paired ratio", "target", "ok"]
    lines = []
    for r in rows:
        lines.append([
            r["variant"], f"{r['ms_median']:.1f}", f"{r['ms_min']:.0f}-{r['ms_max']:.0f}", f"{r['tokens_per_s']:.0f}",
            f"{r['ratio']:.3f}", f"{r['paired_ratio']:.3f}", "-" if r["target"] is None else f"<= {r['target']:.2f}",
            "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO"),
        ])
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cols), sep, *(fmt(line) for line in lines)])


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    variants = make_variants(args, device)
    times = time_round_robin(variants, args.warmup, args.steps, device)
    rows = summarize(times, args.batch_size * args.seq_len)
    print(header(args, device))
    print(table(rows))
    if args.json:
        info = {k: v for k, v in vars(args).items() if k not in ("json",)}
        payload = dict(device=device_name(device), torch=torch.__version__, transformers=transformers.__version__,
                       threads=torch.get_num_threads(), args=info, rows=rows)
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return rows


if __name__ == "__main__":
    main()
