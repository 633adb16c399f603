"""The evaluation tasks, by name: what data they read, how they score a model, what they report.

=================  =========================================================================
``likelihood``     NELBO bound (diffusion) or exact NLL (AR) per token of a corpus, perplexity
``multiple_choice``HellaSwag / WinoGrande / SIQA / PIQA / generic choices: accuracy
``lambada``        last-word exact match, the target's token count as the length (oracle)
``short_answer``   TriviaQA / SQuAD: exact match and F1, length = answer tokens + 10
``infilling``      ROCStories: generate the 3rd sentence between the others, ROUGE-1/2/L
``gen_ppl``        samples scored by an AR evaluator: perplexity, distinct-n, entropy
=================  =========================================================================

Every task is a dataclass of its options (so a YAML entry or CLI flags are checked against its
fields) with ``run(evaluator, bar) -> metrics``.
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional

import torch

import lightning_dlm.evaluation.metrics as M
from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.data import read_located
from lightning_dlm.evaluation.evaluators import evaluator_type, load_evaluator
from lightning_dlm.evaluation.formats import convert_records
from lightning_dlm.evaluation.tasks.registry import register_task
from lightning_dlm.sampling.engine import sampler_defaults

Bar = Callable[[int, str], Callable[[int], None]]  # (total work, label) -> advance(n)


@dataclass
class Task:
    name: str = ""
    data: str = ""
    batch_size: int = 16
    seed: int = 0
    limit: Optional[int] = None

    kind = "?"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        raise NotImplementedError

    def records(self, fmt: str, kind: str) -> list:
        if not self.data:
            raise DLMError(f"task '{self.name}' has no data: set data to a task file")
        records, places = read_located(self.data, limit=self.limit)
        return convert_records(records, fmt, self.data, kind, places)


# --- likelihood ------------------------------------------------------------------------------
@register_task
@dataclass
class LikelihoodTask(Task):
    """Per-token NLL of a corpus (text, json or parquet files, or a folder of them)."""

    seq_len: int = 128
    max_blocks: int = 64
    sample_by: str = "document"
    text_field: str = "text"
    levels: int = 8  # diffusion: strata of t per block
    draws: int = 4  # diffusion: independent replicates (standard error)
    batch_size: int = 8

    kind = "likelihood"

    def blocks(self, tokenizer) -> torch.Tensor:
        from lightning_dlm.data.packing import DocumentEncoder
        from lightning_dlm.data.sources import CorpusSource, open_corpora
        from lightning_dlm.data.stream import build_eval_blocks

        if not self.data:
            raise DLMError(f"task '{self.name}' has no data: set data to a corpus file or folder")
        corpora = open_corpora([CorpusSource(path=self.data, sample_by=self.sample_by, text_field=self.text_field)])
        return build_eval_blocks(corpora, DocumentEncoder(tokenizer), self.seq_len, self.max_blocks)

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        limit = evaluator.max_length
        if limit is not None and self.seq_len > limit:
            raise DLMError(f"seq_len {self.seq_len} is above the model's position limit {limit}: lower seq_len")
        blocks = self.blocks(evaluator.tokenizer)
        opts = dict(levels=self.levels, draws=self.draws, batch_size=self.batch_size, seed=self.seed)
        advance = bar(evaluator.likelihood_work(blocks.shape[0], **opts), self.name)
        result = evaluator.likelihood(blocks, progress=advance, **opts)
        digest = hashlib.sha1(blocks.numpy().tobytes()).hexdigest()[:12]
        return dict(result, blocks=blocks.shape[0], seq_len=self.seq_len, tokens_sha1=digest)


# --- multiple choice -------------------------------------------------------------------------
@register_task
@dataclass
class MultipleChoiceTask(Task):
    """Accuracy: diffusion picks the lowest mean masked CE (the paper), AR the highest
    log-likelihood (lm-eval's ``acc``); ``acc_norm`` divides the (bound on the) log-likelihood by
    the continuation's characters for both."""

    format: str = "choice"
    levels: int = 32
    batch_size: int = 32

    kind = "multiple_choice"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        from torchmetrics.functional.classification import multiclass_accuracy

        items = self.records(self.format, "choice")
        contexts = [c for item in items for c in item.contexts]
        continuations = [c for item in items for c in item.continuations]
        advance = bar(evaluator.choice_work(len(contexts), levels=self.levels), self.name)
        out = evaluator.choice(contexts, continuations, levels=self.levels, batch_size=self.batch_size,
                               seed=self.seed, progress=advance)
        width = max(len(item.continuations) for item in items)
        primary = evaluator_type(evaluator).primary_choice_score(out)
        norm = [ll / max(1, len(c)) for ll, c in zip(out["loglik"], continuations)]
        preds, preds_norm, at = [], [], 0
        for item in items:
            n = len(item.continuations)
            pad = [float("-inf")] * (width - n)
            preds.append(torch.tensor(primary[at: at + n] + pad).argmax())
            preds_norm.append(torch.tensor(norm[at: at + n] + pad).argmax())
            at += n
        target = torch.tensor([item.label for item in items])
        acc = multiclass_accuracy(torch.stack(preds), target, num_classes=width, average="micro")
        acc_norm = multiclass_accuracy(torch.stack(preds_norm), target, num_classes=width, average="micro")
        n = len(items)
        return dict(acc=float(acc), acc_se=M.proportion_se(float(acc), n), acc_norm=float(acc_norm),
                    acc_norm_se=M.proportion_se(float(acc_norm), n), items=n,
                    chance=M.mean([1 / len(item.continuations) for item in items]))


# --- generation ------------------------------------------------------------------------------
_SAMPLER = sampler_defaults()  # SamplerConfig's defaults: the sampler options not set by a protocol below

#: Where the evaluation protocol decodes differently from the sampler's defaults: most confident
#: slot first, argmax, one step per generated token (steps None). Every other sampler option of a
#: generation task defaults to SamplerConfig's.
EVAL_DECODING: Dict[str, Any] = dict(steps=None, strategy="confidence", temperature=0.0, top_p=1.0)
#: Generative perplexity draws from the model: the paper's random order, temperature 1, no nucleus.
GEN_PPL_DECODING: Dict[str, Any] = dict(EVAL_DECODING, strategy="random", temperature=1.0)


@dataclass
class GenerationTask(Task):
    """Shared options of the generation tasks: the sampler's (diffusion) or greedy decoding (AR)."""

    steps: Optional[int] = EVAL_DECODING["steps"]  # diffusion steps T (None: one per generated token)
    strategy: str = EVAL_DECODING["strategy"]
    temperature: float = EVAL_DECODING["temperature"]
    top_p: float = EVAL_DECODING["top_p"]
    top_k: int = _SAMPLER["top_k"]
    block_size: Optional[int] = _SAMPLER["block_size"]
    cache: str = _SAMPLER["cache"]
    show: int = 3  # examples kept in the results

    decoding_protocol: ClassVar[Dict[str, Any]] = EVAL_DECODING  # the defaults that are not SamplerConfig's

    def decoding(self, evaluator, length: int) -> Dict[str, Any]:
        """The decoding options for ``length`` tokens, as the evaluator's class takes them (the
        sampler's for a diffusion model)."""
        return evaluator_type(evaluator).decoding(self, length)

    def generate_grouped(self, evaluator, items, lengths: List[int], bar: Bar) -> List[str]:
        """Generate each item at its own length, batching the items of equal length together."""
        groups = defaultdict(list)
        for i, n in enumerate(lengths):
            groups[n].append(i)
        advance = bar(len(items), self.name)
        out: List[str] = [""] * len(items)
        for n, idx in sorted(groups.items()):
            prompts = [items[i].prompt for i in idx]
            suffixes = [items[i].suffix for i in idx] if any(items[i].suffix for i in idx) else None
            texts = evaluator.generate(prompts, n, suffixes=suffixes, batch_size=self.batch_size,
                                       progress=advance, **self.decoding(evaluator, n))
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    def examples(self, items, predictions) -> List[Dict[str, Any]]:
        return [dict(prompt=item.prompt[-200:], suffix=item.suffix[:200], answer=item.answers[0], prediction=pred)
                for item, pred in list(zip(items, predictions))[: self.show]]


@register_task
@dataclass
class LambadaTask(GenerationTask):
    """Last-word exact match; the target word's token count is the generated length."""

    format: str = "lambada"

    kind = "lambada"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        items = self.records(self.format, "answer")
        lengths = [len(evaluator.encode(" " + item.answers[0])) for item in items]
        predictions = self.generate_grouped(evaluator, items, lengths, bar)
        words = [(p.strip().split() or [""])[0] for p in predictions]
        hits = [float(w == item.answers[0].strip()) for w, item in zip(words, items)]
        return dict(acc=M.mean(hits), items=len(items), examples=self.examples(items, words))


@register_task
@dataclass
class ShortAnswerTask(GenerationTask):
    """Exact match and F1 of the first line of the answer; length = answer tokens + ``extra``."""

    format: str = "triviaqa"
    extra: int = 10

    kind = "short_answer"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        items = self.records(self.format, "answer")
        lengths = [len(evaluator.encode(" " + item.answers[0])) + self.extra for item in items]
        predictions = [M.first_line(p) for p in self.generate_grouped(evaluator, items, lengths, bar)]
        return dict(em=M.mean([M.exact_match(p, item.answers) for p, item in zip(predictions, items)]),
                    f1=M.mean([M.token_f1(p, item.answers) for p, item in zip(predictions, items)]),
                    items=len(items), examples=self.examples(items, predictions))


@register_task
@dataclass
class InfillingTask(GenerationTask):
    """ROUGE-1/2/L (F) of the infilled span against the reference, length = reference tokens.
    An AR model sees the prefix only (it cannot condition on the suffix); the result says so."""

    format: str = "rocstories"

    kind = "infilling"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        from torchmetrics.text.rouge import ROUGEScore

        items = self.records(self.format, "answer")
        lengths = [len(evaluator.encode(" " + item.answers[0])) for item in items]
        predictions = [p.strip() for p in self.generate_grouped(evaluator, items, lengths, bar)]
        rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        keys = ("rouge1", "rouge2", "rougeL")
        # per item, so the mean (torchmetrics' own: an average over items) comes with its standard error
        per_item = [rouge([p], [item.answers]) for p, item in zip(predictions, items)]
        out = {}
        for k in keys:
            values = [float(s[f"{k}_fmeasure"]) for s in per_item]
            out[k], out[f"{k}_se"] = M.mean(values), M.standard_error(values)
        return dict(out, items=len(items), uses_suffix=evaluator_type(evaluator).uses_suffix,
                    examples=self.examples(items, predictions))


@register_task
@dataclass
class GenerativePerplexityTask(GenerationTask):
    """Samples (unconditional, after ``prompt``, or after each prompt of the ``data`` file: JSON
    lines with a ``prompt`` field) scored by an AR ``evaluator`` model; ``num_samples`` per prompt;
    the sampler's options as in the other generation tasks, drawing from the model by default."""

    evaluator: str = ""
    evaluator_kind: str = "ar"
    num_samples: int = 16
    length: int = 128
    prompt: str = ""
    strategy: str = GEN_PPL_DECODING["strategy"]
    temperature: float = GEN_PPL_DECODING["temperature"]
    show: int = 2

    kind = "gen_ppl"
    decoding_protocol: ClassVar[Dict[str, Any]] = GEN_PPL_DECODING

    def judge(self, device: str):
        """The evaluator model, loaded once per task (every evaluated model is scored by it)."""
        cached = getattr(self, "_judge", None)
        if cached is None or str(cached.device) != device:
            cached = self._judge = load_evaluator(self.evaluator, kind=self.evaluator_kind, device=device)
        return cached

    def prompts(self) -> List[str]:
        """Every sample's prompt: ``num_samples`` of each prompt of ``data``, or of ``prompt``."""
        if not self.data:
            return [self.prompt] * self.num_samples
        records, places = read_located(self.data, limit=self.limit)
        for place, record in zip(places, records):
            if not isinstance(record.get("prompt"), str):
                raise DLMError(f"{place} of '{self.data}' has no text field 'prompt': give JSON lines like "
                               f'{{"prompt": "ROMEO."}}')
        return [record["prompt"] for record in records for _ in range(self.num_samples)]

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        from lightning_dlm.evaluation.genppl import score_samples

        if not self.evaluator:
            raise DLMError(f"task '{self.name}' needs an evaluator: set evaluator to an AR model name or folder")
        prompts = self.prompts()
        texts = evaluator.generate(prompts, self.length, batch_size=self.batch_size,
                                   progress=bar(len(prompts), f"{self.name} (sampling)"),
                                   **self.decoding(evaluator, self.length))
        judge = self.judge(str(evaluator.device))
        if not evaluator_type(judge).can_judge:
            raise DLMError(f"the evaluator '{self.evaluator}' is a diffusion model: use an AR model to score samples")
        result = score_samples(judge, prompts, texts, batch_size=self.batch_size,
                               progress=bar(len(texts), f"{self.name} (scoring)"))
        # the samples are scored as text: say when the evaluator's tokens differ from the model's
        result["retokenized"] = any(judge.encode(t) != evaluator.encode(t) for t in texts)
        if result["retokenized"]:
            print(f"[eval] {self.name}: the evaluator '{self.evaluator}' tokenizes differently from the model; "
                  f"its samples were re-tokenized from their text", file=sys.stderr)
        result["evaluator"] = self.evaluator
        step = max(1, len(texts) // max(1, self.show))  # examples from different prompts
        result["examples"] = [(prompts[i] + texts[i])[:300] for i in range(0, len(texts), step)][: self.show]
        return result
