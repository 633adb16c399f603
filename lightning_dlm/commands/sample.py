"""``dlm sample``: decode continuations or infills from a trained checkpoint.

    dlm sample --ckpt last.ckpt --prompt "ROMEO." --length 64 --steps 64
    dlm sample --ckpt last.ckpt --prompts_file prompts.jsonl --strategy threshold --threshold 0.9 \\
        --block_size 32 --cache dual --format jsonl --output samples.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Literal, Optional, Union

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from lightning_dlm.commands.markers import span_marker
from lightning_dlm.core.errors import DLMError
from lightning_dlm.sampling.engine import sampler_defaults

#: The sampler's defaults (SamplerConfig's, written nowhere else): the signature below shows them in --help.
_SAMPLER = sampler_defaults()

TRUST_HELP = ("unpickle the checkpoint in full, which runs any code in it: only for a file whose author you trust "
              "(by default only tensors and plain data are read)")


def read_prompts_file(path: str) -> List[Dict[str, Any]]:
    """Rows of a JSON-lines file: objects with a ``prompt`` (and optionally a ``suffix``) string."""
    if not os.path.isfile(path):
        raise DLMError(f"prompts file '{path}' does not exist: give a JSON-lines file of {{\"prompt\": ...}} objects")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DLMError(f"{path}:{number} is not valid JSON ({err.msg}): write one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DLMError(f"{path}:{number} has no \"prompt\" string: write {{\"prompt\": \"...\", \"suffix\": \"...\"}}")
            if row.get("suffix") is not None and not isinstance(row["suffix"], str):
                raise DLMError(f"{path}:{number}: \"suffix\" must be a string")
            rows.append(row)
    if not rows:
        raise DLMError(f"prompts file '{path}' holds no prompts: write one JSON object per line")
    return rows


def sample(
    ckpt: str,
    prompt: Union[str, List[str], None] = None,
    suffix: Union[str, List[str], None] = None,
    prompts_file: Optional[str] = None,
    length: int = 64,
    max_length: Optional[int] = None,
    steps: int = _SAMPLER["steps"],
    temperature: float = _SAMPLER["temperature"],
    top_k: int = _SAMPLER["top_k"],
    top_p: float = _SAMPLER["top_p"],
    seed: int = 0,
    strategy: str = _SAMPLER["strategy"],
    confidence: Optional[str] = None,
    threshold: Optional[float] = None,
    rank_noise: Optional[float] = None,
    block_size: Optional[int] = _SAMPLER["block_size"],
    cache: str = _SAMPLER["cache"],
    refresh_every: Optional[int] = _SAMPLER["refresh_every"],
    cfg_scale: float = _SAMPLER["cfg_scale"],
    num_samples: int = 1,
    batch_size: int = 8,
    format: Literal["text", "jsonl"] = "text",
    output: Optional[str] = None,
    progress: bool = True,
    trajectory: bool = False,
    device: str = "auto",
    trust_checkpoint: bool = False,
) -> None:
    """Decode text with a lightning_dlm checkpoint.

    Args:
        ckpt: a .ckpt written by `dlm fit`, a sharded checkpoint folder, or a folder written by `dlm export`.
        prompt: text before the generated region, or a list of texts ('[a, b]') for a batch.
        suffix: text after it, for infilling (a list: one per prompt).
        prompts_file: a JSON-lines file of {"prompt": ..., "suffix": ...} objects (instead of --prompt).
        length: number of tokens to generate.
        max_length: generate at most this many tokens, stopping each sample at its EOS (replaces --length).
        steps: denoising steps T (split over the blocks).
        temperature: sampling temperature (0 = argmax).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1].
        seed: random seed (each sample's draws depend only on it, its prompt and its sample number).
        strategy: random (the paper's random order), confidence, or threshold (parallel decoding).
        confidence: confidence/threshold strategies: probability, margin or entropy.
        threshold: threshold strategy: commit every slot whose confidence is above this.
        rank_noise: confidence/threshold strategies: Gumbel noise of this scale on the ranking.
        block_size: decode left to right in blocks of this many tokens (semi-autoregressive).
        cache: approximate KV cache for block decoding: none, prefix or dual.
        refresh_every: refresh the cache every this many steps too (default: once per block).
        cfg_scale: classifier-free guidance weight (0 = none; the unconditional pass sees the prompt masked).
        num_samples: samples per prompt.
        batch_size: samples decoded together.
        format: text, or jsonl (one JSON object per sample, with its statistics).
        output: write the samples to this file instead of stdout.
        progress: show progress over the samples on stderr (a bar on a terminal, else plain lines) when more than one.
        trajectory: also show the generated region after every step (masked slots as _).
        device: cpu, cuda, or auto.
        trust_checkpoint: unpickle the checkpoint in full, which runs any code in it: only for a file
            whose author you trust (by default only tensors and plain data are read).
    """
    import torch

    from lightning_dlm.model.diffusion_model import DiffusionModel
    from lightning_dlm.sampling import SamplerConfig

    rows = _rows(prompt, suffix, prompts_file)
    if num_samples < 1:
        raise DLMError(f"num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise DLMError(f"batch_size must be >= 1, got {batch_size}")
    options = {k: v for k, v in dict(confidence=confidence, threshold=threshold, rank_noise=rank_noise).items()
               if v is not None}
    gen_kwargs = dict(length=None if max_length is not None else length, max_length=max_length, steps=steps,
                      temperature=temperature, top_k=top_k, top_p=top_p, strategy=strategy, block_size=block_size,
                      cache=cache, refresh_every=refresh_every, capture_trajectory=trajectory, cfg_scale=cfg_scale)
    if (max_length if max_length is not None else length) < 1:
        raise DLMError(f"the target length must be >= 1, got {max_length if max_length is not None else length}")
    SamplerConfig(steps=steps, temperature=temperature, top_k=top_k, top_p=top_p, strategy=strategy,
                  strategy_options=options, block_size=block_size, cache=cache, refresh_every=refresh_every,
                  cfg_scale=cfg_scale).check()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if output:
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise DLMError(f"--output {output}: the folder {folder} does not exist: create it or write elsewhere")
    module = DiffusionModel.from_pretrained(ckpt, map_location=device, trust_checkpoint=trust_checkpoint)
    out_file = open(output, "w", encoding="utf-8") if output else None
    try:
        _run(module, rows, options, out_file or sys.stdout, num_samples=num_samples, batch_size=batch_size,
             format=format, progress=progress, seed=seed, gen_kwargs=gen_kwargs)
    finally:
        if out_file is not None:
            out_file.close()


def _rows(prompt, suffix, prompts_file) -> List[Dict[str, Any]]:
    if prompts_file is not None:
        if prompt is not None or suffix is not None:
            raise DLMError("give prompts either with --prompt/--suffix or with --prompts_file, not both")
        return read_prompts_file(prompts_file)
    prompts = [""] if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
    if suffix is None:
        return [{"prompt": p} for p in prompts]
    suffixes = [suffix] if isinstance(suffix, str) else list(suffix)
    if len(suffixes) != len(prompts):
        raise DLMError(f"got {len(prompts)} --prompt and {len(suffixes)} --suffix: give one suffix per prompt")
    return [{"prompt": p, "suffix": s} for p, s in zip(prompts, suffixes)]


def _run(module, rows, options, stream, *, num_samples, batch_size, format, progress, seed, gen_kwargs) -> None:
    from lightning_dlm.sampling import generate, row_seeds
    from lightning_dlm.training.callbacks.progress import progress_bar

    tokenizer = module.tokenizer
    if tokenizer is None:
        raise DLMError("this checkpoint has no tokenizer: it cannot decode text")
    jobs = [(i, k) for i in range(len(rows)) for k in range(num_samples)]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    infill = any(r.get("suffix") is not None for r in rows)
    suffix_of = lambda i: rows[i].get("suffix") or ""  # noqa: E731
    # seeds over the whole run, so a sample does not depend on how the run is cut into batches
    seeds = row_seeds(seed, [encode(rows[i]["prompt"]) for i, _ in jobs],
                      [encode(suffix_of(i)) for i, _ in jobs] if infill else None)
    total_passes = total_tokens = 0
    total_time = 0.0
    # on stderr from the first batch on (a bar on a terminal, plain lines otherwise), unless one sample
    batches = -(-len(jobs) // batch_size)
    bar = progress_bar(len(jobs), f"sampling ({batches} batch{'es' if batches > 1 else ''})",
                       enabled=progress and len(jobs) > 1, unit="sample", file=sys.stderr)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out = generate(module, [rows[i]["prompt"] for i, _ in chunk],
                       suffixes=[suffix_of(i) for i, _ in chunk] if infill else None,
                       seeds=seeds[start:start + len(chunk)], **gen_kwargs, **options)
        stats = out.stats
        total_passes += stats.forward_passes
        total_tokens += stats.tokens
        total_time += stats.wall_time_s
        with bar.external_write_mode(stream):  # samples written to a terminal go above the bar
            _write_chunk(stream, out, chunk, rows, start, len(jobs), num_samples, format, tokenizer)
        bar.update(len(chunk))
    bar.close()
    if format == "text":
        rate = total_tokens / total_time if total_time > 0 else float("inf")
        stream.write(f"({total_passes} forward passes, {total_tokens} tokens in {total_time:.2f}s = {rate:.1f} tokens/s; "
                     f"generated text {span_marker(stream).legend})\n")
    stream.flush()


def _write_chunk(stream, out, chunk, rows, start, total, num_samples, format, tokenizer) -> None:
    stats = out.stats
    mark = span_marker(stream)
    for b, (i, k) in enumerate(chunk):
        row = rows[i]
        if format == "jsonl":
            record = {**row, "sample": k, "text": out.texts[b], "token_ids": out.token_ids[b],
                      "stopped_at_eos": out.stopped_at_eos[b], "seed": out.seeds[b],
                      "committed_per_step": [step[b] for step in stats.committed_per_step],
                      "batch_stats": {key: value for key, value in stats.as_dict().items()
                                      if key != "committed_per_step"}}
            if out.trajectory is not None:
                record["trajectory"] = out.trajectory_texts(tokenizer, row=b)
            stream.write(json.dumps(record) + "\n")
        else:
            head = f"--- sample {start + b + 1}/{total}"
            if num_samples > 1:
                head += f" (prompt {i + 1}, sample {k + 1})"
            stream.write(head + "\n")
            tail = row.get("suffix") or ""
            if out.trajectory is not None:
                for number, state in enumerate(out.trajectory_texts(tokenizer, row=b), 1):
                    stream.write(f"  step {number:>3}: {state!r}\n")
            stream.write(f"{row['prompt']}{mark(out.texts[b])}{tail}\n")
    stream.flush()


def build_parser() -> ArgumentParser:
    """The ``dlm sample`` parser: the options of :func:`sample` (its sampler defaults are SamplerConfig's)."""
    parser = ArgumentParser(prog="dlm sample", description="Decode text with a lightning_dlm checkpoint.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    parser.add_function_arguments(sample, as_group=False, skip={"trust_checkpoint"})
    parser.add_argument("--trust_checkpoint", action=ActionYesNo, default=False, help=TRUST_HELP)
    return parser


def sample_command(args: List[str]) -> None:
    cfg = build_parser().parse_args(args)
    cfg.pop("config", None)
    sample(**cfg.as_dict())
