"""The two kinds of model an evaluation can score, behind one interface.

:class:`DiffusionEvaluator` wraps an adapted checkpoint (a :class:`DiffusionLM`);
:class:`CausalEvaluator` wraps a plain Hugging Face causal LM (the AR baseline). Tasks call the
same methods on both, so every task compares the two on the same items and the same tokens:

* ``likelihood(blocks)``: the NELBO bound (diffusion) or the exact NLL (AR) per token;
* ``choice(contexts, continuations)``: a log-likelihood (or its ELBO bound) per continuation;
* ``generate(prompts, length, suffixes)``: continuations (the AR model ignores suffixes).

Where the tasks treat the two differently, each class says so itself, at class level (so a
stand-in that only names its ``kind`` gets its class's behaviour through :func:`evaluator_type`):
``uses_suffix``, ``supports_guidance``, ``can_judge``, ``decoding(task, length)`` (a generation
task's decoding options) and ``primary_choice_score(out)`` (what multiple choice ranks by).
:func:`load_evaluator` picks the class from the registry ``EVALUATORS`` (kind -> class), by
``kind`` or, for ``auto``, the first class whose ``matches(path)`` holds.
"""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type

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

    kind: ClassVar[str] = "?"
    #: whether generation conditions on the text after the span (an AR model sees the prefix only)
    uses_suffix: ClassVar[bool] = False
    #: whether its generation takes classifier-free guidance (``cfg_scale``)
    supports_guidance: ClassVar[bool] = False
    #: whether it can score other models' samples (generative perplexity needs exact left-to-right NLLs)
    can_judge: ClassVar[bool] = False

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

    # --- what this kind of model does differently (class level) ------------------------------
    @classmethod
    def matches(cls, path: str) -> bool:
        """Whether ``path`` holds a model of this kind (``kind: auto`` takes the first class that matches)."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "float32", name: str = "",
             trust_checkpoint: bool = False) -> "Evaluator":
        """An evaluator for the model at ``path``, named ``name``."""
        raise NotImplementedError

    @classmethod
    def decoding(cls, task: Any, length: int) -> Dict[str, Any]:
        """The decoding options of generation ``task`` (its sampler fields) for ``length`` tokens."""
        return dict(temperature=task.temperature, top_p=task.top_p, top_k=task.top_k, seed=task.seed)

    @staticmethod
    def primary_choice_score(out: Dict[str, List]) -> List[float]:
        """What multiple choice ranks the continuations by (highest wins), from ``choice``'s output."""
        return out["loglik"]


class DiffusionEvaluator(Evaluator):
    """A diffusion model (:class:`DiffusionModel`, or the DiffusionLM training one): ELBO bounds,
    the paper's choice protocol, the sampler."""

    kind = "diffusion"
    uses_suffix = True
    supports_guidance = True

    def __init__(self, model, name: str = "diffusion"):
        from lightning_dlm.sampling.generate import unwrap_trainer

        model = unwrap_trainer(model)
        model.eval()
        self.net = model
        super().__init__(model, model.tokenizer, name)

    @classmethod
    def matches(cls, path: str) -> bool:
        """A file (a causal LM is a folder or hub name), a folder holding a diffusion checkpoint, or a
        released diffusion LM's folder or hub name (:mod:`lightning_dlm.io.releases`)."""
        from lightning_dlm.io.releases import is_release
        from lightning_dlm.io.safe_read import is_diffusion_checkpoint

        return os.path.isfile(path) or is_diffusion_checkpoint(path) or is_release(path)

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "float32", name: str = "",
             trust_checkpoint: bool = False) -> Evaluator:
        """The checkpoint's model; a run of the causal objective (``model.objective: ar``) is a causal LM.
        The loader names what is wrong with a file, and refuses what would run code."""
        model = DiffusionModel.from_pretrained(path, map_location=device, trust_checkpoint=trust_checkpoint)
        if model.objective == "ar":
            model.model.config.is_causal = True
            return CausalEvaluator(model.model, model.tokenizer, name=name)
        return cls(model, name=name)

    @classmethod
    def decoding(cls, task: Any, length: int) -> Dict[str, Any]:
        """The sampler's options too: ``steps`` (one per token when unset), strategy, blocks, cache."""
        return dict(super().decoding(task, length), steps=task.steps or length, strategy=task.strategy,
                    block_size=task.block_size, cache=task.cache)

    @staticmethod
    def primary_choice_score(out: Dict[str, List]) -> List[float]:
        """The paper's criterion: the lowest mean masked cross-entropy (``per_token`` is its negative)."""
        return out["per_token"]

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
    can_judge = True

    def __init__(self, model, tokenizer, name: str = "ar"):
        self.model = model.eval()
        super().__init__(self.model, tokenizer, name)

    @classmethod
    def matches(cls, path: str) -> bool:
        """Anything else: a hub name or a model folder."""
        return True

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype: str = "float32", name: str = "",
             trust_checkpoint: bool = False) -> Evaluator:
        if os.path.isfile(path):
            raise DLMError(f"'{path}' is a file, and a causal LM is a folder or hub name: pass a model folder, "
                           f"or --kind diffusion for a .ckpt written by `dlm fit`")
        from lightning_dlm.model.config import BackboneConfig
        from lightning_dlm.model.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(BackboneConfig(pretrained=path, dtype=dtype)).to(device)
        return cls(model, load_tokenizer(path), name=name)

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


#: kind -> evaluator class; ``kind: auto`` takes the first (in this order) whose ``matches(path)`` holds.
EVALUATORS: Dict[str, Type[Evaluator]] = {cls.kind: cls for cls in (DiffusionEvaluator, CausalEvaluator)}


def evaluator_type(evaluator: Any) -> Type[Evaluator]:
    """The class whose behaviour ``evaluator`` has: its own, or, for a stand-in that is no
    :class:`Evaluator` but names its ``kind`` (a test double), the registered class of that kind."""
    if isinstance(evaluator, Evaluator):
        return type(evaluator)
    kind = getattr(evaluator, "kind", None)
    if kind not in EVALUATORS:
        raise DLMError(f"{type(evaluator).__name__} is not an evaluator: its kind {kind!r} is none of {list(EVALUATORS)}")
    return EVALUATORS[kind]


def load_evaluator(path: str, kind: str = "auto", device: str = "cpu", dtype: str = "float32",
                   name: Optional[str] = None, trust_checkpoint: bool = False) -> Evaluator:
    """An evaluator for ``path``: a diffusion checkpoint (``.ckpt``, sharded or exported folder)
    or a causal LM (hub name or folder). ``kind``: ``auto`` or a kind of ``EVALUATORS``
    (``diffusion``, ``ar``). ``trust_checkpoint``: unpickle a diffusion checkpoint in full (code in
    it can run)."""
    if kind != "auto" and kind not in EVALUATORS:
        choices = ["auto", *EVALUATORS]
        raise DLMError(f"unknown model kind '{kind}': use {', '.join(choices[:-1])} or {choices[-1]}")
    label = name or os.path.basename(os.path.normpath(path)) or path
    if kind == "auto":
        # a file can only be a diffusion checkpoint (a causal LM is a folder or hub name)
        kind = next(k for k, cls in EVALUATORS.items() if cls.matches(path))
    return EVALUATORS[kind].load(path, device=device, dtype=dtype, name=label, trust_checkpoint=trust_checkpoint)
