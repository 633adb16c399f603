"""Generative perplexity: how likely an AR evaluator finds a model's samples, next to diversity.

The samples are text, re-tokenized with the evaluator's tokenizer (so any evaluator can score
any model's samples). Perplexity comes from torchmetrics' ``Perplexity`` over the sample tokens
(the prompt, if any, conditions but is not scored); distinct-n and the unigram entropy are
computed on the same evaluator tokens, per sample, and averaged. Low entropy or distinct-n
next to a low perplexity means repetitive text, not better text.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Union

import torch

import lightning_dlm.evaluation.metrics as M
from lightning_dlm.evaluation.scoring import length_batches, pad_rows

IGNORE = -100


@torch.no_grad()
def score_samples(judge, prompt: Union[str, Sequence[str]], texts: Sequence[str], batch_size: int = 8,
                  progress: Callable[[int], None] = lambda n: None) -> Dict[str, float]:
    """gen_ppl, distinct-1..4 and entropy (bits) of ``texts`` under ``judge``: each text continues
    ``prompt`` (one prompt for all, or one per text), which conditions but is not scored."""
    from torchmetrics.text import Perplexity

    prompts = [prompt] * len(texts) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts for {len(texts)} samples: give one prompt, or one per sample")
    lead = [judge.start_id] if judge.start_id is not None else []
    contexts = {p: lead + judge.encode(p) for p in set(prompts)}
    samples = [judge.encode(t) for t in texts]
    rows = [contexts[p] + s for p, s in zip(prompts, samples)]
    context_lengths = [len(contexts[p]) for p in prompts]
    metric = Perplexity(ignore_index=IGNORE).to(judge.device)
    scored = [i for i, s in enumerate(samples) if len(rows[i]) > 1]
    for batch in length_batches([len(rows[i]) for i in scored], batch_size):
        chosen = [rows[scored[b]] for b in batch]
        ids, attention = pad_rows(chosen, judge.pad_id, judge.device)
        targets = ids[:, 1:].clone()
        for row, b in enumerate(batch):
            targets[row, : max(0, context_lengths[scored[b]] - 1)] = IGNORE
        targets[attention[:, 1:] == 0] = IGNORE
        logits = judge.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        metric.update(logits, targets)
        progress(len(batch))
    result: Dict[str, float] = dict(gen_ppl=float(metric.compute()) if scored else float("nan"),
                                    samples=len(texts), tokens=int(metric.count))
    for n in (1, 2, 3, 4):
        result[f"distinct_{n}"] = M.mean([M.distinct_n(s, n) for s in samples])
    result["entropy"] = M.mean([M.unigram_entropy(s) for s in samples])
    return result
