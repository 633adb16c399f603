"""Training-step throughput: plain causal LM vs masked-diffusion LM on the same weights.

What it measures
----------------
Variants of one optimiser step, on the same weights, batch, sequence length and precision
(``--variants`` picks them; the default is the first three):

* ``causal LM``: ``model(input_ids, labels=input_ids).loss`` -> backward -> AdamW step -> zero_grad
  (the step the pretrained model was trained with; transformers shifts the labels itself).
* ``diffusion (annealing, dense mask)``: what ``DiffusionLM.training_step`` does while the
  attention is being annealed (ratio 0.5): ``sample_t`` -> ``annealing_mask`` (a seeded hash
  mask, here made dense: one L x L boolean) -> ``DiffusionObjective.diffusion_terms`` (corruption, the
  backbone with the mask as a 4-D additive float mask, the LM head on the scored rows, the ELBO
  terms) -> backward -> AdamW step -> zero_grad.
* ``diffusion (after annealing)``: the same with ratio 1: no dense mask, the bidirectional kernel
  (``--attn``, sdpa by default).
* ``diffusion (annealing, flex_attention)`` (``anneal-flex``): the annealing step on a copy with
  ``attn_implementation: flex_attention``: the same mask as a FlexAttention ``BlockMask``,
  evaluated inside the kernel (no L x L mask).
* ``diffusion (after annealing, flex_attention)`` (``after-flex``): that copy at ratio 1 (a full
  ``BlockMask``).
* ``block diffusion (2L pass, dense mask)`` (``block-dense``): a block-mode step (blocks of 32,
  one t per block): the noised and the clean copy side by side, 2L positions, under the dense
  three-part mask; ``block-flex``: the same on the flex copy (a BlockMask from ``block_mask_mod``).
  About twice the positions of a bidirectional step: its ratio to the AR step is reported, with
  no target.

* issue 23's variants: ``causal-compiled`` / ``after-compiled`` (each decoder layer compiled,
  ``--compile-backend``), ``causal-liger`` / ``after-liger`` (Liger's RMSNorm and SwiGLU modules;
  the diffusion step also with the fused row cross-entropy), ``causal-compiled-liger`` /
  ``after-compiled-liger`` (both), ``anneal-dense-right`` / ``anneal-flex-right`` (the annealing
  step with the ``right_context`` mask). Every variant's AdamW is the one training builds
  (``fused=True`` on CUDA).

PyTorch's FlexAttention has no backward pass on the CPU: there the flex variants run only with
``--forward-only`` (every variant then times forward + loss under ``torch.no_grad()``), and
transformers compiles the flex kernel for the CPU on first use (during warm-up; ``--flex-eager``
runs the unfused reference instead). CPU numbers of the flex path say little about a GPU.

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
    python benchmarks/train_step.py --device cuda --precision bf16 --seq-len 2048 --variants all   # attention paths
    python benchmarks/train_step.py --model builtin --variants all --forward-only --steps 2 --warmup 1  # CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
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

from lightning_dlm.core import annealing_mask, sample_t  # noqa: E402
from lightning_dlm.core.blocks import block_times  # noqa: E402
from lightning_dlm.model import BackboneConfig, MaskTokenConfig, resolve_hf_config  # noqa: E402
from lightning_dlm.objectives.block import block_loss_terms  # noqa: E402
from lightning_dlm.training.module import DiffusionLM  # noqa: E402
from lightning_dlm.training.optim import fused_adamw  # noqa: E402

DEFAULT_MODEL = REPO / "assets" / "smollm2-135m"
CAUSAL, ANNEALING, AFTER = "causal LM", "diffusion (annealing, dense mask)", "diffusion (after annealing)"
ANNEALING_FLEX, AFTER_FLEX = "diffusion (annealing, flex_attention)", "diffusion (after annealing, flex_attention)"
BLOCK, BLOCK_FLEX = "block diffusion (2L pass, dense mask)", "block diffusion (2L pass, flex_attention)"
CAUSAL_COMPILED, AFTER_COMPILED = "causal LM, compiled layers", "diffusion (after annealing), compiled layers"
CAUSAL_LIGER, AFTER_LIGER = "causal LM, Liger kernels", "diffusion (after annealing), Liger kernels + fused row CE"
AFTER_COMPILED_LIGER = "diffusion (after annealing), compiled + Liger"
CAUSAL_COMPILED_LIGER = "causal LM, compiled + Liger"
ANNEALING_RIGHT = "diffusion (annealing, dense mask, right_context)"
ANNEALING_FLEX_RIGHT = "diffusion (annealing, flex_attention, right_context)"
BLOCK_SIZE = 32
# --variants keys -> table names
VARIANTS = {
    "causal": CAUSAL,
    "anneal-dense": ANNEALING,
    "after": AFTER,
    "anneal-flex": ANNEALING_FLEX,
    "after-flex": AFTER_FLEX,
    "block-dense": BLOCK,
    "block-flex": BLOCK_FLEX,
    # issue 23: compiled decoder layers, Liger's fused kernels, the annealing mask kinds on flex
    "causal-compiled": CAUSAL_COMPILED,
    "after-compiled": AFTER_COMPILED,
    "causal-liger": CAUSAL_LIGER,
    "after-liger": AFTER_LIGER,
    "after-compiled-liger": AFTER_COMPILED_LIGER,
    "causal-compiled-liger": CAUSAL_COMPILED_LIGER,
    "anneal-dense-right": ANNEALING_RIGHT,
    "anneal-flex-right": ANNEALING_FLEX_RIGHT,
}
#: variants that need Liger-Kernel (CUDA only)
LIGER_KEYS = ("causal-liger", "after-liger", "after-compiled-liger", "causal-compiled-liger")
DEFAULT_VARIANTS = "causal,anneal-dense,after"
TARGETS = {ANNEALING: 1.15, AFTER: 1.05, ANNEALING_FLEX: 1.15, AFTER_FLEX: 1.05}
ANNEAL_RATIO = 0.5
EPS = 1e-3
LR = 1e-5

# Shapes built from config with random init (no weights needed): --shape picks one.
SHAPES = {
    # A LLaMA-shaped model of ~35M parameters (tied embeddings).
    "builtin": dict(
        model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    # SmolLM2-135M's architecture (LLaMA, 30 layers, hidden 576, GQA 9/3, vocab 49152, tied).
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    # A ~1.1B LLaMA (TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA 32/4, vocab 32000).
    "llama-1b": dict(
        model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # llama-1b with Llama-3's 128K vocabulary: where the LM head's logits dominate the memory
    "llama-1b-128k": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # A tiny LLaMA for dry runs on the CPU.
    "tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


# --- setup ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"local HF model folder (default: {DEFAULT_MODEL.relative_to(REPO)} if it exists, "
                        "else the built-in ~35M LLaMA-shaped config with random init; `builtin` forces the latter)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="build this architecture from config with random init instead of loading --model "
                        "(smollm2-135m, llama-1b: the GPU suite's shapes; tiny: CPU dry runs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant before timing")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast on the device")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="attention of the causal and dense-mask variants (the flex ones use flex_attention)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)}, or `all` (causal is always run: the ratios' base)")
    p.add_argument("--anneal-mask", choices=["random", "right_context"], default="random",
                   help="annealing mask of the annealing variants (right_context is block-sparse for flex)")
    p.add_argument("--forward-only", action="store_true",
                   help="time forward + loss under no_grad (no backward / optimiser step); needed for flex on the CPU")
    p.add_argument("--flex-eager", action="store_true",
                   help="run FlexAttention unfused (torch.compiler.set_stance('force_eager')) instead of compiled")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the *-compiled variants (eager: traced only, a quick CPU check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def pick_variants(spec: str) -> List[str]:
    """The --variants keys, in table order, causal first (the base of every ratio)."""
    keys = list(VARIANTS) if spec == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)} or all")
    return [k for k in VARIANTS if k in keys or k == "causal"]


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
    shape = getattr(args, "shape", None)
    if shape is not None:
        model = None
    elif model is None and DEFAULT_MODEL.is_dir():
        model = str(DEFAULT_MODEL)
    if model == "builtin":
        model, shape = None, "builtin"
    shape = shape or "builtin"
    args.model_label = _short_path(model) if model else f"{shape} shape (random init)"
    cfg = BackboneConfig(
        pretrained=model,
        config=None if model else dict(SHAPES[shape]),
        attn_implementation=args.attn,
        dtype="float32",
    )
    vocab = resolve_hf_config(cfg).vocab_size
    cfg.mask_token = MaskTokenConfig(mode="reuse", id=vocab - 1)
    return cfg


def build_models(args, device, flex: bool):
    """(causal HF model, DiffusionLM, flex_attention DiffusionLM or None) with identical weights."""
    torch.manual_seed(args.seed)
    cfg = backbone_config(args)
    module = DiffusionLM(backbone=cfg)
    module.configure_model()
    causal = copy.deepcopy(module.net.model)  # own config object, so is_causal can differ
    causal.config.is_causal = True
    flexed = None
    if flex:
        flexed = DiffusionLM(backbone=dataclasses.replace(cfg, attn_implementation="flex_attention"))
        flexed.configure_model()
        flexed.net.load_state_dict(module.net.state_dict())
        flexed = flexed.to(device).train()
    return causal.to(device).train(), module.to(device).train(), flexed


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


def _update(loss, optimizer) -> None:
    """backward -> AdamW step -> zero_grad (nothing with --forward-only: ``optimizer`` is None)."""
    if optimizer is None:
        return
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def causal_step(model, optimizer, x0, autocast) -> torch.Tensor:
    with autocast():
        loss = model(input_ids=x0, labels=x0, use_cache=False).loss
    _update(loss, optimizer)
    return loss


def diffusion_step(module, optimizer, x0, ratio, generator, autocast, mask_kind="random") -> torch.Tensor:
    """One step of ``DiffusionLM.training_step`` (uniform t, a freshly seeded annealing mask,
    shift, ELBO), through the objective's own ``diffusion_terms`` (corruption, backbone, loss)."""
    batch = x0.shape[0]
    with autocast():
        t = sample_t(batch, EPS, "uniform", generator, x0.device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x0.device).item())
        allowed = annealing_mask(mask_kind, ratio, seed)  # dense for sdpa / eager, a BlockMask for flex
        terms, _, _ = module.objective_impl.diffusion_terms(module.net, x0, None, t, allowed, generator)
        loss = terms.normalized("elbo")
    _update(loss, optimizer)
    return loss


def block_step(module, optimizer, x0, generator, autocast) -> torch.Tensor:
    """One block-mode step (``diffusion.attention: block``, blocks of BLOCK_SIZE, one t per block):
    the noised and the clean copy side by side, 2L positions, the three-part mask (dense for
    sdpa, a BlockMask from ``block_mask_mod`` for flex_attention)."""
    batch, length = x0.shape
    with autocast():
        t_pos = block_times(batch, length, BLOCK_SIZE, True,
                            lambda n: sample_t(n, EPS, "uniform", generator, x0.device))
        terms, _, _ = block_loss_terms(module.net, x0, t_pos, module.schedule, BLOCK_SIZE, True, generator)
        loss = terms.normalized("elbo")
    _update(loss, optimizer)
    return loss


def variant_copies(keys, causal, module, device, backend: str):
    """The compiled / Liger copies of the causal model and the diffusion module the keys need
    (deep copies: the same weights, their own optimiser state)."""
    from lightning_dlm.model.compiled import compile_decoder_layers
    from lightning_dlm.model.fused_kernels import apply_liger, swap_liger_modules

    copies = {}
    for key, liger, compiled in (("causal-compiled", False, True), ("causal-liger", True, False),
                                 ("causal-compiled-liger", True, True)):
        if key in keys:
            copies[key] = copy.deepcopy(causal)
            if liger:
                swap_liger_modules(copies[key])
            if compiled:
                compile_decoder_layers(copies[key], device, backend)
    for key, liger, compiled in (("after-compiled", False, True), ("after-liger", True, False),
                                 ("after-compiled-liger", True, True)):
        if key in keys:
            copies[key] = copy.deepcopy(module)
            if liger:
                apply_liger(copies[key].net, device)
            if compiled:
                compile_decoder_layers(copies[key].net.model, device, backend)
    return copies


def make_variants(args, device) -> Dict[str, Callable[[], torch.Tensor]]:
    keys = pick_variants(args.variants)
    flex = any("flex" in k for k in keys)
    if flex and device.type == "cpu" and not args.forward_only:
        raise SystemExit("error: PyTorch's FlexAttention has no backward pass on the CPU: add --forward-only, "
                         "or run the flex variants with --device cuda")
    causal, module, flexed = build_models(args, device, flex)
    backbone = module.net
    with flex_stance(args):
        check_attention(causal, backbone, device)
        if flexed is not None:
            check_attention(causal, flexed.net, device)
    args.params = count_params(causal)
    copies = variant_copies(keys, causal, module, device, getattr(args, "compile_backend", "inductor"))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.randint(0, backbone.vocab_size, (args.batch_size, args.seq_len), generator=gen, device=device)
    autocast = autocast_for(args, device)
    # the optimiser training builds: fused AdamW on CUDA (lightning_dlm.training.optim.fused_adamw)
    optimizer = (lambda model: None) if args.forward_only else (
        lambda model: torch.optim.AdamW(model.parameters(), lr=LR, fused=fused_adamw(model.parameters())))
    opt_causal, opt_diff = optimizer(causal), optimizer(backbone)
    opt_flex = optimizer(flexed.net) if flexed is not None else None
    opts = {k: optimizer(m if k.startswith("causal") else m.net) for k, m in copies.items()}
    kind = args.anneal_mask
    steps = {
        "causal": lambda: causal_step(causal, opt_causal, x0, autocast),
        "anneal-dense": lambda: diffusion_step(module, opt_diff, x0, ANNEAL_RATIO, gen, autocast, kind),
        "after": lambda: diffusion_step(module, opt_diff, x0, 1.0, gen, autocast, kind),
        "anneal-flex": lambda: diffusion_step(flexed, opt_flex, x0, ANNEAL_RATIO, gen, autocast, kind),
        "after-flex": lambda: diffusion_step(flexed, opt_flex, x0, 1.0, gen, autocast, kind),
        "block-dense": lambda: block_step(module, opt_diff, x0, gen, autocast),
        "block-flex": lambda: block_step(flexed, opt_flex, x0, gen, autocast),
        "anneal-dense-right": lambda: diffusion_step(module, opt_diff, x0, ANNEAL_RATIO, gen, autocast, "right_context"),
        "anneal-flex-right": lambda: diffusion_step(flexed, opt_flex, x0, ANNEAL_RATIO, gen, autocast, "right_context"),
    }
    for key, model in copies.items():
        if key.startswith("causal"):
            steps[key] = lambda m=model, o=opts[key]: causal_step(m, o, x0, autocast)
        else:
            steps[key] = lambda m=model, o=opts[key]: diffusion_step(m, o, x0, 1.0, gen, autocast, kind)
    return {VARIANTS[k]: in_context(steps[k], args) for k in keys}


def in_context(step: Callable[[], torch.Tensor], args) -> Callable[[], torch.Tensor]:
    """The step under no_grad (--forward-only) and the flex stance (--flex-eager)."""
    def run() -> torch.Tensor:
        with torch.no_grad() if args.forward_only else contextlib.nullcontext(), flex_stance(args):
            return step()

    return run


def flex_stance(args) -> contextlib.AbstractContextManager:
    """--flex-eager: torch.compile'd functions (transformers' flex_attention) run unfused and eager."""
    return torch.compiler.set_stance("force_eager") if args.flex_eager else contextlib.nullcontext()


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


def summarize(times: Dict[str, List[float]], tokens: int, targets: Dict[str, float] = TARGETS) -> List[dict]:
    """Per variant: median/min/max ms, tokens/s, ratio of medians vs causal, and the paired ratio
    (median over rounds of t_variant / t_causal in the same round, robust to slow drifts of load)."""
    base = statistics.median(times[CAUSAL])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        target = targets.get(name)
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
        f"measured: {'forward + loss under no_grad (--forward-only)' if args.forward_only else 'full training step'} "
        f"| annealing: {args.anneal_mask} mask at ratio {ANNEAL_RATIO} "
        f"| flex_attention {'eager (unfused)' if args.flex_eager else 'compiled by transformers'}",
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
    # the targets are for the training step; a forward-only run has none
    rows = summarize(times, args.batch_size * args.seq_len, {} if args.forward_only else TARGETS)
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
