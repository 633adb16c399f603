#!/usr/bin/env python
"""Train the micro world's tokenizer: a byte-level BPE on the training plays only.

The micro AR model (``experiments/micro/``) reads Shakespeare through a vocabulary of its own,
small enough that the embedding is a fraction of a few-million-parameter model. Held-out plays
(``assets/shakespeare/val``) are never seen, so held-out perplexities stay honest.

The vocabulary has ``--vocab`` entries (2,048 by default), and the first ones are special:

* ``<|endoftext|>`` (id 0): BOS and EOS, the separator packing puts between plays;
* ``<|mask|>`` (id 1): reserved for the diffusion model's absorbing state. No text contains it,
  so the AR model never trains its row, and adaptation reuses it (``mask_token.mode: reuse``)
  instead of resizing the embedding.

Training is deterministic for a given corpus and ``tokenizers`` version; the folder is written as
a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``) that
``AutoTokenizer.from_pretrained`` reads.

Usage::

    python data/make_micro_tokenizer.py --text assets/shakespeare/train --out runs/micro/tokenizer
    python data/make_micro_tokenizer.py --out experiments/micro/tokenizer --overwrite   # the committed one
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

EOS = "<|endoftext|>"
MASK = "<|mask|>"


def text_files(path: str) -> list:
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True)) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise SystemExit(f"error: no .txt files at '{path}': run `make assets` first, or give a folder of .txt files")
    return files


def train(files: list, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return tok


def save(tok, out: str) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, mask_token=MASK)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as stage:
        fast.save_pretrained(stage)
        if os.path.isdir(out):
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
            os.rmdir(out)
        os.replace(stage, out)
        os.makedirs(stage)  # TemporaryDirectory removes what it created
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o777 & ~umask)  # readable like its siblings (mkdtemp makes it 0700)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="assets/shakespeare/train", help="the training plays (folder of .txt)")
    parser.add_argument("--out", default="experiments/micro/tokenizer", help="tokenizer folder to write")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size, special tokens included")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder at --out")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' holds a tokenizer already: give a new --out, or --overwrite to replace it")
    if args.vocab < 300:
        raise SystemExit(f"error: --vocab {args.vocab} is too small for the 256 byte tokens, the 2 special tokens and "
                         f"the merges: give --vocab 300 or more (the micro model uses 2048)")
    files = text_files(args.text)
    if not any(open(f, encoding="utf-8", errors="replace").read().strip() for f in files):
        raise SystemExit(f"error: the corpus at '{args.text}' is empty (no text in its {len(files)} file(s)): "
                         f"give the training plays (make assets writes them to assets/shakespeare/train)")
    tok = train(files, args.vocab)
    save(tok, args.out)
    chars = sum(os.path.getsize(f) for f in files)
    print(f"[micro tokenizer] {tok.get_vocab_size()} entries from {len(files)} plays ({chars:,} bytes) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
