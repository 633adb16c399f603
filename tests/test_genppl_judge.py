"""Generative perplexity's judge: its NLL is the next-token NLL transformers itself computes.

``score_samples`` scores each sample token under the AR judge's logits at the position before it
(the shift). The reference here is the model's own loss, ``model(input_ids, labels=...)``, which
shifts internally: a judge that compared logits[i] with token i (no shift), scored the prompt, or
dropped a token would give another number.
"""

import math

import pytest
import torch

from lightning_dlm.evaluation import CausalEvaluator
from lightning_dlm.evaluation.genppl import score_samples
from lightning_dlm.model.loading import load_tokenizer
from tests.conftest import FAMILIES, TINY_TOKENIZER


def tiny_judge(family: str) -> CausalEvaluator:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    # the tiny tokenizer's 512 ids; wide initial weights, so that a token's logits depend on which position they are read at
    config = AutoConfig.for_model(**dict(FAMILIES[family], vocab_size=512, bos_token_id=0, eos_token_id=0,
                                         initializer_range=0.5))
    return CausalEvaluator(AutoModelForCausalLM.from_config(config), load_tokenizer(TINY_TOKENIZER))


def reference_nll(judge: CausalEvaluator, prompt: str, text: str):
    """(summed NLL, scored tokens) of ``text`` after ``prompt``, by transformers' own shifted loss."""
    lead = [judge.start_id] if judge.start_id is not None else []
    context = lead + judge.encode(prompt)
    ids = torch.tensor([context + judge.encode(text)])
    labels = ids.clone()
    labels[0, : len(context)] = -100  # the prompt conditions, it is not scored
    n = int((labels[0, 1:] != -100).sum())
    with torch.no_grad():
        loss = judge.model(input_ids=ids, labels=labels).loss
    return float(loss) * n, n


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gen_ppl_is_the_judges_own_shifted_next_token_loss(family):
    judge = tiny_judge(family)
    prompts = ["Once upon a time", "The dog", ""]
    texts = [" there was a cat that sat", " ran to the park and back home again", "The king was old."]
    result = score_samples(judge, prompts, texts, batch_size=2)  # padded batches of rows of different lengths
    pairs = [reference_nll(judge, p, t) for p, t in zip(prompts, texts)]
    total, count = sum(s for s, _ in pairs), sum(n for _, n in pairs)
    assert result["tokens"] == count == sum(len(judge.encode(t)) for t in texts)
    assert result["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    # one sample alone: the same number as the model's loss on it
    alone = score_samples(judge, prompts[1], [texts[1]])
    assert alone["gen_ppl"] == pytest.approx(math.exp(pairs[1][0] / pairs[1][1]), rel=1e-4)
