"""GSM8K answer extraction and exact match; HumanEval single-line infilling: items and pass@1 by execution."""

import json

import pytest

from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.formats import convert_records
from lightning_dlm.evaluation.tasks import TASKS, build_task
from lightning_dlm.evaluation.tasks.sft import (
    GSM8KTask,
    HumanEvalInfillTask,
    completed_solution,
    extract_answer,
    infill_items,
    read_problems,
    reference_answer,
)


class Stub:
    """An evaluator that answers from a function of (prompt, suffix)."""

    kind = "diffusion"

    def __init__(self, answer):
        self.answer, self.calls, self.tokenizer = answer, [], None

    def encode(self, text):
        return text.split(" ")

    def generate(self, prompts, length, suffixes=None, batch_size=8, progress=lambda n: None, **kw):
        self.calls.append(dict(length=length, **kw))
        progress(len(prompts))
        return [self.answer(p, s) for p, s in zip(prompts, suffixes or [""] * len(prompts))]


def bar(total, label):
    return lambda n: None


@pytest.mark.parametrize("text, number", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is $12.50.", "12.5"),
    ("first 3, then 5, so 8", "8"),
    ("#### -4\nand then 9", "-4"),
    ("10.0 items", "10"),
    ("no number here", None),
    ("", None),
])
def test_gsm8k_answer_extraction(text, number):
    assert extract_answer(text) == number


def test_gsm8k_reference_and_bad_records(tmp_path):
    assert reference_answer("Tom has 2 + 3 = <<2+3=5>>5.\n#### 5") == "5"
    with pytest.raises(DLMError, match=r"record 1 .* lacks field\(s\) \['answer'\]"):  # counted from 1
        convert_records([{"question": "q"}], "gsm8k", "x.jsonl", "answer")
    with pytest.raises(DLMError, match="no '#### <number>' final line"):
        convert_records([{"question": "q", "answer": "five"}], "gsm8k", "x.jsonl", "answer")
    path = tmp_path / "gsm.jsonl"  # from a file: the line, counted from 1 as sft and sample count (blank lines too)
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DLMError, match=r"^line 3 of '.*gsm.jsonl' lacks field\(s\) \['answer'\]"):
        build_task({"task": "gsm8k", "data": str(path)}).records("gsm8k", "answer")


def test_gsm8k_task_exact_match(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "What is 2 plus 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 4 times 5?", "answer": "4 * 5 = 20\n#### 20"},
            {"question": "What is 9 minus 1?", "answer": "9 - 1 = 8\n#### 8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = {"2 plus 3": "2 + 3 = 5\n#### 5", "4 times 5": "4 * 5 = 21\n#### 21", "9 minus 1": "it is 8"}
    stub = Stub(lambda prompt, suffix: next(v for k, v in replies.items() if k in prompt))
    task = build_task({"task": "gsm8k", "data": str(path)})
    assert isinstance(task, GSM8KTask) and "gsm8k" in TASKS
    out = task.run(stub, bar)
    assert out["em"] == pytest.approx(2 / 3) and out["items"] == 3
    call = stub.calls[0]  # the protocol: EOS-aware, most confident first, argmax, one step per token
    assert call["stop_at_eos"] and call["strategy"] == "confidence" and call["temperature"] == 0.0
    assert call["steps"] == 256 and call["length"] == 256 and "cfg_scale" not in call
    build_task({"task": "gsm8k", "data": str(path), "cfg_scale": 1.5}).run(stub, bar)
    assert stub.calls[-1]["cfg_scale"] == 1.5


PROBLEM = {
    "task_id": "Hand/0",
    "prompt": "def add_then_double(a, b):\n    \"\"\"(a + b) * 2\"\"\"\n",
    "canonical_solution": "    s = a + b\n\n    return s * 2\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 10\n    assert candidate(0, 0) == 0\n",
    "entry_point": "add_then_double",
}


def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(PROBLEM) + "\n")
    return str(path)


def test_infill_items_mask_each_line_in_turn(tmp_path):
    items = infill_items(read_problems(problems_file(tmp_path)))
    assert [(i.line, i.answer) for i in items] == [(0, "    s = a + b"), (2, "    return s * 2")]  # blank line skipped
    first, second = items
    assert first.prompt == PROBLEM["prompt"] and first.suffix == "\n\n    return s * 2\n"
    assert second.prompt == PROBLEM["prompt"] + "    s = a + b\n\n" and second.suffix == "\n"
    assert completed_solution(second, "    return s + s\nextra") == "    s = a + b\n\n    return s + s\n"
    shipped = infill_items(read_problems())
    assert len(shipped) == 1033  # the single-line infilling benchmark's size, from the 164 shipped problems


def test_humaneval_infill_pass_at_1_right_wrong_and_hanging(tmp_path, capsys):
    path = problems_file(tmp_path)
    right = Stub(lambda prompt, suffix: "    s = a + b" if suffix.startswith("\n\n") else "    return s * 2")
    task = HumanEvalInfillTask(name="he", data=path, timeout=2.0)
    assert task.run(right, bar)["pass_at_1"] == 1.0
    assert "EXECUTES model-generated Python code" in capsys.readouterr().err
    wrong = Stub(lambda prompt, suffix: "    s = a - b" if suffix.startswith("\n\n") else "    return s * 2")
    out = task.run(wrong, bar)
    assert out["pass_at_1"] == 0.5 and out["items"] == 2
    hang = Stub(lambda prompt, suffix: "    while True: pass" if suffix.startswith("\n\n") else "    return s * 2")
    out = HumanEvalInfillTask(name="he", data=path, timeout=1.0).run(hang, bar)
    assert out["pass_at_1"] == 0.5 and out["timed_out"] == 1  # the hang timed out; the task went on


def test_missing_problem_fields_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(DLMError, match=r"bad.jsonl:1: the problem lacks field\(s\) \['canonical_solution'"):
        read_problems(str(path))
