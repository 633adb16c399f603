"""Where a diffusion LM's loss comes from, and how it decodes: the numbers behind ``notebooks/``.

Pure torch and the :class:`~lightning_dlm.model.DiffusionModel` API (no Lightning, no
matplotlib: the plots are :mod:`lightning_dlm.research.plots`).

* :func:`noise_grid`: the cross-entropy of every target token, masked at every t of a fixed grid
  (the model's own schedule, shift and eps), as a :class:`NoiseGrid` with three views:
  :meth:`NoiseGrid.by_t` (the NELBO contribution w(t) E[masked CE] / targets, and the plain CE
  per masked token, against t), :meth:`NoiseGrid.by_position` and :meth:`NoiseGrid.by_token` (each
  token's expected weighted CE over t: its share of the bound). The mean over the grid of the
  ``by_t`` NELBO, the mean of ``by_position`` and the mean of ``by_token`` are the same number:
  a midpoint-rule estimate of the training objective E_{t ~ U(eps, 1)}, the NELBO per token.
  :func:`nelbo_by_t`, :func:`loss_by_position` and :func:`diffusion_token_bound` are those views
  in one call.
* :func:`ar_token_nll`: the exact per-token NLL of a causal LM on the same tokens.
* :func:`denoising_trajectory`: which slot the sampler committed at which step, and the
  probability the model gave the committed token at that step.
* :func:`load_diffusion_model`, :func:`load_original`, :func:`original_as_diffusion`,
  :func:`text_blocks`, :func:`run_folders`, :func:`read_results`: loading, with one-line errors.

Every corruption comes from a generator seeded by (seed, draw, block, level), so the numbers do
not depend on the batch size.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lightning_dlm.core import corrupt, maskable_positions, scored_rows, t_grid
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.seeding import make_generator


# --- loading --------------------------------------------------------------------------------------
def _missing_local(path: str) -> bool:
    """A local path (not a hub name ``owner/model``) that does not exist."""
    hub_like = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    return not os.path.exists(os.path.expanduser(path)) and not hub_like


def load_diffusion_model(path: str, map_location="cpu", trust_checkpoint: bool = False):
    """``DiffusionModel.from_pretrained(path)`` (eval mode), with a one-line error for a missing path."""
    from lightning_dlm.model import DiffusionModel

    if _missing_local(str(path)):
        raise DLMError(f"checkpoint '{path}' does not exist: run `make demo` to train the demo checkpoint, or set "
                       f"the notebook's `checkpoint` parameter to a .ckpt or exported folder (papermill -p checkpoint PATH)")
    return DiffusionModel.from_pretrained(str(path), map_location=map_location, trust_checkpoint=trust_checkpoint)


def _require_original(path: str) -> None:
    if _missing_local(str(path)):
        raise DLMError(f"original model '{path}' does not exist: run `make assets` for assets/smollm2-135m, or set the "
                       f"notebook's `original_model` parameter to the causal LM the checkpoint was adapted from")


def load_original(path: str, map_location="cpu"):
    """The original causal LM (a transformers ``AutoModelForCausalLM``, causal attention), in eval mode."""
    from lightning_dlm.model import BackboneConfig, load_causal_lm

    _require_original(path)
    return load_causal_lm(BackboneConfig(pretrained=str(path))).to(map_location).eval()


def original_as_diffusion(path: str, like, map_location="cpu"):
    """The model before adaptation: the causal LM at ``path`` wrapped as a DiffusionModel with the
    mask token and diffusion config of the adapted model ``like`` (a token added the same way, or
    the same reused id), so the same diffusion objective can be evaluated on un-adapted weights."""
    from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer

    _require_original(path)
    if like.mask_token_added:
        token = getattr(like.tokenizer, "mask_token", None) or MaskTokenConfig.token
        mask = MaskTokenConfig(mode="add", token=token)
    else:
        mask = MaskTokenConfig(mode="reuse", id=like.mask_token_id)
    cfg = BackboneConfig(pretrained=str(path), mask_token=mask)
    model = DiffusionModel.from_config(cfg, load_tokenizer(str(path)), diffusion=like.diffusion)
    if model.mask_token_id != like.mask_token_id:
        raise DLMError(f"original model '{path}' gets mask id {model.mask_token_id}, the checkpoint has "
                       f"{like.mask_token_id}: give the causal LM the checkpoint was adapted from")
    return model.to(map_location).eval()


def text_blocks(path: str, tokenizer, seq_len: int = 128, max_blocks: int = 8, sample_by: str = "document"):
    """The first ``max_blocks`` blocks of ``seq_len`` tokens packed from a text file or folder,
    as evaluation packs them (LongTensor (N, seq_len))."""
    from lightning_dlm.data.packing import DocumentEncoder
    from lightning_dlm.data.sources import CorpusSource, open_corpora
    from lightning_dlm.data.stream import build_eval_blocks

    if not os.path.exists(path):
        raise DLMError(f"text '{path}' does not exist: run `make assets` for assets/shakespeare, or set the notebook's "
                       f"`text` parameter to a text file or folder")
    corpora = open_corpora([CorpusSource(path=path, sample_by=sample_by)])
    return build_eval_blocks(corpora, DocumentEncoder(tokenizer), seq_len, max_blocks)


def run_folders(pattern: str) -> Tuple[List[str], List[str]]:
    """The folders a glob matches, sorted, as (those holding TensorBoard logs, those without any
    yet: arms of a sweep that have not started)."""
    folders = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
    logged = [p for p in folders if glob.glob(os.path.join(glob.escape(p), "**", "events.out.tfevents.*"), recursive=True)]
    return logged, [p for p in folders if p not in logged]


_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def read_results(path: str) -> Optional[Tuple[str, List[str]]]:
    """A committed RESULTS.md as (its markdown without image links, the linked image paths that
    exist, resolved against the file's folder); None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    folder = os.path.dirname(path)
    images = [os.path.join(folder, link) for link in _IMAGE.findall(text) if "://" not in link]
    return _IMAGE.sub("", text), [p for p in images if os.path.isfile(p)]


@contextlib.contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# --- loss against the noise level -----------------------------------------------------------------
@dataclass
class NoiseGrid:
    """The masked cross-entropy of ``blocks`` at every level of a grid of t.

    ``ce[j, r, i, p]``: CE (nats) of token p of block i when masked at level j in draw r (0 where
    it was not masked); ``masked`` the same positions as bool; ``targets`` (N, L) the positions
    that can be targets (not position 0 with the shift); ``t`` and ``weight`` = w(t) per level.
    """

    t: torch.Tensor  # (J,) float64
    weight: torch.Tensor  # (J,) float64
    ce: torch.Tensor  # (J, R, N, L) float64
    masked: torch.Tensor  # (J, R, N, L) bool
    targets: torch.Tensor  # (N, L) bool

    @property
    def weighted(self) -> torch.Tensor:
        """w(t_j) * CE, (J, R, N, L)."""
        return self.weight[:, None, None, None] * self.ce

    @property
    def nelbo(self) -> float:
        """The NELBO per token: the grid's midpoint estimate of E_{t ~ U(eps, 1)}[w(t) CE sum / targets]."""
        return float(self.by_t()["nelbo"].mean())

    @property
    def nelbo_se(self) -> float:
        """Standard error of :attr:`nelbo` over the draws (each draw masks every level afresh: an
        independent replicate); NaN with one draw."""
        per_draw = self.weighted.sum(dim=(2, 3)).mean(dim=0) / int(self.targets.sum())
        draws = per_draw.numel()
        return float(per_draw.std() / draws ** 0.5) if draws > 1 else float("nan")

    def by_t(self) -> Dict[str, torch.Tensor]:
        """Per level: ``nelbo`` = w(t) * (CE summed over masked tokens) / target tokens, averaged over
        draws (the integrand of the NELBO); ``masked_ce`` = CE per masked token (pooled over draws);
        ``masked_fraction`` of the targets; and ``t``."""
        n_targets = int(self.targets.sum())
        draws = self.ce.shape[1]
        nelbo = self.weighted.sum(dim=(2, 3)).mean(dim=1) / n_targets
        n_masked = self.masked.sum(dim=(1, 2, 3)).double()
        masked_ce = self.ce.sum(dim=(1, 2, 3)) / n_masked.clamp_min(1)
        masked_ce[n_masked == 0] = float("nan")
        return dict(t=self.t, nelbo=nelbo, masked_ce=masked_ce, masked_fraction=n_masked / (draws * n_targets))

    def by_token(self) -> torch.Tensor:
        """(N, L): each token's expected weighted CE over the grid and draws (NaN where not a target)."""
        out = self.weighted.mean(dim=(0, 1))
        return out.masked_fill(~self.targets, float("nan"))

    def by_position(self) -> torch.Tensor:
        """(L,): the mean of :meth:`by_token` over the blocks (NaN at positions that are never targets)."""
        by_token = self.weighted.mean(dim=(0, 1)).sum(dim=0)
        count = self.targets.sum(dim=0).double()
        return (by_token / count.clamp_min(1)).masked_fill(count == 0, float("nan"))


@torch.no_grad()
def noise_grid(model, blocks: torch.Tensor, levels: int = 16, draws: int = 2, seed: int = 0,
               batch_size: int = 8) -> NoiseGrid:
    """Mask ``blocks`` (N, L) at each of ``levels`` grid points of t (``t_grid(levels, eps)``, the
    model's eps), ``draws`` times, with the model's schedule and shift, and record the CE of every
    masked target token (the model's ``scored_logits``: the LM head runs on masked rows only)."""
    if levels < 1 or draws < 1:
        raise DLMError(f"levels and draws must be >= 1 (got {levels}, {draws})")
    blocks = torch.as_tensor(blocks, dtype=torch.long)
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise DLMError(f"blocks must be (N, L) token ids with L >= 2, got shape {tuple(blocks.shape)}")
    schedule, shift = model.schedule, model.shift
    device = next(model.parameters()).device
    n, length = blocks.shape
    t = t_grid(levels, eps=model.diffusion.eps).double()
    targets = maskable_positions((n, length), shift=shift)
    ce = torch.zeros(levels, draws, n, length, dtype=torch.float64)
    masked_all = torch.zeros(levels, draws, n, length, dtype=torch.bool)
    with _evaluating(model):
        for j in range(levels):
            for r in range(draws):
                for lo in range(0, n, batch_size):
                    x0 = blocks[lo: lo + batch_size]
                    rows = range(lo, lo + x0.shape[0])
                    generators = [make_generator(seed, r, i, j) for i in rows]
                    xt, masked = corrupt(x0, t[j].float().expand(x0.shape[0]), model.mask_token_id, schedule,
                                         maskable=targets[lo: lo + x0.shape[0]], generator=generators)
                    sources, tokens = scored_rows(x0, masked, shift)
                    if tokens.numel():
                        logits = model.scored_logits(xt.to(device), sources.to(device))
                        token_ce = F.cross_entropy(logits.float(), tokens.to(device), reduction="none")
                        ce[j, r, lo: lo + x0.shape[0]][masked] = token_ce.double().cpu()
                    masked_all[j, r, lo: lo + x0.shape[0]] = masked
    return NoiseGrid(t=t, weight=schedule.weight(t), ce=ce, masked=masked_all, targets=targets)


def nelbo_by_t(model, blocks: torch.Tensor, levels: int = 16, draws: int = 2, seed: int = 0,
               batch_size: int = 8) -> Dict[str, torch.Tensor]:
    """:meth:`NoiseGrid.by_t` of :func:`noise_grid` (its ``nelbo`` averaged over t is the NELBO per token)."""
    return noise_grid(model, blocks, levels, draws, seed, batch_size).by_t()


def loss_by_position(model, blocks: torch.Tensor, levels: int = 16, draws: int = 2, seed: int = 0,
                     batch_size: int = 8) -> torch.Tensor:
    """:meth:`NoiseGrid.by_position`: the mean NELBO contribution of each position of the sequence."""
    return noise_grid(model, blocks, levels, draws, seed, batch_size).by_position()


def diffusion_token_bound(model, ids: torch.Tensor, levels: int = 32, draws: int = 4, seed: int = 0,
                          batch_size: int = 8) -> torch.Tensor:
    """(N, L - 1): tokens 1..L-1's expected weighted CE over t, their shares of the NELBO, beside
    :func:`ar_token_nll` of the same ids (the first token is context for both; a model without the
    shift also scores it, which is left out here)."""
    return noise_grid(model, ids, levels, draws, seed, batch_size).by_token()[:, 1:]


# --- the autoregressive model ---------------------------------------------------------------------
@torch.no_grad()
def ar_token_nll(causal_lm, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, L - 1) float64: -log p(ids[:, j] | ids[:, :j]) for j = 1..L-1 under a causal LM."""
    if hasattr(causal_lm, "mask_token_id") and not getattr(causal_lm.config, "is_causal", True):
        raise DLMError("ar_token_nll needs the original causal LM (load_original(path)), not a bidirectional "
                       "DiffusionModel")
    ids = torch.as_tensor(ids, dtype=torch.long)
    device = next(causal_lm.parameters()).device
    out = []
    with _evaluating(causal_lm):
        for lo in range(0, ids.shape[0], batch_size):
            x = ids[lo: lo + batch_size].to(device)
            logits = causal_lm(input_ids=x).logits[:, :-1].float()
            nll = -torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            out.append(nll.double().cpu())
    return torch.cat(out)


# --- decoding -------------------------------------------------------------------------------------
@dataclass
class Trajectory:
    """One decode, slot by slot: ``committed_at[k]`` is the step slot k was committed at and
    ``probability[k]`` the model's probability of the committed token at that step (softmax of its
    logits on the canvas before the step, temperature 1, no filtering, never-sampled ids excluded:
    the ``probability`` confidence the confidence strategies rank by)."""

    prompt: str
    strategy: str
    steps: int  # steps the sampler ran
    committed_at: torch.Tensor  # (length,) long
    probability: torch.Tensor  # (length,) float64
    token_ids: List[int]
    tokens: List[str]  # each slot's final token, as text
    text: str
    committed_per_step: List[int]  # slots committed at each step (the sampler's statistics)
    states: torch.Tensor  # (steps + 1, W) the canvas before the first step and after every step
    target_span: Tuple[int, int]  # the generated columns of ``states``


@torch.no_grad()
def denoising_trajectory(model, prompt: str, length: int = 32, strategy: str = "random", steps: int = 32,
                         seed: int = 0, **options) -> Trajectory:
    """Decode ``length`` tokens after ``prompt`` with ``lightning_dlm.sampling.generate`` (no cache,
    ``capture_trajectory=True``; ``options``: temperature, top_p, block_size, strategy options, ...)
    and read off when each slot was committed and with what probability."""
    from lightning_dlm.sampling import generate, slot_logits, suppressed_ids

    gen = generate(model, [prompt], length=length, steps=steps, strategy=strategy, seed=seed, cache="none",
                   capture_trajectory=True, **options)
    a, b = gen.target_span
    initial = gen.trajectory[0].clone()
    initial[:, a:b] = gen.mask_id
    states = torch.stack([initial[0]] + [state[0] for state in gen.trajectory])  # (steps + 1, W)
    region = states[:, a:b]
    open_ = region == gen.mask_id
    newly = open_[:-1] & ~open_[1:]  # (steps, length): committed at that step
    if not bool((newly.sum(0) == 1).all()):
        raise RuntimeError("the trajectory does not commit every slot exactly once")
    committed_at = newly.long().argmax(0)
    probability = torch.full((b - a,), float("nan"), dtype=torch.float64)
    device = next(model.parameters()).device
    suppress = suppressed_ids(model, model.tokenizer)
    with _evaluating(model):
        for s in newly.any(1).nonzero().flatten().tolist():
            logits = slot_logits(model(states[s: s + 1].to(device)).float(), model.shift)[0, a:b]
            logits[:, suppress] = float("-inf")
            probs = torch.softmax(logits, dim=-1).cpu()
            cols = newly[s].nonzero().flatten()
            probability[cols] = probs[cols, region[s + 1, cols]].double()
    token_ids = gen.token_ids[0]
    return Trajectory(prompt=prompt, strategy=strategy, steps=len(gen.trajectory), committed_at=committed_at,
                      probability=probability, token_ids=token_ids,
                      tokens=[model.tokenizer.decode([tok]) for tok in token_ids], text=gen.texts[0],
                      committed_per_step=[row[0] for row in gen.stats.committed_per_step], states=states,
                      target_span=(a, b))


def decode_tokens(tokenizer, ids: Sequence[int]) -> List[str]:
    """Each id as its own text (for axis labels)."""
    return [tokenizer.decode([int(i)]) for i in ids]
