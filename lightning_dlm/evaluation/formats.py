"""Task file formats: public datasets' records turned into scoring items.

Each format names the fields it needs and turns one record into an item:

* multiple choice (:class:`ChoiceItem`): ``hellaswag``, ``winogrande``, ``siqa``, ``piqa``, and
  ``choice`` (``{"context", "choices", "label"}``, the generic form);
* generation (:class:`AnswerItem`): ``lambada`` (last word), ``triviaqa`` and ``squad`` (short
  answers), ``rocstories`` (infill the third sentence), and ``answer`` (``{"prompt", "answers"}``
  with an optional ``"suffix"``).

Prompt templates follow lm-evaluation-harness where it has the task, so numbers are comparable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from lightning_dlm.core.errors import DLMError


@dataclass
class ChoiceItem:
    """One multiple-choice question: option i is ``continuations[i]`` after ``contexts[i]``."""

    contexts: List[str]
    continuations: List[str]
    label: int


@dataclass
class AnswerItem:
    """One generation question: generate after ``prompt`` (and before ``suffix``), compare with ``answers``."""

    prompt: str
    answers: List[str]
    suffix: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "choice" or "answer"
    fields: Sequence[str]
    convert: Callable[[Dict[str, Any]], Any]


FORMATS: Dict[str, Format] = {}


def register(name: str, kind: str, fields: Sequence[str]):
    def wrap(fn):
        FORMATS[name] = Format(name, kind, tuple(fields), fn)
        return fn

    return wrap


def _label(value, options: int, base: int = 0) -> int:
    label = int(value) - base
    if not 0 <= label < options:
        raise ValueError(f"label {value} is outside the {options} options")
    return label


# --- multiple choice -------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return " ".join(text.replace("[header]", "").replace("[step]", "").split())


@register("hellaswag", "choice", ("ctx_a", "ctx_b", "activity_label", "endings", "label"))
def hellaswag(r):
    ctx = f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
    context = _hellaswag_clean(f"{r['activity_label']}: {ctx}")
    endings = [" " + _hellaswag_clean(e) for e in r["endings"]]
    return ChoiceItem([context] * len(endings), endings, _label(r["label"], len(endings)))


@register("winogrande", "choice", ("sentence", "option1", "option2", "answer"))
def winogrande(r):
    sentence = r["sentence"]
    if "_" not in sentence:
        raise ValueError("the sentence has no '_' blank")
    cut = sentence.index("_")
    rest = " " + sentence[cut + 1:].strip()
    options = [r["option1"], r["option2"]]
    return ChoiceItem([sentence[:cut] + o for o in options], [rest, rest], _label(r["answer"], 2, base=1))


@register("siqa", "choice", ("context", "question", "answerA", "answerB", "answerC", "label"))
def siqa(r):
    context = f"Question: {r['context']} {r['question']}\nAnswer:"
    options = [" " + r[k] for k in ("answerA", "answerB", "answerC")]
    return ChoiceItem([context] * 3, options, _label(r["label"], 3, base=1))


@register("piqa", "choice", ("goal", "sol1", "sol2", "label"))
def piqa(r):
    context = f"Question: {r['goal']}\nAnswer:"
    return ChoiceItem([context] * 2, [" " + r["sol1"], " " + r["sol2"]], _label(r["label"], 2))


@register("choice", "choice", ("context", "choices", "label"))
def choice(r):
    options = list(r["choices"])
    if len(options) < 2:
        raise ValueError("a multiple-choice item needs at least 2 choices")
    return ChoiceItem([r["context"]] * len(options), options, _label(r["label"], len(options)))


# --- generation ------------------------------------------------------------------------------
@register("lambada", "answer", ("text",))
def lambada(r):
    text = r["text"].rstrip()
    if " " not in text:
        raise ValueError("the text has no last word to predict")
    cut = text.rindex(" ")
    return AnswerItem(text[:cut], [text[cut + 1:]])


def _aliases(answer) -> List[str]:
    if isinstance(answer, dict):
        values = list(answer.get("aliases") or []) + ([answer["value"]] if answer.get("value") else [])
        values = values or list(answer.get("text") or [])
    elif isinstance(answer, str):
        values = [answer]
    else:
        values = list(answer)
    values = [v for v in dict.fromkeys(values) if v]
    if not values:
        raise ValueError("the record has no answer text")
    return values


@register("triviaqa", "answer", ("question", "answer"))
def triviaqa(r):
    return AnswerItem(f"Question: {r['question']}\nAnswer:", _aliases(r["answer"]))


@register("squad", "answer", ("context", "question", "answers"))
def squad(r):
    return AnswerItem(f"{r['context']}\n\nQuestion: {r['question']}\nAnswer:", _aliases(r["answers"]))


@register("rocstories", "answer", ("sentence1", "sentence2", "sentence3", "sentence4", "sentence5"))
def rocstories(r):
    s = [r[f"sentence{i}"].strip() for i in range(1, 6)]
    return AnswerItem(f"{s[0]} {s[1]}", [s[2]], suffix=f" {s[3]} {s[4]}")


@register("answer", "answer", ("prompt", "answers"))
def answer(r):
    return AnswerItem(r["prompt"], _aliases(r["answers"]), suffix=r.get("suffix") or "")


# --- conversion ------------------------------------------------------------------------------
def convert_records(records: Sequence[Dict[str, Any]], fmt: str, source: str, kind: str,
                    places: Optional[Sequence[str]] = None) -> list:
    """Items of ``records`` in format ``fmt``; clear errors for unknown formats and bad records,
    which name the record by ``places[n]`` (``line 3``, from :func:`~lightning_dlm.evaluation.data.read_located`),
    or as ``record n`` counted from 1."""
    if fmt not in FORMATS:
        raise DLMError(f"unknown task format '{fmt}': choose one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    if spec.kind != kind:
        wanted = sorted(n for n, f in FORMATS.items() if f.kind == kind)
        raise DLMError(f"format '{fmt}' is a {spec.kind} format, this task needs one of {wanted}")
    if not records:
        raise DLMError(f"task file '{source}' has no records: give a file with at least one {fmt} record")
    items = []
    for n, record in enumerate(records):
        place = places[n] if places is not None else f"record {n + 1}"
        missing = [f for f in spec.fields if f not in record]
        if missing:
            raise DLMError(
                f"{place} of '{source}' lacks field(s) {missing} of the {fmt} format "
                f"(it has {sorted(record)[:8]}): pick the right format, or rename the fields"
            )
        try:
            items.append(spec.convert(record))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DLMError(f"{place} of '{source}' is not a valid {fmt} record: {err}") from None
    return items


def dumps(item) -> str:
    return json.dumps(item.__dict__, ensure_ascii=False)
