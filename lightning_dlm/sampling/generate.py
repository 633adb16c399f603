"""Text in, text out: decode prompts (and optional suffixes, for infilling) with a DiffusionLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from lightning_dlm.errors import DLMError
from lightning_dlm.sampling.canvas import build_canvas
from lightning_dlm.sampling.random_order import random_order_sample
from lightning_dlm.seeding import make_generator


@dataclass
class Generation:
    texts: List[str]
    token_ids: List[List[int]]
    forward_passes: int
    stats: dict = field(default_factory=dict)


def suppressed_ids(module) -> List[int]:
    """Ids never sampled: an added mask token and embedding rows beyond the tokenizer."""
    net = module.net
    ids = [net.mask_token_id] if net.mask_token_added else []
    tokenizer = module.tokenizer
    if tokenizer is not None and len(tokenizer) < net.vocab_size:
        ids += list(range(len(tokenizer), net.vocab_size))
    return sorted(set(ids))


@torch.no_grad()
def generate(
    module,
    prompts: Sequence[str],
    length: int = 64,
    suffixes: Optional[Sequence[str]] = None,
    steps: int = 64,
    temperature: float = 0.9,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
) -> Generation:
    """Random-order decoding of ``length`` tokens after each prompt (and before each suffix).

    ``module`` is a :class:`lightning_dlm.module.DiffusionLM` with a tokenizer.
    """
    tokenizer = module.tokenizer
    if tokenizer is None:
        raise DLMError("this model has no tokenizer: set backbone.tokenizer, or load a lightning_dlm checkpoint")
    net = module._require_net()
    was_training = module.training
    module.eval()
    device = next(net.parameters()).device
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefixes = [encode(p) for p in prompts]
    suffix_ids = [encode(s) for s in suffixes] if suffixes is not None else None
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (start if start is not None else 0)
    canvas = build_canvas(prefixes, length, net.mask_token_id, pad, start, suffix_ids, net.max_positions, device)
    ids, passes = random_order_sample(
        lambda x, attn: net(x, attention_mask=attn),
        canvas,
        module.schedule,
        steps=steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        shift=module.diffusion_cfg.shift,
        suppress_ids=suppressed_ids(module),
        generator=make_generator(seed, device=device),
    )
    module.train(was_training)
    out_ids = [ids[b][canvas.target[b]].tolist() for b in range(ids.shape[0])]
    texts = [tokenizer.decode(row) for row in out_ids]
    return Generation(texts=texts, token_ids=out_ids, forward_passes=passes)
