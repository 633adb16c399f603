"""The GPU suite: every GPU path of lightning_dlm checked and measured in one command.

GPU time comes rarely and briefly (about 15 minutes on one H100 or H200, on a machine with no
network and without ``datasets``, ``jsonargparse`` or ``omegaconf``), so everything that needs a
GPU runs from this one script, in parts; a part that fails is reported in one line and the rest
still runs:

1. ``tests``: the CUDA tests (``pytest -m cuda``): FlexAttention forward and backward against the
   dense-mask SDPA path, ratios 0 / 0.5 / 1, both annealing-mask kinds, padding and documents,
   fp32 and bf16; the block mode's 2L pass on FlexAttention against its dense three-part mask.
   A failure here is a parity failure: the suite exits 1.
2. ``train``: one optimiser step, bf16 autocast, for the SmolLM2-135M shape and a ~1.1B LLaMA
   shape (built from config, no weights), batch sized to fill the GPU: the plain causal-LM step,
   the diffusion step with the dense annealing mask, with FlexAttention annealing, after
   annealing (SDPA, bidirectional), after annealing on FlexAttention, and the block-diffusion
   step (2L positions, blocks of 32) on the dense mask and on FlexAttention. Tokens/s, the ratio to
   the AR step, MFU (FLOPs counted by the throughput callback's counter, peak from its table:
   FlexAttention steps take the FLOPs of their SDPA twin, the same arithmetic), peak memory.
   Targets: after annealing >= 0.97x the AR step's tokens/s, FlexAttention annealing >= 0.90x,
   MFU >= 40 % for the 1B shape.
3. ``sample``: the SmolLM2 shape in bf16, length 256, batch 1 and 16: the one-pass-per-token
   random-order baseline, the fastest fixed-cost cached configuration (blocks of 32, dual
   cache, random order, T = L/2), the same weights as a block model (blocks of 32, exact KV
   cache) at 32 and 8 steps a block (1 and up to 4 tokens a pass), and transformers' AR
   ``generate`` with a KV cache.
4. ``fit``: a few steps of ``dlm fit`` through the CLI (the path a user takes), SmolLM2 shape,
   ``bf16-mixed``, FlexAttention, annealing then bidirectional, with validation and a checkpoint.

Issue 23's parts and rows (``--new-rows`` runs only these, sized for one lease):

5. ``decode``: block decoding eager against CUDA graphs (``graphs=True``), against AR
   ``generate`` eager and ``generate(cache_implementation="static")`` with transformers' compiled
   forward (benchmarks/decode_graphs.py); the quality rows on the micro world's shipped AR and
   block models (experiments/micro/model, experiments/micro/block_model).
6. ``fsdp2``: ``dlm fit --trainer.strategy fsdp2`` on one device.
7. ``flex``: the BlockMask's full / partial / empty blocks of each annealing mask kind at the
   training length, and the annealing step of each kind on FlexAttention and on the dense mask.
8. the train part's groups (``--train-groups``): ``base`` (the rows above), ``compiled`` (eager vs
   compiled decoder layers), ``liger`` (Liger's RMSNorm / SwiGLU and the fused row CE), ``fused``
   (compiled + Liger; with fused AdamW, the 1B MFU target >= 45 %), ``memory`` (peak memory per
   token at a 128K vocabulary, fused row CE vs the plain LM head, target <= 0.7x). Liger rows
   are listed as skipped without CUDA or liger-kernel; the dry run traces the compiled variants.

Tables are printed as markdown and written with a JSON of every figure to ``--out``. Exit
status: 0 all passed, 1 a parity check failed, 2 a part failed to run.

``--dry-run`` runs the same code on the CPU with tiny shapes (FlexAttention has no CPU backward,
so its training variants and the flex fit are left out there); ``make test`` runs it.

    python benchmarks/gpu_suite.py --out /tmp/gpu_suite                  # on a GPU
    python benchmarks/gpu_suite.py --out /tmp/gpu_suite --dry-run        # anywhere, ~1 min
    python benchmarks/gpu_suite.py --out DIR --parts train,sample        # some parts

On the lent GPU machine: ``make gpu-wheels`` here (downloads the missing packages' wheels into
``.whl/``), then carry ``.whl`` and run ``benchmarks/run_gpu_suite.sh``, which installs them
offline and runs this script.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_step  # noqa: E402

PARTS = ("tests", "sample", "decode", "fit", "fsdp2", "flex", "train")  # the longest last: a run cut short keeps the others
#: issue 23's rows, in one command (``--new-rows``): the parts, the train groups and the shape
NEW_ROWS = dict(parts=("tests", "decode", "fsdp2", "flex", "train"), train_groups="compiled,liger,fused,memory",
                shapes="llama-1b,llama-1b-128k", tests_files="test_cuda_kernels.py", decode_batches="1",
                train_steps=4, train_warmup=2)
TINY_TOKENIZER = REPO / "data" / "fixtures" / "tiny_tokenizer"
TINY_CORPUS = REPO / "data" / "fixtures" / "tiny_corpus.txt"
TINY_CORPUS_VAL = REPO / "data" / "fixtures" / "tiny_corpus_val.txt"
# Packages the lent GPU machine lacks, by the part that needs them (make gpu-wheels fetches them).
NEEDS = {"fit": ("datasets", "jsonargparse", "omegaconf"), "fsdp2": ("datasets", "jsonargparse", "omegaconf")}
TARGET_AFTER, TARGET_ANNEAL_FLEX, TARGET_MFU_1B = 0.97, 0.90, 0.40
TARGET_MFU_1B_FUSED, TARGET_FUSED_CE_MEMORY, TARGET_GRAPHS = 0.45, 0.7, 3.0


# --- plumbing ---------------------------------------------------------------------------------------

class PartError(Exception):
    """A part could not run; the message is the one line reported."""


@dataclass
class Part:
    name: str
    status: str = "not run"  # passed | failed (a check failed) | error (could not run) | skipped
    seconds: float = 0.0
    tables: List[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def markdown(header: List[str], rows: List[List[object]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def missing_packages(part: str) -> List[str]:
    return [name for name in NEEDS.get(part, ()) if importlib.util.find_spec(name) is None]


def environment(device: torch.device) -> dict:
    import transformers

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                device=device.type, host=platform.node())
    for name in ("lightning", "datasets", "jsonargparse", "omegaconf", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not raised
            info[name] = "missing"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    sms=props.multi_processor_count)
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def child_env() -> dict:
    """The environment of the suite's subprocesses: this checkout importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# --- part 1: the CUDA tests -----------------------------------------------------------------------

def part_tests(args, device, part: Part) -> None:
    xml = Path(args.out) / "cuda_tests.xml"
    # Only the CUDA test module: the others import packages a GPU machine may lack (datasets).
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "addopts=", *(str(REPO / "tests" / name) for name in args.tests_files.split(","))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.tests_timeout, env=child_env())
    (Path(args.out) / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    if not xml.exists():
        raise PartError(f"pytest wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-300:]}")
    import xml.etree.ElementTree as ET

    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(xml).iter("testcase"):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "").splitlines()[0][:120] if node.get("message") else ""
        counts[outcome] += 1
        rows.append([case.get("name"), outcome, f"{float(case.get('time', 0)):.1f}", message])
    part.tables.append(markdown(["CUDA test", "outcome", "s", "message"], rows))
    part.figures.update(counts, exit_code=proc.returncode, tests={r[0]: r[1] for r in rows})
    if counts["failed"] or proc.returncode not in (0, 5):
        part.status = "failed"
    elif counts["passed"] == 0:
        part.status = "skipped"
        part.notes.append("no CUDA test ran (no GPU): they were collected and skipped")
    else:
        part.status = "passed"


# --- part 2: the training step --------------------------------------------------------------------

VARIANT_KEYS = ["causal", "anneal-dense", "anneal-flex", "after", "after-flex", "block-dense", "block-flex"]
#: the train part's groups of step variants (each with the causal step, the ratios' base), on a GPU
#: and in the CPU dry run (no FlexAttention backward there: its variants run in the flex part)
TRAIN_GROUPS = {
    "base": VARIANT_KEYS,
    "compiled": ["causal", "causal-compiled", "after", "after-compiled"],
    "liger": ["causal", "causal-liger", "after-liger"],
    "fused": ["causal", "causal-compiled-liger", "after-compiled-liger"],  # the MFU target's step
    "memory": ["causal", "after", "after-liger"],
}
TRAIN_GROUPS_CPU = dict(TRAIN_GROUPS, base=["causal", "anneal-dense", "after", "block-dense"])
# flex steps: the SDPA twin's count
FLOP_TWIN = {"anneal-flex": "anneal-dense", "after-flex": "after", "block-flex": "block-dense"}


def step_args(shape: str, batch: int, seq_len: int, keys: List[str], device, steps: int, warmup: int):
    argv = ["--shape", shape, "--batch-size", str(batch), "--seq-len", str(seq_len), "--variants", ",".join(keys),
            "--device", str(device), "--precision", "bf16" if device.type == "cuda" else "fp32",
            "--steps", str(steps), "--warmup", str(warmup)]
    return train_step.parse_args(argv)


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one step (forward + backward), counted by the throughput callback's counter."""
    from lightning_dlm.training.callbacks.throughput import FlopCounter

    with FlopCounter() as counter:
        step()
    return counter.total


def peak_memory(step: Callable[[], torch.Tensor], device) -> Optional[float]:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def fit_batch(shape: str, seq_len: int, device, candidates: List[int]) -> int:
    """The largest batch whose hungriest steps (the AR step's full logits, the dense annealing
    mask, the block step's 2L positions) run within 85 % of the GPU's memory."""
    if device.type != "cuda":
        return candidates[-1]
    total = torch.cuda.get_device_properties(device).total_memory
    for batch in candidates:
        free_memory()
        try:
            keys = ["causal", "anneal-dense", "block-dense"]
            variants = train_step.make_variants(step_args(shape, batch, seq_len, keys, device, 1, 0), device)
            peaks = []
            for name in (train_step.CAUSAL, train_step.ANNEALING, train_step.BLOCK):
                if name in variants:
                    variants[name]()
                    peaks.append(peak_memory(variants[name], device))
            del variants
            if max(peaks) * 2**30 <= 0.85 * total:
                return batch
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
        free_memory()
    raise PartError(f"shape {shape} at seq_len {seq_len} does not fit the GPU's memory even at batch {candidates[-1]}")


def measure_variants(shape: str, batch: int, seq_len: int, keys: List[str], device, args, peak,
                     forward_only: bool = False) -> List[dict]:
    """Time, count and weigh the step variants ``keys`` (causal added: the ratios' base) on one
    copy of the weights: one dict per variant."""
    targs = step_args(shape, batch, seq_len, keys, device, args.train_steps, args.train_warmup)
    targs.forward_only = forward_only
    targs.compile_backend = args.compile_backend
    targs.flex_eager = forward_only and device.type == "cpu"  # the dry run: FlexAttention unfused, not compiled
    variants = train_step.make_variants(targs, device)
    names = {v: k for k, v in train_step.VARIANTS.items()}
    flops = {}
    for name, step in variants.items():
        key = names[name]
        if key not in FLOP_TWIN and not forward_only:
            flops[key] = count_flops(step)
    memory = {names[name]: peak_memory(step, device) for name, step in variants.items()}
    times = train_step.time_round_robin(variants, targs.warmup, targs.steps, device)
    summary = train_step.summarize(times, batch * seq_len, {})
    base = next(r for r in summary if r["variant"] == train_step.CAUSAL)
    out = []
    for r in summary:
        key = names[r["variant"]]
        step_flops = flops.get(FLOP_TWIN.get(key, key))
        mfu = step_flops / (r["ms_median"] / 1e3) / peak if (step_flops and peak) else None
        mem = memory.get(key)
        out.append(dict(key=key, variant=r["variant"], batch=batch, seq_len=seq_len, tokens_per_s=r["tokens_per_s"],
                        ms_median=r["ms_median"], speed_vs_ar=base["ms_median"] / r["ms_median"],
                        paired_ratio=r["paired_ratio"], flops_per_step=step_flops, mfu=mfu, peak_memory_gib=mem,
                        peak_mib_per_token=None if mem is None else mem * 1024 / (batch * seq_len),
                        params=targs.params, status="measured"))
    del variants
    free_memory()
    return out


def train_plan(args, gpu: bool):
    """(shape, seq_len, batch candidates, group) rows of the train part, in order."""
    groups = [g for g in args.train_groups.split(",") if g]
    unknown = [g for g in groups if g not in TRAIN_GROUPS]
    if unknown:
        raise PartError(f"unknown train group(s) {', '.join(unknown)}: choose from {', '.join(TRAIN_GROUPS)}")
    shapes = ([("smollm2-135m", 2048, [16, 8, 4]), ("llama-1b", 2048, [8, 4, 2, 1])] if gpu
              else [("tiny", 64, [2])])
    if args.shapes and gpu:  # the dry run always runs its one tiny shape
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    plan = [(shape, seq, cands, group) for shape, seq, cands in shapes for group in groups if group != "memory"]
    if "memory" in groups:  # the 128K-vocabulary shape: the fused row CE's memory against the plain head
        plan.append(("llama-1b-128k", 2048, [4, 2, 1]) + ("memory",) if gpu else ("tiny", 64, [2], "memory"))
    return plan


def part_train(args, device, part: Part) -> None:
    """The training step: AR against diffusion, eager against compiled layers against Liger kernels
    (groups ``base``, ``compiled``, ``liger``, ``memory``), tokens/s, MFU, peak memory per token."""
    from lightning_dlm.training.callbacks.throughput import device_peak_flops

    gpu = device.type == "cuda"
    if not gpu:
        part.notes.append("dry run: FlexAttention has no backward on the CPU (its variants run in the flex part, "
                          "forward only); compiled variants are traced (backend eager), not code-generated")
    peak = device_peak_flops(device, torch.bfloat16 if gpu else torch.float32)
    liger_ok = gpu and importlib.util.find_spec("liger_kernel") is not None
    rows, ok, batches = [], True, {}
    for shape, seq_len, candidates, group in train_plan(args, gpu):
        keys = list(TRAIN_GROUPS[group] if gpu else TRAIN_GROUPS_CPU[group])
        skipped = [k for k in keys if k in train_step.LIGER_KEYS and not liger_ok]
        keys = [k for k in keys if k not in skipped]
        for key in skipped:
            why = "needs CUDA" if not gpu else "liger-kernel not installed (make gpu-wheels carries it)"
            part.figures.setdefault(shape, {})[key] = dict(status=f"skipped: {why}")
            rows.append([shape, group, "-", train_step.VARIANTS[key], "-", "-", "-", "-", "-", "-", f"skipped: {why}"])
        if not [k for k in keys if k != "causal"]:
            continue
        free_memory()
        try:
            if shape not in batches:  # the memory group's shape runs at its first batch (memory is the figure)
                batches[shape] = candidates[0] if group == "memory" else fit_batch(shape, seq_len, device, candidates)
            measured = measure_variants(shape, batches[shape], seq_len, keys, device, args, peak)
        except PartError as err:
            part.notes.append(str(err))
            ok = False
            continue
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            part.notes.append(f"shape {shape} ({group}): out of GPU memory at batch {batches.get(shape)} x {seq_len}")
            ok = False
            free_memory()
            continue
        for r in measured:
            key = r["key"]
            if key == "causal" and key in part.figures.get(shape, {}):
                continue  # the base of every group: reported once
            target = {"after": TARGET_AFTER, "after-flex": TARGET_AFTER, "anneal-flex": TARGET_ANNEAL_FLEX}.get(key)
            meets = None if target is None or not gpu else r["speed_vs_ar"] >= target
            part.figures.setdefault(shape, {}).setdefault(key, dict(r, target=target, meets_target=meets, group=group))
            part.figures[shape].setdefault("groups", {})[group] = [m["key"] for m in measured]
            rows.append([shape, group, f"{r['batch']}x{seq_len}", r["variant"], r["tokens_per_s"], f"{r['speed_vs_ar']:.3f}",
                         "-" if target is None else f">= {target}", "-" if meets is None else ("yes" if meets else "NO"),
                         "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                         "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}",
                         "-" if r["peak_mib_per_token"] is None else f"{r['peak_mib_per_token']:.3f}"])
    for shape, figures in part.figures.items():
        if gpu and shape == "llama-1b":
            best = max(((f.get("mfu") or 0) for f in figures.values() if isinstance(f, dict) and "mfu" in f), default=0)
            figures["mfu_target_met"] = best >= TARGET_MFU_1B_FUSED
        plain, fused = figures.get("after", {}), figures.get("after-liger", {})
        if plain.get("peak_mib_per_token") and fused.get("peak_mib_per_token"):
            figures["fused_ce_memory_ratio"] = fused["peak_mib_per_token"] / plain["peak_mib_per_token"]
            part.notes.append(f"{shape}: peak memory per token, Liger + fused row CE / plain: "
                              f"{figures['fused_ce_memory_ratio']:.2f} (target <= {TARGET_FUSED_CE_MEMORY} at 128K vocab)")
    part.tables.append(markdown(
        ["shape", "group", "batch", "step", "tokens/s", "x AR", "target", "ok", "MFU", "peak GiB", "peak MiB/token"],
        rows))
    if peak is None:
        part.notes.append(f"no peak FLOP/s known for {device.type}: MFU not computed")
    else:
        part.notes.append(f"MFU against a peak of {peak / 1e12:.0f} TFLOP/s per device (bf16 dense)")
    part.status = "passed" if ok else "error"


# --- the flex part: FlexAttention annealing by mask kind -----------------------------------------

FLEX_KINDS = ("random", "right_context")


def part_flex(args, device, part: Part) -> None:
    """FlexAttention annealing by mask kind: the BlockMask's full / partial / empty blocks of each
    kind at the training length, and the annealing step of each kind on flex and on the dense mask,
    against the AR step (target: flex annealing >= 0.9x AR)."""
    from lightning_dlm.core.annealing import annealing_mask
    from lightning_dlm.model.flex_masks import block_counts, flex_block_mask
    from lightning_dlm.training.callbacks.throughput import device_peak_flops

    gpu = device.type == "cuda"
    length = 2048 if gpu else 1024
    rows = []
    for kind in FLEX_KINDS:
        for ratio in (0.25, 0.5, 0.75):
            counts = block_counts(flex_block_mask(1, length, annealing_mask(kind, ratio, 1234), device=device))
            rows.append([kind, ratio, length, counts["full"], counts["partial"], counts["empty"],
                         f"{(counts['full'] + counts['partial']) / counts['total']:.2f}",
                         f"{counts['partial'] / counts['total']:.2f}"])
            part.figures.setdefault("blocks", {})[f"{kind}@{ratio}"] = counts
    part.tables.append(markdown(["mask", "ratio", "L", "full blocks", "partial (mask_mod per score)", "empty (skipped)",
                                 "share computed", "share masked"], rows))
    shape, seq_len, batch = ("llama-1b", 2048, 8) if gpu else ("tiny", 64, 2)
    if args.shapes and gpu:
        shape = next((s for s in ("llama-1b", "smollm2-135m") if s in args.shapes.split(",")), shape)
        batch = 16 if shape == "smollm2-135m" else batch
    keys = ["causal", "anneal-dense", "anneal-flex", "anneal-dense-right", "anneal-flex-right"]
    peak = device_peak_flops(device, torch.bfloat16 if gpu else torch.float32)
    measured = measure_variants(shape, batch, seq_len, keys, device, args, peak, forward_only=not gpu)
    steps, ok = [], True
    for r in measured:
        target = TARGET_ANNEAL_FLEX if r["key"] in ("anneal-flex", "anneal-flex-right") else None
        meets = None if target is None or not gpu else r["speed_vs_ar"] >= target
        part.figures.setdefault("steps", {})[r["key"]] = dict(r, target=target, meets_target=meets)
        steps.append([shape, f"{batch}x{seq_len}", r["variant"], r["tokens_per_s"], f"{r['speed_vs_ar']:.3f}",
                      "-" if target is None else f">= {target}", "-" if meets is None else ("yes" if meets else "NO")])
    part.tables.append(markdown(["shape", "batch", "step", "tokens/s", "x AR", "target", "ok"], steps))
    if not gpu:
        part.notes.append("dry run: forward + loss only (FlexAttention has no CPU backward); the times say nothing")
    part.notes.append("the paper's recipe opens each future pair independently (`random`, the reference code); "
                      "`right_context` opens a contiguous run of the same expected size (the paper's prose)")
    part.status = "passed" if ok else "error"


# --- the decode part: block decoding eager vs CUDA graphs vs AR ---------------------------------------

def part_decode(args, device, part: Part) -> None:
    """Block decoding eager against CUDA graphs, against AR generate eager and AR static + compiled;
    the micro model's quality rows when it exists."""
    import decode_graphs
    from transformers import AutoTokenizer

    gpu = device.type == "cuda"
    shape, length, block, per_block = ("smollm2-135m", 256, 32, 8) if gpu else ("tiny", 16, 8, 4)
    batches = [int(b) for b in args.decode_batches.split(",")] if gpu else [1, 2]
    backend = True if gpu else "eager"
    dtype = torch.bfloat16 if gpu else torch.float32
    net, causal = decode_graphs.random_block_model(shape, device, dtype, block)
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    rows = decode_graphs.decode_rows(net, causal, tokenizer, device, length, batches, per_block, backend)
    table = []
    for r in rows:
        table.append([r["decoder"], r["batch"], r["tokens_per_s"], f"{r['vs_ar_compiled']:.2f}",
                      f"{r['graphs_vs_eager']:.2f}" if "graphs_vs_eager" in r else "-", r["forward_passes"],
                      "-" if r["same_tokens"] is None else ("yes" if r["same_tokens"] else "no")])
    part.tables.append(markdown(["decoder", "batch", "tokens/s", "x AR compiled", "graphs x eager", "forward passes",
                                 "same tokens as eager"], table))
    one = next(r for r in rows if r["batch"] == 1 and "graphs_vs_eager" in r)
    part.figures.update(shape=shape, length=length, dtype=str(dtype), rows=rows,
                        graphs_vs_eager_batch1=one["graphs_vs_eager"],
                        graphs_target_met=(one["graphs_vs_eager"] >= TARGET_GRAPHS) if gpu else None)
    part.notes.append(f"{shape} shape, random init (speed only), {dtype}, {length} new tokens, blocks of {block}, "
                      f"{per_block} steps a block, greedy confidence order; target graphs >= {TARGET_GRAPHS}x eager "
                      f"at batch 1")
    if not all(r["same_tokens"] in (None, True) for r in rows):
        part.notes.append("tokens differ between the eager and the graph rows here: bf16 rounding on random weights "
                          "(near-ties); the fp32 parity is tests/test_cuda_kernels.py")
    quality = decode_graphs.quality_rows(device, length, per_block, backend)
    if quality is None:
        part.notes.append(f"quality rows skipped: {decode_graphs.MICRO_MODEL.relative_to(REPO)} or "
                          f"{decode_graphs.MICRO_BLOCK.relative_to(REPO)} missing (the micro model of 'A world the "
                          f"CPU can finish'): build them, carry them, rerun --parts decode")
        part.figures["quality"] = "skipped: micro model missing"
    else:
        part.tables.append(markdown(["decoder (micro model, batch 1)", "tokens/s", "x AR compiled", "gen PPL",
                                     "distinct-2", "entropy"],
                                    [[q["decoder"], q["tokens_per_s"], f"{q.get('vs_ar_compiled', 1.0):.2f}",
                                      q["gen_ppl"], q["distinct_2"], q["entropy"]] for q in quality]))
        part.figures["quality"] = quality
    part.status = "passed"


# --- the fsdp2 part: dlm fit under FSDP2 on one device ---------------------------------------------

def part_fsdp2(args, device, part: Part) -> None:
    """A few steps of ``dlm fit --trainer.strategy fsdp2`` on one device (the FSDP2 path's plumbing:
    fully_shard units, mixed precision, DCP checkpoint), through the CLI."""
    run_fit(args, device, part, strategy="fsdp2")



# --- part 3: sampling -----------------------------------------------------------------------------

def diffusion_backbone(shape: str, device, dtype):
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig

    config = dict(train_step.SHAPES[shape])
    cfg = BackboneConfig(config=config, mask_token=MaskTokenConfig(mode="reuse", id=config["vocab_size"] - 1))
    torch.manual_seed(0)
    net = DiffusionModel.from_config(cfg, None).to(device=device, dtype=dtype).eval()
    return net


def part_sample(args, device, part: Part) -> None:
    from transformers import AutoTokenizer

    from lightning_dlm.core.config import DiffusionConfig
    from lightning_dlm.sampling import generate

    gpu = device.type == "cuda"
    shape, length = ("smollm2-135m", 256) if gpu else ("tiny", 32)
    batches = [1, 16] if gpu else [1, 2]
    dtype = torch.bfloat16 if gpu else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    net = diffusion_backbone(shape, device, dtype)
    causal = copy.deepcopy(net.model)
    causal.config.is_causal = True
    prompt = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    configs = [
        ("diffusion: random order, T=L (baseline)", dict(strategy="random", steps=length)),
        ("diffusion: blocks 32 + dual cache + random, T=L/2", dict(strategy="random", steps=length // 2,
                                                                   block_size=min(32, length), cache="dual")),
    ]
    # The same weights as a block model (diffusion.attention: block, blocks of 32: decoded block by
    # block with the exact KV cache). Random weights never commit slots in parallel by confidence,
    # so the steps a block fix the pace: 32 (one token a pass: the cost of a pass) and 8 (up to four
    # tokens a pass, as a trained model commits them; a block holding the prompt's end has fewer slots).
    block = copy.copy(net)
    block.diffusion = DiffusionConfig(attention="block", block_size=32).check()
    configs += [
        ("block model: blocks 32, exact cache, 32 steps a block", dict(strategy="confidence", steps=length, model=block)),
        ("block model: blocks 32, exact cache, 8 steps a block", dict(strategy="confidence", steps=length // 4,
                                                                     model=block)),
    ]
    rows = []
    for batch in batches:
        for label, options in configs:
            options = dict(options)
            model = options.pop("model", net)
            generate(model, [prompt] * batch, length=length, tokenizer=tokenizer, seed=1, **options)  # warm-up
            sync(device)
            start = time.perf_counter()
            out = generate(model, [prompt] * batch, length=length, tokenizer=tokenizer, seed=2, **options)
            sync(device)
            seconds = time.perf_counter() - start
            tokens = sum(len(t) for t in out.token_ids)
            rows.append([label, batch, tokens / seconds, out.forward_passes, seconds])
        ids = prompt_ids.expand(batch, -1)
        kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=True, temperature=0.9, top_p=0.9,
                      use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            causal.generate(ids, **kwargs)  # warm-up
            sync(device)
            start = time.perf_counter()
            out_ids = causal.generate(ids, **kwargs)
            sync(device)
        seconds = time.perf_counter() - start
        tokens = (out_ids.shape[1] - ids.shape[1]) * batch
        rows.append(["AR generate (transformers, KV cache)", batch, tokens / seconds, out_ids.shape[1] - ids.shape[1],
                     seconds])
    for row in rows:
        ar = next(r for r in rows if r[1] == row[1] and r[0].startswith("AR"))
        row.insert(3, f"{row[2] / ar[2]:.2f}")
    part.tables.append(markdown(["decoder", "batch", "tokens/s", "x AR", "forward passes", "s"], rows))
    part.figures.update(shape=shape, length=length, dtype=str(dtype),
                        rows=[dict(decoder=r[0], batch=r[1], tokens_per_s=r[2], vs_ar=float(r[3]),
                                   forward_passes=r[4], seconds=r[5]) for r in rows])
    part.notes.append(f"{shape} shape, random init (speed only), {dtype}, prompt of {prompt_ids.shape[1]} tokens, "
                      f"{length} new tokens per row")
    part.status = "passed"


# --- part 4: dlm fit through the CLI --------------------------------------------------------------

def fit_config(args, device, root: Path) -> dict:
    gpu = device.type == "cuda"
    shape = dict(train_step.SHAPES["smollm2-135m" if gpu else "tiny"])
    steps = args.fit_steps
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed" if gpu else "32-true",
            "max_steps": steps, "val_check_interval": steps // 2, "check_val_every_n_epoch": None,
            "limit_val_batches": 2, "log_every_n_steps": 2, "gradient_clip_val": 1.0,
            "default_root_dir": str(root), "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning_dlm.training.callbacks.TrainingThroughput", "init_args": {"window": 4}}],
        },
        "checkpoint": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": steps},
        "model": {
            "seed": 0, "val_t_levels": 2,
            "backbone": {
                "tokenizer": str(TINY_TOKENIZER), "config": shape,
                "attn_implementation": "flex_attention" if gpu else "sdpa",
                "mask_token": {"mode": "reuse", "id": shape["vocab_size"] - 1},
            },
            "diffusion": {"schedule": "linear", "anneal_steps": steps // 2, "anneal_mask": "random"},
            "optim": {"lr": 3e-4, "warmup_steps": 2, "lr_schedule": "cosine"},
        },
        "data": {
            "train": [{"path": str(TINY_CORPUS), "sample_by": "paragraph"}],
            "val": [{"path": str(TINY_CORPUS_VAL), "sample_by": "paragraph"}],
            "seq_len": 512 if gpu else 64, "batch_size": 8 if gpu else 2, "num_workers": 0, "val_max_blocks": 16,
        },
    }


def read_scalars(root: Path) -> Dict[str, List[tuple]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, List[tuple]] = {}
    for events in sorted(root.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def part_fit(args, device, part: Part) -> None:
    run_fit(args, device, part)


def run_fit(args, device, part: Part, strategy: Optional[str] = None) -> None:
    """``dlm fit`` through the CLI (with ``strategy``: that ``--trainer.strategy``, the SDPA path),
    its logs, losses and checkpoints checked."""
    import yaml

    work = tempfile.TemporaryDirectory(prefix="dlm_gpu_suite_fit_")  # checkpoints stay out of --out
    root = Path(work.name)
    config = root / "config.yaml"
    settings = fit_config(args, device, root)
    if strategy is not None:
        settings["trainer"]["strategy"] = strategy
        settings["model"]["backbone"]["attn_implementation"] = "sdpa"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    log = f"{part.name}.log"
    cmd = [sys.executable, "-m", "lightning_dlm", "fit", "--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.fit_timeout, env=child_env())
    seconds = time.perf_counter() - start
    (Path(args.out) / log).write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if line.strip()][-1:]
        raise PartError(f"`dlm fit` exited {proc.returncode}: {last[0] if last else ''} (see {log})")
    scalars = read_scalars(root)
    ckpts = sorted(p.name for p in (root / "checkpoints").glob("*.ckpt"))

    def last(tag):
        values = scalars.get(tag)
        return values[-1][1] if values else None

    losses = scalars.get("train/loss", [])
    row = [args.fit_steps, f"{seconds:.0f}", last("train/loss"), last("val/nelbo"), last("train/anneal_ratio"),
           last("perf/tokens_per_s"), ", ".join(ckpts)]
    part.tables.append(markdown(["steps", "wall s", "last train/loss", "val/nelbo", "anneal ratio", "tokens/s",
                                 "checkpoints"], [row]))
    part.figures.update(steps=args.fit_steps, seconds=seconds, losses=losses, val_nelbo=scalars.get("val/nelbo"),
                        tokens_per_s=scalars.get("perf/tokens_per_s"), checkpoints=ckpts,
                        attn=settings["model"]["backbone"]["attn_implementation"], strategy=strategy or "auto")
    problems = []
    if not losses or not all(map(lambda v: v == v and abs(v) < 1e4, (v for _, v in losses))):
        problems.append("train/loss missing or not finite")
    if not ckpts:
        problems.append("no checkpoint written")
    if last("train/anneal_ratio") != 1.0:
        problems.append("annealing did not reach ratio 1")
    work.cleanup()
    if problems:
        raise PartError("; ".join(problems))
    part.status = "passed"


PART_FUNCS = {"tests": part_tests, "train": part_train, "sample": part_sample, "fit": part_fit, "decode": part_decode,
              "fsdp2": part_fsdp2, "flex": part_flex}


# --- main -----------------------------------------------------------------------------------------

def write_report(out: Path, env: dict, parts: List[Part], dry_run: bool) -> None:
    """suite.md (the tables) and suite.json (every figure) of the parts run so far."""
    summary = markdown(["part", "status", "seconds"], [[p.name, p.status, f"{p.seconds:.0f}"] for p in parts])
    text = [f"# GPU suite{' (dry run, CPU)' if dry_run else ''}", "", markdown(list(env), [list(env.values())]), ""]
    for p in parts:
        text += [f"## {p.name}: {p.status} ({p.seconds:.0f} s)", "", *(t + "\n" for t in p.tables),
                 *(f"- {n}" for n in p.notes), ""]
    text += ["## summary", "", summary, ""]
    (out / "suite.md").write_text("\n".join(text))
    payload = dict(environment=env, dry_run=dry_run,
                   parts={p.name: dict(status=p.status, seconds=p.seconds, figures=p.figures, notes=p.notes)
                          for p in parts})
    (out / "suite.json").write_text(json.dumps(payload, indent=2, default=str))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the tables (suite.md), figures (suite.json) and logs")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the same code paths, no GPU needed")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--shapes", default=None, help="train part: only these shapes (smollm2-135m, llama-1b)")
    p.add_argument("--train-steps", type=int, default=6, help="timed steps per training variant")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed rounds (FlexAttention compiles here)")
    p.add_argument("--fit-steps", type=int, default=20, help="steps of the dlm fit part (half annealing)")
    p.add_argument("--train-groups", default=",".join(TRAIN_GROUPS),
                   help=f"train part: groups of step variants, from {', '.join(TRAIN_GROUPS)}")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled train variants (the dry run traces: eager)")
    p.add_argument("--new-rows", action="store_true",
                   help="issue 23's rows only: parts " + ",".join(NEW_ROWS["parts"]) + ", train groups "
                        + NEW_ROWS["train_groups"] + ", the 1B shapes")
    p.add_argument("--tests-files", default="test_cuda.py,test_cuda_kernels.py",
                   help="tests part: the CUDA test files under tests/ (light imports: the GPU box lacks datasets)")
    p.add_argument("--decode-batches", default="1,16", help="decode part: the batches (the graph target is batch 1)")
    p.add_argument("--tests-timeout", type=int, default=240, help="seconds for the CUDA tests")
    p.add_argument("--fit-timeout", type=int, default=240, help="seconds for the dlm fit part")
    args = p.parse_args(argv)
    if args.new_rows:
        args.parts, args.train_groups = ",".join(NEW_ROWS["parts"]), NEW_ROWS["train_groups"]
        args.shapes = args.shapes or NEW_ROWS["shapes"]
        args.tests_files, args.decode_batches = NEW_ROWS["tests_files"], NEW_ROWS["decode_batches"]
        args.train_steps, args.train_warmup = NEW_ROWS["train_steps"], NEW_ROWS["train_warmup"]
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    args.parts = parts
    if args.dry_run:
        args.train_steps, args.train_warmup, args.fit_steps = 2, 1, 4
        args.compile_backend = "eager" if args.compile_backend == "inductor" else args.compile_backend
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("error: no CUDA GPU visible: run this on a GPU machine, or add --dry-run for the CPU check", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    env = environment(device)
    print(f"# GPU suite{' (dry run, CPU)' if args.dry_run else ''}\n")
    print(markdown(list(env), [list(env.values())]) + "\n", flush=True)
    parts: List[Part] = []
    for name in args.parts:
        part = Part(name)
        parts.append(part)
        missing = missing_packages(name)
        start = time.perf_counter()
        if missing:
            part.status = "error"
            part.notes.append(f"missing package(s) {', '.join(missing)}: run `make gpu-wheels` on a CPU machine and "
                              f"install .whl/ (benchmarks/run_gpu_suite.sh does)")
        else:
            try:
                PART_FUNCS[name](args, device, part)
            except PartError as err:
                part.status = "error"
                part.notes.append(str(err))
            except subprocess.TimeoutExpired as err:
                part.status = "error"
                part.notes.append(f"timed out after {err.timeout:.0f} s")
            except Exception as err:  # noqa: BLE001 - one line here, the traceback in the log
                part.status = "error"
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                part.notes.append(f"{type(err).__name__}: {first[:300]}")
                (out / f"{name}_error.log").write_text(traceback.format_exc())
            free_memory()
        part.seconds = time.perf_counter() - start
        print(f"## {name}: {part.status} ({part.seconds:.0f} s)\n")
        for table in part.tables:
            print(table + "\n")
        for note in part.notes:
            print(f"- {note}")
        print(flush=True)
        write_report(out, env, parts, args.dry_run)  # after every part: a run cut short keeps what finished
    summary = markdown(["part", "status", "seconds"], [[p.name, p.status, f"{p.seconds:.0f}"] for p in parts])
    print("## summary\n\n" + summary)
    if any(p.status == "failed" for p in parts):
        return 1
    if any(p.status == "error" for p in parts):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
