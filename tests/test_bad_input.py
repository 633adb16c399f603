"""Bad input to `dlm fit`: one line naming the problem and the fix, exit 2, nothing written."""

import os

import pytest

from lightning_dlm.cli import main
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")


def _fit_error(tmp_path, capsys, *extra):
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEBUG, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not (root / "checkpoints").exists()
    return err[-1]


@pytest.mark.parametrize("extra, expected", [
    (["--model.optim.lr=-1e-4"], "error: model.optim.lr must be a positive number, got -0.0001: e.g. --model.optim.lr 1e-4"),
    (["--model.optim.lr", "0"], "error: model.optim.lr must be a positive number, got 0.0"),
    (["--model.diffusion.anneal_steps=-3"],
     "error: model.diffusion.anneal_steps must be >= 0 (0 = bidirectional from the start), got -3"),
    (["--model.diffusion.eps", "0"], "error: model.diffusion.eps must be in (0, 1), got 0.0"),
    (["--data.seq_len", "1"],
     "error: data.seq_len must be >= 2, got 1: with the shift a block of one token has no target to predict"),
])
def test_impossible_options_are_one_line(tmp_path, capsys, extra, expected):
    assert _fit_error(tmp_path, capsys, *extra).startswith(expected)


def test_a_non_utf8_corpus_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Voilà une phrase en français, très bien.\n".encode("latin-1") * 200)
    err = _fit_error(tmp_path, capsys, "--data.train", f"[{{path: {corpus}}}]", "--data.val", "null")
    assert err.startswith(f"error: corpus '{corpus}' is not UTF-8 text (byte b'\\xe0' at offset ")
    assert err.endswith("convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT")


def test_a_corpus_shorter_than_one_block_is_one_line(tmp_path, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text("A few words.\n")
    err = _fit_error(tmp_path, capsys, "--data.train", f"[{{path: {corpus}}}]", "--data.val", "null")
    assert err.startswith(f"error: corpus '{corpus}' gives ")
    assert err.endswith("tokens per pass, fewer than one block of data.seq_len 64: training would repeat the same "
                        "text; give more text or lower data.seq_len")


def test_optim_config_check_accepts_the_defaults():
    assert OptimConfig().check() == OptimConfig()
    with pytest.raises(Exception, match="min_lr_ratio must be in"):
        OptimConfig(min_lr_ratio=2.0).check()
