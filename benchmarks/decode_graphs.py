"""Block decoding eager vs CUDA graphs, against AR ``generate`` eager and AR static-cache compiled.

What it measures
----------------
The same prompt, ``--length`` new tokens, at each ``--batch`` (every row the same prompt, so the
graph-captured decoder's batch is fixed), for four decoders on the same weights:

* ``block model, eager``: the block decoder (blocks of ``--block-size``, the exact KV cache of
  committed blocks, ``--steps-per-block`` denoising steps a block, confidence order);
* ``block model, CUDA graphs``: the same with ``graphs=True`` (lightning_dlm.sampling.static_blocks:
  the fixed-shape passes over a static KV cache, ``torch.compile(mode="reduce-overhead")``); the
  tokens must equal the eager row's (checked: ``same_tokens``);
* ``AR generate, eager``: the causal LM with transformers' ``generate`` and its dynamic KV cache;
* ``AR generate, static cache + compiled``: ``generate(cache_implementation="static")``, whose
  forward transformers compiles itself on a GPU (``CompileConfig``, ``reduce-overhead``): the
  strongest AR baseline a transformers user has.

Each row runs once untimed (compiles and captures happen there), then once timed. Tokens/s =
generated tokens / wall time. With ``--micro`` (a causal LM folder, e.g. experiments/micro/model)
and ``--micro-block`` (a block model adapted from it) the quality rows add gen PPL under the AR
model, distinct-2 and entropy (lightning_dlm.evaluation.genppl); missing folders are skipped with
a line.

    python benchmarks/decode_graphs.py --device cuda --shape smollm2-135m --length 256 --batch 1 16
    python benchmarks/decode_graphs.py --quick       # the CPU check: tiny shape, graphs traced only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
TINY_TOKENIZER = REPO / "data" / "fixtures" / "tiny_tokenizer"
MICRO_MODEL = REPO / "experiments" / "micro" / "model"
MICRO_BLOCK = REPO / "experiments" / "micro" / "block_model"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_block_model(shape: str, device, dtype, block_size: int):
    """(block DiffusionModel, causal copy) of a shape of benchmarks/train_step.py, random init."""
    import train_step

    from lightning_dlm.core.config import DiffusionConfig
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig

    config = dict(train_step.SHAPES[shape])
    cfg = BackboneConfig(config=config, mask_token=MaskTokenConfig(mode="reuse", id=config["vocab_size"] - 1))
    torch.manual_seed(0)
    net = DiffusionModel.from_config(cfg, None, diffusion=DiffusionConfig(attention="block",
                                                                          block_size=block_size).check())
    net = net.to(device=device, dtype=dtype).eval()
    causal = copy.deepcopy(net.model)
    causal.config.is_causal = True
    return net, causal


def timed(fn, device: torch.device):
    fn()  # warm-up: compiles, graph captures
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def ar_generate(causal, ids, length: int, static: bool):
    from transformers import CompileConfig

    kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False, use_cache=True, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    if static:  # transformers compiles generate's forward on GPUs only (it says so, once, elsewhere)
        kwargs.update(cache_implementation="static")
        if ids.is_cuda:
            kwargs.update(compile_config=CompileConfig(mode="reduce-overhead"))
    with torch.no_grad():
        return causal.generate(ids, **kwargs)


def decode_rows(net, causal, tokenizer, device: torch.device, length: int, batches: List[int], steps_per_block: int,
                graphs_backend=True, prompt: str = PROMPT) -> List[Dict]:
    """The four decoders at each batch: dicts with decoder, batch, tokens_per_s, vs_ar_compiled,
    forward_passes, seconds, same_tokens (the graph row's tokens equal the eager row's)."""
    from lightning_dlm.sampling import generate

    rows: List[Dict] = []
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    options = dict(strategy="confidence", steps=max(1, length * steps_per_block // net.diffusion.block_size),
                   temperature=0.0, tokenizer=tokenizer, seed=2)
    for batch in batches:
        prompts = [prompt] * batch
        eager, s_eager = timed(lambda: generate(net, prompts, length=length, **options), device)
        graphs, s_graphs = timed(lambda: generate(net, prompts, length=length, graphs=graphs_backend, **options),
                                 device)
        same = eager.token_ids == graphs.token_ids
        ids = prompt_ids.expand(batch, -1)
        ar_e, s_ar = timed(lambda: ar_generate(causal, ids, length, static=False), device)
        ar_c, s_arc = timed(lambda: ar_generate(causal, ids, length, static=True), device)
        new = length * batch
        for name, seconds, passes, same_tokens in (
            ("block model, eager", s_eager, eager.forward_passes, None),
            ("block model, CUDA graphs" if device.type == "cuda" else "block model, graphs path (traced)", s_graphs,
             graphs.forward_passes, same),
            ("AR generate, eager", s_ar, length, None),
            ("AR generate, static cache + compiled" if device.type == "cuda"
             else "AR generate, static cache (compiled on GPUs only)", s_arc, length,
             bool(torch.equal(ar_e, ar_c))),
        ):
            rows.append(dict(decoder=name, batch=batch, tokens_per_s=new / seconds, forward_passes=passes,
                             seconds=seconds, same_tokens=same_tokens))
        base = rows[-1]["tokens_per_s"]
        for row in rows[-4:]:
            row["vs_ar_compiled"] = row["tokens_per_s"] / base
        rows[-3]["graphs_vs_eager"] = rows[-3]["tokens_per_s"] / rows[-4]["tokens_per_s"]
    return rows


def quality_rows(device: torch.device, length: int, steps_per_block: int, graphs_backend=True,
                 micro: Path = MICRO_MODEL, micro_block: Path = MICRO_BLOCK) -> Optional[List[Dict]]:
    """Batch 1, the micro model: AR compiled generate vs the block model with graphs, and the
    quality proxies of both under the AR model; None when the folders are missing."""
    if not micro.is_dir() or not micro_block.exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_dlm.evaluation.evaluators import CausalEvaluator
    from lightning_dlm.evaluation.genppl import score_samples
    from lightning_dlm.model import DiffusionModel
    from lightning_dlm.sampling import generate

    tokenizer = AutoTokenizer.from_pretrained(str(micro))
    ar = AutoModelForCausalLM.from_pretrained(str(micro)).to(device).eval()
    block = DiffusionModel.from_pretrained(str(micro_block), map_location=device)
    judge = CausalEvaluator(ar, tokenizer, name="micro")
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    out_ar, s_ar = timed(lambda: ar_generate(ar, ids, length, static=True), device)
    ar_text = tokenizer.decode(out_ar[0, ids.shape[1]:])
    options = dict(strategy="threshold", steps=max(1, length * steps_per_block // block.diffusion.block_size),
                   temperature=0.0, seed=2, graphs=graphs_backend)
    out_block, s_block = timed(lambda: generate(block, [PROMPT], length=length, **options), device)
    rows = []
    for name, text, seconds in (("AR generate, static cache + compiled", ar_text, s_ar),
                                ("block model, graphs, threshold", out_block.texts[0], s_block)):
        with torch.no_grad():
            q = score_samples(judge, PROMPT, [text])
        rows.append(dict(decoder=name, batch=1, tokens_per_s=length / seconds, seconds=seconds,
                         gen_ppl=q["gen_ppl"], distinct_2=q["distinct_2"], entropy=q["entropy"]))
    rows[1]["vs_ar_compiled"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shape on the CPU, graphs traced only (seconds)")
    p.add_argument("--shape", default="smollm2-135m", help="a shape of benchmarks/train_step.py (random init)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps-per-block", type=int, default=8)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    if args.quick:
        args.shape, args.length, args.batch, args.block_size, args.steps_per_block = "tiny", 16, [1, 2], 8, 4
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net, causal = random_block_model(args.shape, device, dtype, args.block_size)
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    backend = True if device.type == "cuda" else "eager"
    rows = decode_rows(net, causal, tokenizer, device, args.length, args.batch, args.steps_per_block, backend)
    for r in rows:
        print(f"{r['decoder']:<50} batch {r['batch']:>3}: {r['tokens_per_s']:9.1f} tok/s "
              f"({r['vs_ar_compiled']:.2f}x AR compiled), {r['forward_passes']} passes, same tokens {r['same_tokens']}")
    return rows


if __name__ == "__main__":
    main()
