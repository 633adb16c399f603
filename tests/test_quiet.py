"""``dlm`` prints its own lines only: the libraries' chatter (Lightning's device lines and tips,
Python warnings, transformers' reports) comes back with ``--verbose`` or ``DLM_VERBOSE=1``."""

import os
import re
import subprocess
import sys

import pytest

from lightning_dlm.cli.main import main, usage
from lightning_dlm.training.quiet import QUIET_ENVIRONMENT, take_verbose
from tests.conftest import REPO

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
NOISE = ("GPU available", "TPU available", "HPU available", "litlogger", "Tip", "Warning", "warn", "deprecated",
         "Seed set to", "`Trainer.fit` stopped", "Loading weights")


def _dlm(*args):
    """``dlm ARGS`` in its own process, stdout and stderr together (a pipe: not a terminal)."""
    # as a person runs it: not verbose, no warning options, not inside a pytest test, and none of what an
    # in-process dlm of an earlier test left in this process's environment
    unset = ("DLM_VERBOSE", "PYTHONWARNINGS", "PYTEST_CURRENT_TEST", *QUIET_ENVIRONMENT)
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "lightning_dlm", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, env=environ)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def _fit(root, *flags):
    """A 2-step fit of experiments/debug.yaml."""
    return _dlm("fit", "--config", DEBUG, *flags, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root))


@pytest.fixture(scope="module")
def quiet_output(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("quiet"))


def test_a_fit_prints_our_lines_and_no_third_party_noise(quiet_output):
    for noise in NOISE:
        assert noise not in quiet_output, f"{noise!r} in:\n{quiet_output}"
    assert not re.search(r"\.py:\d+: ", quiet_output), quiet_output  # no warning's file:line
    # lightning_dlm's own lines are kept, the ones it logs through Lightning's rank_zero_info too
    assert "step 2/2 | loss " in quiet_output and "training to step 2:" in quiet_output
    assert "data: 32 validation blocks of 64 tokens" in quiet_output
    assert "throughput: one training micro-batch" in quiet_output


def test_verbose_anywhere_on_the_command_line_brings_the_libraries_back(tmp_path, quiet_output):
    loud = _fit(tmp_path, "--verbose")  # after the subcommand: taken out before LightningCLI parses
    assert "GPU available" in loud and "TPU available" in loud
    assert "step 2/2 | loss " in loud and "data: 32 validation blocks" in loud
    assert len(loud.splitlines()) > len(quiet_output.splitlines())


def test_the_verbose_flag_and_environment_variable(monkeypatch):
    monkeypatch.delenv("DLM_VERBOSE", raising=False)
    assert take_verbose(["fit", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], False)
    assert take_verbose(["--verbose", "fit", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], True)
    assert take_verbose(["fit", "--config", "x.yaml", "--verbose"]) == (["fit", "--config", "x.yaml"], True)
    # Lightning's own validate/test option (print the metrics table or not) is left to Lightning
    assert take_verbose(["validate", "--verbose", "false"]) == (["validate", "--verbose", "false"], False)
    monkeypatch.setenv("DLM_VERBOSE", "1")
    assert take_verbose(["fit"]) == (["fit"], True)
    monkeypatch.setenv("DLM_VERBOSE", "0")
    assert take_verbose(["fit"]) == (["fit"], False)


def test_help_shows_the_verbose_flag(capsys):
    assert "usage: dlm [--verbose] <subcommand>" in usage()
    with pytest.raises(SystemExit) as exit_info:
        main(["--verbose", "--help"])
    assert exit_info.value.code == 0 and "--verbose" in capsys.readouterr().out


def test_loading_pretrained_weights_shows_no_bar_off_a_terminal(tmp_path):
    import transformers

    from tests.conftest import TINY_TOKENIZER

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    (tmp_path / "pretrained.yaml").write_text(
        f"model:\n  backbone:\n    pretrained: {tmp_path / 'tiny'}\n    tokenizer: {TINY_TOKENIZER}\n    config: null\n")
    args = ["validate", "--config", DEBUG, "--config", str(tmp_path / "pretrained.yaml"), "--trainer.limit_val_batches",
            "1", "--trainer.default_root_dir", str(tmp_path / "run")]
    quiet = _dlm(*args)
    assert "val/nelbo" in quiet  # the metrics table of dlm validate is its result: kept
    for noise in NOISE:
        assert noise not in quiet, f"{noise!r} in:\n{quiet}"
    # back on request (transformers' loading bar too, where its tqdm shows off a terminal: not in every environment)
    assert "GPU available" in _dlm("--verbose", *args)
