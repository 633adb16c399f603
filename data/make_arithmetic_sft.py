"""Templated arithmetic word problems in GSM8K format, with worked answers, for the SFT demonstration.

    python data/make_arithmetic_sft.py [--out data/sft] [--train 2000] [--test 100] [--seed 0]

Writes, under ``--out``:

* ``arith_train.jsonl`` / ``arith_test.jsonl``: SFT records ``{"prompt", "response"}`` (the prompt is
  the ``gsm8k`` task's ``Question: ...\\nAnswer:``; the response a worked answer ending in ``#### N``),
  for ``dlm sft fit`` (the test records only for its validation NELBO);
* ``arith_train_gsm8k.jsonl`` / ``arith_test_gsm8k.jsonl``: the same problems as GSM8K records
  ``{"question", "answer"}``, for ``dlm eval``'s ``gsm8k`` task (the test file is held out).

Problems are drawn from a few templates (addition, subtraction, multiplication, two steps) with
names, objects and small numbers; duplicates are dropped, the unique problems are shuffled with
``--seed`` and the first ``--test`` are held out: no question is in both splits, and the same
arguments always write the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_dlm.evaluation.tasks.sft import GSM8K_PROMPT  # noqa: E402

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "coins", "cookies", "shells", "cards", "stamps"]


def _add(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    question = f"{name} has {a} {item}. {name} finds {b} more {item}. How many {item} does {name} have now?"
    answer = f"{name} starts with {a} {item} and finds {b} more, so {a} + {b} = {a + b}.\n#### {a + b}"
    return question, answer


def _sub(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    question = f"{name} had {a} {item} and gave away {b} of them. How many {item} are left?"
    answer = f"{name} had {a} {item} and gave away {b}, so {a} - {b} = {a - b} are left.\n#### {a - b}"
    return question, answer


def _mul(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    question = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have?"
    answer = f"There are {a} boxes of {b} {item}, so {a} * {b} = {a * b}.\n#### {a * b}"
    return question, answer


def _two_step(rng):
    first, second = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 10)
    total = a + b
    c = min(c, total - 1)
    question = (f"{first} has {a} {item} and {second} has {b} {item}. They put them together and then lose {c}. "
                f"How many {item} do they have?")
    answer = (f"Together they have {a} + {b} = {total} {item}. After losing {c}, they have {total} - {c} = {total - c}."
              f"\n#### {total - c}")
    return question, answer


TEMPLATES = (_add, _sub, _mul, _two_step)


def make_problems(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` distinct (question, answer) pairs, shuffled deterministically by ``seed``."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < count:
        attempts += 1
        if attempts > 50 * count:
            raise SystemExit(f"could not draw {count} distinct problems from the templates: ask for fewer")
        question, answer = rng.choice(TEMPLATES)(rng)
        seen.setdefault(question, answer)
    problems = sorted(seen.items())  # independent of the drawing order, then shuffled by the seed
    random.Random(seed + 1).shuffle(problems)
    return problems


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sft")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problems = make_problems(args.train + args.test, args.seed)
    test, train = problems[: args.test], problems[args.test:]
    assert not {q for q, _ in test} & {q for q, _ in train}  # held out: no question in both splits
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "arith_train.jsonl"),
                ({"prompt": GSM8K_PROMPT.format(question=q), "response": " " + a} for q, a in train))
    write_jsonl(os.path.join(args.out, "arith_test.jsonl"),
                ({"prompt": GSM8K_PROMPT.format(question=q), "response": " " + a} for q, a in test))
    write_jsonl(os.path.join(args.out, "arith_train_gsm8k.jsonl"), ({"question": q, "answer": a} for q, a in train))
    write_jsonl(os.path.join(args.out, "arith_test_gsm8k.jsonl"), ({"question": q, "answer": a} for q, a in test))
    print(f"wrote {len(train)} training and {len(test)} held-out problems to {args.out}")


if __name__ == "__main__":
    main()
