"""Build a multiple-choice file from held-out text: choose the true next line among N.

Each item takes ``--context`` consecutive lines of a work as the context and asks which of
``--choices`` lines comes next: the true next line, or lines drawn from elsewhere in the same
work (at least 50 lines away, 20 characters or longer, different text). Written in the
generic ``choice`` format that ``dlm eval --task multiple_choice`` reads::

    {"context": "...\\n", "choices": ["...", "...", "...", "..."], "label": 2}

With ``--kind infill`` it writes line infilling instead (as ROCStories infills its third
sentence): ``--context`` lines before and after a held-out line, the line to generate between
them, in the generic ``answer`` format that ``dlm eval --task infilling`` reads::

    {"prompt": "...\\n", "suffix": "\\n...", "answers": ["..."]}

Usage::

    python data/make_next_line_mc.py --text assets/shakespeare/val --out runs/next_line_mc.jsonl --items 100
    python data/make_next_line_mc.py --kind infill --context 2 --text assets/shakespeare/val --out runs/infill.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from typing import List


def read_lines(path: str) -> List[List[str]]:
    """The non-empty lines of every .txt file under ``path`` (one list per file), indentation removed."""
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise SystemExit(f"error: no .txt files at '{path}': give a text file or a folder of them")
    works = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            works.append([line.strip() for line in f if line.strip()])
    return works


def build(works: List[List[str]], items: int, context: int, choices: int, seed: int, min_chars: int = 20):
    rng = random.Random(seed)
    candidates = [(w, i) for w, lines in enumerate(works) for i in range(context, len(lines))
                  if len(lines[i]) >= min_chars]
    if len(candidates) < items:
        raise SystemExit(f"error: only {len(candidates)} usable lines for {items} items: give more text or fewer items")
    out = []
    for w, i in rng.sample(candidates, items):
        lines = works[w]
        pool = [j for j in range(len(lines)) if abs(j - i) > 50 and len(lines[j]) >= min_chars and lines[j] != lines[i]]
        if len(pool) < choices - 1:
            continue
        options = [lines[i]] + [lines[j] for j in rng.sample(pool, choices - 1)]
        rng.shuffle(options)
        out.append(dict(context="\n".join(lines[i - context: i]) + "\n", choices=options, label=options.index(lines[i])))
    return out


def build_infill(works: List[List[str]], items: int, context: int, seed: int, min_chars: int = 20,
                 max_chars: int = 80):
    """``items`` held-out lines (``min_chars`` to ``max_chars`` long) with ``context`` lines either side."""
    rng = random.Random(seed)
    candidates = [(w, i) for w, lines in enumerate(works) for i in range(context, len(lines) - context)
                  if min_chars <= len(lines[i]) <= max_chars]
    if len(candidates) < items:
        raise SystemExit(f"error: only {len(candidates)} usable lines for {items} items: give more text or fewer items")
    out = []
    for w, i in sorted(rng.sample(candidates, items)):
        lines = works[w]
        out.append(dict(prompt="\n".join(lines[i - context: i]) + "\n", answers=[lines[i]],
                        suffix="\n" + "\n".join(lines[i + 1: i + 1 + context])))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", required=True, help="a .txt file or a folder of them (held-out text)")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--context", type=int, default=4, help="lines of context before the line to choose")
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("choice", "infill"), default="choice",
                   help="choice: the true next line among --choices; infill: generate a line between its neighbours")
    args = p.parse_args(argv)
    works = read_lines(args.text)
    if args.kind == "infill":
        rows = build_infill(works, args.items, args.context, args.seed)
    else:
        rows = build(works, args.items, args.context, args.choices, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} items to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
