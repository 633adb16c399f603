"""The causal LM objective (``model.objective: ar``): next-token cross-entropy under causal
attention on the clean input, no mask token, through the same model, data and trainer as the
diffusion runs, so the ablation's AR baseline is compared on the same footing.

Its evaluation NLL is exact (an AR model's likelihood is not a bound), over the same targets as
the diffusion runs' (every real token after the first of a row, prompts excluded); the diffusion
options (schedule, shift, annealing) are unused.
"""

from __future__ import annotations

import torch

from lightning_dlm.core.annealing import causal_allowed
from lightning_dlm.core.corruption import maskable_positions
from lightning_dlm.core.loss import loss_terms_from_ce, scored_rows
from lightning_dlm.objectives.base import Objective, StepTerms, register_objective


def causal_terms(net, x0, attention_mask=None, document_ids=None, protected=None):
    """Every real token after the first predicted from the tokens before it (causal attention,
    clean input). Returns (LossTerms, targets (B, L))."""
    targets = maskable_positions(x0.shape, True, attention_mask, protected=protected, device=x0.device)
    sources, labels = scored_rows(x0, targets, shift=True)
    ce = net.scored_ce(x0, sources, labels, attention_mask=attention_mask,
                       allowed=causal_allowed(x0.shape[1], x0.device), document_ids=document_ids)
    ones = torch.ones(labels.shape, device=ce.device)
    return loss_terms_from_ce(ce, ones, targets.sum()), targets


@register_objective("ar")
class CausalObjective(Objective):
    """The plain causal LM objective; every target is scored, so both normalisations agree."""

    def train_terms(self, net, batch, *, step, counter, rank):
        terms, targets = causal_terms(net, batch["input_ids"], batch.get("attention_mask"), batch.get("document_ids"),
                                      protected=batch.get("prompt_mask"))
        return StepTerms(terms, targets, targets, 0.0)

    @torch.no_grad()
    def eval_nll(self, net, x0, attention_mask=None, *, batch_key=0, levels=None, document_ids=None, row_keys=None,
                 protected=None):
        """The exact NLL per target token (the keys and levels do not matter: nothing is drawn)."""
        terms, _ = causal_terms(net, x0, attention_mask, document_ids, protected=protected)
        num_targets = int(terms.num_targets)
        return terms.weighted_sum / max(1, num_targets), num_targets
