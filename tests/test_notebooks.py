"""notebooks/: both notebooks run top to bottom (papermill, the venv's python3 kernel) on a tiny
checkpoint trained here, and print the numbers the library computes."""

import glob
import json
import os
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_dlm.cli import main
from lightning_dlm.model import load_tokenizer
from lightning_dlm.research import analysis
from tests.conftest import REPO, TINY_TOKENIZER

papermill = pytest.importorskip("papermill", reason="pip install -e '.[dev]' (papermill, ipykernel)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = os.path.join(REPO, "notebooks")
DEBUG = os.path.join(REPO, "experiments", "debug.yaml")
TINY_VAL = os.path.join(REPO, "data", "fixtures", "tiny_corpus_val.txt")
# the architecture of experiments/debug.yaml, saved as the "original" causal LM the run adapts
ORIGINAL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0,
                eos_token_id=0)
SMALL = dict(blocks=2, seq_len=32, levels=4, draws=2, prompt="Once", gen_length=8, gen_steps=4, token_len=16, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny original model, and a 6-step run of experiments/debug.yaml adapted from it."""
    root = tmp_path_factory.mktemp("notebooks")
    torch.manual_seed(0)
    config = dict(ORIGINAL)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(
        root / "original")
    load_tokenizer(TINY_TOKENIZER).save_pretrained(root / "original")
    main(["fit", "--config", DEBUG, "--model.backbone.pretrained", str(root / "original"), "--model.backbone.config",
          "null", "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
          "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "6", "--model.diffusion.anneal_steps",
          "2", "--trainer.default_root_dir", str(root / "runs" / "tiny"), "--trainer.enable_progress_bar", "false"])
    return root


def execute(name, out, **parameters):
    papermill.execute_notebook(os.path.join(NOTEBOOKS, name), str(out), parameters=parameters, kernel_name="python3",
                               cwd=NOTEBOOKS, progress_bar=False)
    return nbformat.read(str(out), as_version=4)


def outputs(nb):
    """(printed text, number of PNG images) of an executed notebook."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") if out.get("output_type") == "stream" else "")
            data = out.get("data", {})
            text.append(data.get("text/markdown", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_analyse_checkpoint_runs_and_prints_the_library_numbers(tiny_run, tmp_path):
    ckpt = str(tiny_run / "runs" / "tiny" / "checkpoints" / "last.ckpt")
    nb = execute("analyse_checkpoint.ipynb", tmp_path / "analyse.ipynb", checkpoint=ckpt,
                 original_model=str(tiny_run / "original"), text=TINY_VAL, **SMALL)
    text, images = outputs(nb)
    assert images == 4, text
    model = analysis.load_diffusion_model(ckpt)
    blocks = analysis.text_blocks(TINY_VAL, model.tokenizer, seq_len=32, max_blocks=2)
    grid = analysis.noise_grid(model, blocks, levels=4, draws=2, seed=0)
    printed = float(re.search(r"^adapted: NELBO ([0-9.]+) \+- ([0-9.]+)", text, re.M).group(1))
    assert printed == pytest.approx(grid.nelbo, abs=2e-4)
    assert re.search(r"^before adaptation: NELBO [0-9.]+ \+- [0-9.]+ nats per token$", text, re.M)
    assert "[random] mean p(committed)" in text and "[confidence] mean p(committed)" in text
    assert re.search(r"^16 tokens: original AR NLL [0-9.]+, diffusion bound [0-9.]+ nats per token$", text, re.M)


def test_compare_runs_shows_the_tables_and_skips_what_is_missing(tiny_run, tmp_path):
    (tiny_run / "runs" / "not_started").mkdir(exist_ok=True)  # an arm of a sweep still running: no logs yet
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "val_nelbo.png").write_bytes(_tiny_png())
    (tmp_path / "sweeps" / "RESULTS.md").write_text("# Tiny sweep results\n\n![curve](val_nelbo.png)\n")
    results = {"tasks": {"heldout": {"kind": "likelihood"}},  # as `dlm eval --out` writes them
               "models": {"tiny": {"path": "tiny.ckpt", "results": {"heldout": {"nll_per_token": 5.25, "se": 0.125}}},
                          "original": {"path": "orig", "results": {"heldout": {"nll_per_token": 4.5, "se": 0.0}}}}}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    nb = execute("compare_runs.ipynb", tmp_path / "compare.ipynb", sweep_dirs=str(tiny_run / "runs" / "*"),
                 sweep_eval=str(tmp_path / "eval.json"), ablation_dirs=str(tmp_path / "no_ablation" / "*"),
                 sweep_results=str(tmp_path / "sweeps" / "RESULTS.md"),
                 ablation_results=str(tmp_path / "missing" / "RESULTS.md"), plots_dir=str(tmp_path / "plots"))
    text, images = outputs(nb)
    assert "| arm | val/nelbo | se | ppl bound | tokens seen | steps | wall s | heldout nll_per_token |" in text
    assert re.search(r"^\| tiny \| .* \| 5\.2500 ± 0\.1250 \|$", text, re.M)
    assert re.search(r"^\| original \| - \| - \| - \| - \| - \| - \| 4\.5000 ± 0\.0000 \|$", text, re.M)
    row = re.search(r"^\| tiny \| ([0-9.]+) \|", text, re.M)
    from lightning_dlm.research.compare import summarize

    assert float(row.group(1)) == pytest.approx(summarize([str(tiny_run / "runs" / "tiny")])[0].val_nelbo, abs=1e-4)
    assert f"sweep: no logs yet in {tiny_run / 'runs' / 'not_started'} (left out)" in text
    assert f"ablation: no run folders with logs match {tmp_path / 'no_ablation' / '*'} yet (skipped)" in text
    assert f"{tmp_path / 'missing' / 'RESULTS.md'} does not exist yet (skipped)" in text
    assert "# Tiny sweep results" in text
    assert images == 5  # the arms plot, val/nelbo and train/loss curves, the eval bars, the results file's plot
    assert sorted(os.listdir(tmp_path / "plots" / "sweep")) == ["eval.png", "train_loss.png", "val_nelbo.png"]


def test_a_missing_checkpoint_stops_the_notebook_with_one_line(tmp_path):
    missing = str(tmp_path / "nowhere" / "last.ckpt")
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute("analyse_checkpoint.ipynb", tmp_path / "out.ipynb", checkpoint=missing)
    assert err.value.ename == "DLMError"
    assert missing in err.value.evalue and "make demo" in err.value.evalue and "\n" not in err.value.evalue
    assert "analysis.load_diffusion_model(checkpoint)" in err.value.source  # the first cell after the parameters


def _tiny_png():
    import io

    from matplotlib.figure import Figure

    buffer = io.BytesIO()
    Figure(figsize=(1, 1)).savefig(buffer, format="png")
    return buffer.getvalue()


def test_the_notebooks_are_the_parameterised_ones_make_notebooks_runs():
    for path in sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))):
        nb = nbformat.read(path, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path
    assert {os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOKS, "*.ipynb"))} >= {
        "analyse_checkpoint.ipynb", "compare_runs.ipynb"}
