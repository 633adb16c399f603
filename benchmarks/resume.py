"""Seconds to resume the training stream at batch 10, 1,000 and 100,000: saved cursors vs regeneration.

What it measures
----------------
A fixture corpus (``data/fixtures/tiny_corpus.txt`` repeated to ``--mb`` MB, in a temp dir, read
by paragraph as ``experiments/debug.yaml`` reads it) with the shipped tiny tokenizer, at the
paper's per-rank shape (``--batch-size 32`` x ``--seq-len 512``), one rank, ``num_workers 0``.
Each cell is the wall time from a fresh ``TextDataModule`` given the checkpoint state of batch
``n`` (``load_state_dict``) until ``train_dataloader()`` has produced its first batch:

* ``cursor`` (the new path): the state holds the data cursor of the last consumed batch; the
  stream seeks to its byte offset and re-tokenizes at most the one partly used document. For
  ``n = 10`` and ``1,000`` the cursor is the real one of batch ``n - 1`` (taken from a run of the
  stream); ``100,000`` batches are 1.6 G tokens, too many to run here, so its cursor is the real
  cursor of batch 999 relabelled as batch 99,999 (counter and epoch): a resume costs the same
  at every counter, since it depends on the position in a file only, and the table shows it.
* ``regeneration`` (the old path, what a checkpoint without cursors does): the stream
  regenerates and discards the ``n * batch_size`` earlier blocks. Run for real (and its first
  batch checked equal to the cursor path's) when the blocks/s measured so far predict it under
  ``--limit`` seconds; beyond that it is that prediction (marked ``~``), from the speed of the
  longest real regeneration.
* ``datasets fallback, worst case``: a source read through ``datasets`` (hub, parquet, any
  ``shuffle_buffer > 0``) resumes by reading, without tokenizing, the records of the current
  epoch before its position; the worst case is a position at the end of an epoch (one line,
  independent of ``n``).

How to run
----------
    python benchmarks/resume.py                 # ~4 MB corpus, regeneration capped at 60 s
    python benchmarks/resume.py --mb 8 --limit 120
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lightning_dlm.data import CorpusSource, TextDataModule  # noqa: E402
from lightning_dlm.data.stream import PackedBatchStream  # noqa: E402

TOKENIZER = os.path.join(REPO, "data", "fixtures", "tiny_tokenizer")
FIXTURE = os.path.join(REPO, "data", "fixtures", "tiny_corpus.txt")
POINTS = (10, 1_000, 100_000)


def build_corpus(directory: str, megabytes: float) -> str:
    text = open(FIXTURE, encoding="utf-8").read().rstrip("\n") + "\n\n"
    path = os.path.join(directory, "corpus.txt")
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(max(1, int(megabytes * 1e6 / len(text.encode())))):
            fh.write(text)
    return path


def datamodule(path: str, args, shuffle_buffer: int = 0) -> TextDataModule:
    dm = TextDataModule([CorpusSource(path, sample_by="paragraph")], tokenizer=TOKENIZER, seq_len=args.seq_len,
                        batch_size=args.batch_size, shuffle_buffer=shuffle_buffer)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True, max_steps=-1)
    dm.setup("fit")
    return dm


def time_resume(path: str, args, state: dict, shuffle_buffer: int = 0):
    dm = datamodule(path, args, shuffle_buffer)
    began = time.perf_counter()
    dm.load_state_dict(state)
    batch = next(iter(dm.train_dataloader()))
    seconds = time.perf_counter() - began
    assert int(batch["index"]) == state["consumed_batches"]
    return seconds, batch["input_ids"]


def base_state(dm: TextDataModule, n: int, cursor=None) -> dict:
    state = dict(dm._order_state(), consumed_batches=n)
    if cursor is not None:
        state.update(cursor_version=cursor["version"], cursors={0: {0: cursor}})
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a regeneration may run before it is estimated")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = build_corpus(tmp, args.mb)
        dm = datamodule(path, args)
        size = os.path.getsize(path)
        print(f"corpus: {size / 1e6:.1f} MB ({path}), batches of {args.batch_size} x {args.seq_len} tokens, "
              f"1 rank, num_workers 0", flush=True)

        # real cursors of batches 9 and 999 (what the checkpoint of batch 10 / 1,000 holds), and the
        # regeneration speed, from one run of the stream
        stream = dm.train_stream(start_batch=0)
        cursors, began = {}, time.perf_counter()
        for batch in stream:
            index = int(batch["index"])
            if index + 1 in POINTS:
                cursors[index + 1] = batch["data_cursor"]
            if index + 1 == max(p for p in POINTS if p <= 1_000):
                break
        run_seconds = time.perf_counter() - began
        blocks_per_s = 1_000 * args.batch_size / run_seconds
        far = dict(cursors[1_000], batches=POINTS[-1])  # batch 999's position, relabelled
        epochs = POINTS[-1] / 1_000
        far["sources"] = [dict(s, epoch=int(s["epoch"] * epochs) + 1) for s in far["sources"]]
        cursors[POINTS[-1]] = far
        print(f"stream run to batch 1,000: {run_seconds:.1f}s ({blocks_per_s:,.0f} blocks/s); position of batch 999: "
              f"epoch {cursors[1_000]['sources'][0]['epoch']}, byte {cursors[1_000]['sources'][0]['position'][1]:,}",
              flush=True)

        rows = []
        for n in POINTS:
            new, first = time_resume(path, args, base_state(dm, n, cursors[n]))
            estimate = n * args.batch_size / blocks_per_s
            if estimate <= args.limit:
                old, regenerated = time_resume(path, args, base_state(dm, n))
                assert (first == regenerated).all(), "the two paths disagree"  # the same batch, token for token
                note = ""
                if n >= 1_000:  # the longest real regeneration gives the speed of the estimates
                    blocks_per_s = n * args.batch_size / old
            else:
                old, note = estimate, "~"
            rows.append((n, new, old, note))
            print(f"  batch {n:,}: cursor {new:.3f}s, regeneration {note}{old:.1f}s", flush=True)

        # the datasets fallback (shuffle_buffer > 0): a position at the end of an epoch
        records = sum(1 for _ in PackedBatchStream(dm._train, dm.encoder, args.seq_len, args.batch_size,
                                                   shuffle_buffer=1).readers[0].records(dm._train[0].dataset, None))
        fallback_cursor = {"version": 1, "slot": 0, "batches": POINTS[-1], "rng": None,
                           "sources": [{"reader": "records", "epoch": 5, "position": [records - 1], "seen": records - 1,
                                        "skip": 0, "mine": records - 1, "tokens": 0}]}
        fallback, _ = time_resume(path, args, base_state(dm, POINTS[-1], fallback_cursor), shuffle_buffer=1000)

    print()
    print("| resume at batch | cursor (new) | regeneration (old) | speed-up |")
    print("|---:|---:|---:|---:|")
    for n, new, old, note in rows:
        print(f"| {n:,} | {new:.3f} s | {note}{old:,.1f} s | {note}{old / new:,.0f}x |")
    print()
    print(f"`~`: estimated from the regeneration speed ({blocks_per_s:,.0f} blocks/s, measured on the longest real one), not run "
          f"(over the {args.limit:.0f} s limit). Batch 100,000's cursor is batch 999's position relabelled (see the "
          f"docstring).")
    print(f"datasets fallback (shuffle_buffer 1000), worst case (position at the end of an epoch of "
          f"{records:,} records): {fallback:.2f} s at any batch.")


if __name__ == "__main__":
    main()
