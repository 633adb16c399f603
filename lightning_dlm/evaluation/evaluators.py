"""The two kinds of model an evaluation can score, behind one interface.

:class:`DiffusionEvaluator` wraps an adapted checkpoint (a :class:`DiffusionLM`);
:class:`CausalEvaluator` wraps a plain Hugging Face causal LM (the AR baseline). Tasks call the
same methods on both, so every task compares the two on the same items and the same tokens:

* ``likelihood(blocks)``: the NELBO bound (diffusion) or the exact NLL (AR) per token;
* ``choice(contexts, continuations)``: a log-likelihood (or its ELBO bound) per continuation;
* ``generate(prompts, length, suffixes)``: continuations (the AR model ignores suffixes).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.choice import choice_rows, diffusion_choice_scores
from lightning_dlm.evaluation.likelihood import causal_perplexity, diffusion_nelbo
from lightning_dlm.evaluation.scoring import causal_row_nll
from lightning_dlm.model.diffusion_model import DiffusionModel
from lightning_dlm.model.loading import start_and_pad_ids

Progress = Callable[[int], None]


def _nothing(n: int) -> None:
    return None


class Evaluator:
    """Shared plumbing; ``weights`` is the torch module that holds the model (with ``.config``)."""

    kind = "?"

    def __init__(self, weights: torch.nn.Module, tokenizer, name: str):
        self.weights = weights
        self.tokenizer = tokenizer
        self.name = name
        self.start_id, self.pad_id = start_and_pad_ids(tokenizer)
        self.eos_id = tokenizer.eos_token_id

    def encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def device(self) -> torch.device:
        return next(self.weights.parameters()).device

    @property
    def max_length(self) -> Optional[int]:
        from lightning_dlm.model.loading import max_positions

        return max_positions(self.weights.config)


class DiffusionEvaluator(Evaluator):
    """A diffusion model (:class:`DiffusionModel`, or the DiffusionLM training one): ELBO bounds,
    the paper's choice protocol, the sampler."""

    kind = "diffusion"

    def __init__(self, model, name: str = "diffusion"):
        from lightning_dlm.sampling.generate import unwrap_trainer

        model = unwrap_trainer(model)
        model.eval()
        self.net = model
        super().__init__(model, model.tokenizer, name)

    @property
    def is_block(self) -> bool:
        """Whether the model is a block diffusion model (``diffusion.attention: block``)."""
        return bool(getattr(getattr(self.net, "diffusion", None), "is_block", False))

    def likelihood(self, blocks: torch.Tensor, levels: int = 8, draws: int = 4, batch_size: int = 8, seed: int = 0,
                   progress: Progress = _nothing) -> Dict[str, float]:
        if self.is_block:  # the sum over blocks of block NELBOs (see lightning_dlm.objectives.block)
            from lightning_dlm.evaluation.likelihood import block_nelbo

            return block_nelbo(self.net, blocks, self.net.diffusion.block_size, shift=self.net.shift, levels=levels,
                               draws=draws, batch_size=batch_size, seed=seed, progress=progress)
        return diffusion_nelbo(self.net, blocks, shift=self.net.shift, levels=levels, draws=draws,
                               batch_size=batch_size, seed=seed, progress=progress)

    def likelihood_work(self, blocks: int, levels: int = 8, draws: int = 4, **_) -> int:
        return blocks * draws

    def choice(self, contexts: Sequence[str], continuations: Sequence[str], levels: int = 32, batch_size: int = 32,
               seed: int = 0, progress: Progress = _nothing) -> Dict[str, List]:
        """Per continuation: ``loglik`` = -n * score (the ELBO bound of log p), ``per_token`` =
        -score (the paper's criterion), ``greedy``."""
        rows, starts = choice_rows(self.encode, self.start_id, contexts, continuations)
        # a block model's masked tokens are scored given the clean blocks before them
        scores, greedy = diffusion_choice_scores(self.net, rows, starts, self.pad_id, levels=levels,
                                                 shift=self.net.shift, batch_size=batch_size, seed=seed,
                                                 progress=progress,
                                                 block_size=self.net.diffusion.block_size if self.is_block else None)
        counts = [len(r) - s for r, s in zip(rows, starts)]
        return dict(loglik=[-s * n for s, n in zip(scores, counts)], per_token=[-s for s in scores], greedy=greedy,
                    tokens=counts)

    def choice_work(self, n: int, levels: int = 32, **_) -> int:
        return n * levels

    def generate(self, prompts: Sequence[str], length: int, suffixes: Optional[Sequence[str]] = None,
                 batch_size: int = 16, progress: Progress = _nothing, stop_at_eos: bool = False,
                 **sampler) -> List[str]:
        """Texts decoded by the sampler library (``sampler``: steps, strategy, temperature, ...)."""
        from lightning_dlm.sampling import generate

        sampler = dict(sampler)
        sampler.setdefault("steps", length)
        texts: List[str] = []
        for lo in range(0, len(prompts), batch_size):
            chunk = list(prompts[lo: lo + batch_size])
            suffix = list(suffixes[lo: lo + batch_size]) if suffixes is not None else None
            size = dict(max_length=length) if stop_at_eos else dict(length=length)
            out = generate(self.net, chunk, suffixes=suffix, **size, **sampler)
            texts.extend(self.decode(ids) for ids in out.token_ids)
            progress(len(chunk))
        return texts


class CausalEvaluator(Evaluator):
    """A plain causal LM: exact likelihoods and left-to-right generation."""

    kind = "ar"

    def __init__(self, model, tokenizer, name: str = "ar"):
        self.model = model.eval()
        super().__init__(self.model, tokenizer, name)

    def likelihood(self, blocks: torch.Tensor, batch_size: int = 8, progress: Progress = _nothing,
                   **_) -> Dict[str, float]:
        return causal_perplexity(self.model, blocks, batch_size=batch_size, progress=progress)

    def likelihood_work(self, blocks: int, **_) -> int:
        return blocks

    def choice(self, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 32,
               progress: Progress = _nothing, **_) -> Dict[str, List]:
        rows, starts = choice_rows(self.encode, self.start_id, contexts, continuations)
        sums, counts, greedy = causal_row_nll(self.model, rows, starts, self.pad_id, batch_size=batch_size,
                                              device=self.device, want_greedy=True, progress=progress)
        return dict(loglik=[-s for s in sums], per_token=[-s / n for s, n in zip(sums, counts)], greedy=greedy,
                    tokens=counts)

    def choice_work(self, n: int, **_) -> int:
        return n

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], length: int, suffixes: Optional[Sequence[str]] = None,
                 batch_size: int = 16, progress: Progress = _nothing, stop_at_eos: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, **_) -> List[str]:
        """Left-to-right continuations (greedy at temperature 0). Suffixes cannot be used by an
        AR model and are ignored (the tasks record that)."""
        texts: List[str] = []
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            for lo in range(0, len(prompts), batch_size):
                chunk = [self.encode(p) for p in prompts[lo: lo + batch_size]]
                lead = [self.start_id] if self.start_id is not None else []
                rows = [lead + ids for ids in chunk]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
                attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
                sample = temperature > 0
                torch.manual_seed(seed + lo)
                kwargs = dict(do_sample=sample, max_new_tokens=length, min_new_tokens=0 if stop_at_eos else length,
                              pad_token_id=self.pad_id, eos_token_id=self.eos_id if stop_at_eos else None)
                if sample:
                    kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
                out = self.model.generate(input_ids=ids, attention_mask=attention, **kwargs)
                texts.extend(self.decode(row[width:].tolist()) for row in out)
                progress(len(chunk))
        finally:
            self.tokenizer.padding_side = side
        return texts


def load_evaluator(path: str, kind: str = "auto", device: str = "cpu", dtype: str = "float32",
                   name: Optional[str] = None, trust_checkpoint: bool = False) -> Evaluator:
    """An evaluator for ``path``: a diffusion checkpoint (``.ckpt``, sharded or exported folder)
    or a causal LM (hub name or folder). ``kind``: ``auto``, ``diffusion`` or ``ar``.
    ``trust_checkpoint``: unpickle a diffusion checkpoint in full (code in it can run)."""
    from lightning_dlm.io.safe_read import is_diffusion_checkpoint

    if kind not in ("auto", "diffusion", "ar"):
        raise DLMError(f"unknown model kind '{kind}': use auto, diffusion or ar")
    label = name or os.path.basename(os.path.normpath(path)) or path
    # a file can only be a diffusion checkpoint (a causal LM is a folder or hub name): the loader
    # names what is wrong with it, and refuses what would run code
    if kind == "diffusion" or (kind == "auto" and (os.path.isfile(path) or is_diffusion_checkpoint(path))):
        model = DiffusionModel.from_pretrained(path, map_location=device, trust_checkpoint=trust_checkpoint)
        if model.objective == "ar":  # a run of the causal objective (model.objective: ar) is a causal LM
            model.model.config.is_causal = True
            return CausalEvaluator(model.model, model.tokenizer, name=label)
        return DiffusionEvaluator(model, name=label)
    if os.path.isfile(path):
        raise DLMError(f"'{path}' is a file, and a causal LM is a folder or hub name: pass a model folder, "
                       f"or --kind diffusion for a .ckpt written by `dlm fit`")
    from lightning_dlm.model.config import BackboneConfig
    from lightning_dlm.model.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(BackboneConfig(pretrained=path, dtype=dtype)).to(device)
    return CausalEvaluator(model, load_tokenizer(path), name=label)
