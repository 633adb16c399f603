"""The masked diffusion objective (``model.objective: diffusion``, bidirectional attention), with
causal-to-bidirectional attention annealing.

Its loss is the absorbing-state negative ELBO: every masked target position i is scored by
w(t) * CE, w(t) = -alpha'(t) / (1 - alpha(t)), its prediction read at i - 1 with the shift (the
AR alignment) or at i without. ``elbo`` normalisation divides the sum by the number of real
target positions (padding and protected prompts excluded), ``masked`` by the number scored;
``unweighted`` is the plain mean CE of the scored tokens (Fast-dLLM v2). With SUBS
(``diffusion.subs``, on for an added mask token) the mask token's logit is left out of the softmax.
"""

from __future__ import annotations

from lightning_dlm.core.annealing import anneal_ratio, annealing_mask
from lightning_dlm.core.corruption import corrupt, maskable_positions
from lightning_dlm.core.loss import loss_terms_from_ce, scored_rows
from lightning_dlm.core.schedules import sample_t
from lightning_dlm.core.seeding import derive_seed, make_generator
from lightning_dlm.objectives.base import GridObjective, StepTerms, register_objective, subs_drop_id


@register_objective("diffusion")
class DiffusionObjective(GridObjective):
    """Bidirectional masked diffusion: one t per sequence, each maskable token masked w.p. 1 - alpha(t)."""

    def diffusion_terms(self, net, x0, attention_mask, t, allowed, generator, document_ids=None, protected=None):
        """Corrupt ``x0`` at times ``t`` (B,), run the model, return (LossTerms, masked, maskable).

        The model gives the logits of the scored rows only (about half of them on average; its
        LM head runs on those rows alone when that is exact), which is all the loss needs.
        ``allowed`` is the annealing mask (None: bidirectional); ``protected`` (B, L) True = never
        noised nor scored (an SFT prompt: ``batch["prompt_mask"]``).
        """
        shift = self.cfg.shift
        maskable = maskable_positions(x0.shape, shift, attention_mask, protected=protected, device=x0.device)
        xt, masked = corrupt(x0, t, net.mask_token_id, self.schedule, maskable, generator)
        num_targets = maskable.sum()  # real target positions (no padding), a tensor: no host sync
        sources, targets = scored_rows(x0, masked, shift)
        ce = net.scored_ce(xt, sources, targets, attention_mask=attention_mask, allowed=allowed,
                           document_ids=document_ids, drop_id=subs_drop_id(self.cfg, net))
        weights = self.schedule.weight(t.float()).to(x0.device)[:, None].expand_as(sources)[sources]
        return loss_terms_from_ce(ce, weights, num_targets), masked, maskable

    def train_terms(self, net, batch, *, step, counter, rank):
        """t and the masks drawn from (seed, counter, rank), the annealing mask a hash of its own
        seed (tag 2): evaluated densely or inside the attention kernel."""
        cfg = self.cfg
        x0 = batch["input_ids"]
        generator = make_generator(self.seed, counter, rank, device=x0.device)
        t = sample_t(x0.shape[0], cfg.eps, cfg.t_sampling, generator, x0.device)
        ratio = anneal_ratio(step, cfg.anneal_steps)
        allowed = annealing_mask(cfg.anneal_mask, ratio, derive_seed(self.seed, counter, rank, 2))
        terms, masked, maskable = self.diffusion_terms(net, x0, batch.get("attention_mask"), t, allowed, generator,
                                                       document_ids=batch.get("document_ids"),
                                                       protected=batch.get("prompt_mask"))
        return StepTerms(terms, masked, maskable, ratio)

    def level_terms(self, net, x0, t, attention_mask, generator, document_ids, protected):
        return self.diffusion_terms(net, x0, attention_mask, t, None, generator, document_ids=document_ids,
                                    protected=protected)[0]
