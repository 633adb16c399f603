"""experiments/families/: every family config resolves (``dlm fit --print_config``) without loading
or downloading its model, names its hub model, the mask-token rule and a recipe for its size, says
whether it is gated; the shapes of benchmarks/family_table.py give the published parameter counts."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import family_table  # noqa: E402

FOLDER = os.path.join(REPO, "experiments", "families")
BY_YAML = {family.yaml: family for family in family_table.FAMILIES}

#: Resolves every config in one process, offline with an empty Hugging Face cache: any read of the
#: hub (a config.json, a tokenizer, weights) fails, and the modeling modules of the families, which
#: building a model imports, must stay unimported.
RESOLVE = r"""
import contextlib, io, json, sys
from lightning_dlm.cli import main
out = {}
for path in sys.argv[1:]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            main(["fit", "--config", path, "--print_config"])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    out[path] = [code, buffer.getvalue()]
built = sorted(name for name in sys.modules if name.startswith("transformers.models.") and ".modeling_" in name
               and not name.startswith("transformers.models.auto."))  # the auto registry is no model
print(json.dumps({"configs": out, "modeling_modules": built}))
"""


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    paths = sorted(glob.glob(os.path.join(FOLDER, "*.yaml")))
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *paths], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["home"] = home
    return result


def test_every_family_has_its_config():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(FOLDER, "*.yaml"))}
    assert names == set(BY_YAML)
    assert {f.name.split(" (")[0] for f in family_table.FAMILIES} == {
        "GPT-2", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Llama-3.2-1B", "Llama-3.1-8B", "Qwen3-0.6B",
        "Qwen3-8B", "Gemma-3-1B"}


def test_print_config_loads_and_downloads_nothing(resolved):
    assert resolved["modeling_modules"] == []  # no model was built
    assert not any(files for _, _, files in os.walk(resolved["home"]))  # nothing downloaded or cached


@pytest.mark.parametrize("name", sorted(BY_YAML))
def test_the_config_resolves_with_its_recipe(resolved, name):
    family = BY_YAML[name]
    code, text = resolved["configs"][os.path.join(FOLDER, name)]
    assert code == 0, text
    cfg = yaml.safe_load(text)
    trainer, model, data = cfg["trainer"], cfg["model"], cfg["data"]
    backbone = model["backbone"]
    assert backbone["pretrained"] == family.hub and backbone["config"] is None
    assert backbone["mask_token"]["mode"] == "auto" and backbone["mask_token"]["id"] is None
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu" and trainer["devices"] == 8
    params = family.published_params
    strategy = trainer["strategy"]
    if params > 5e9:  # 7-8B: sharded, layers recomputed, the wrap class left to the model's _no_split_modules
        assert strategy["class_path"] == "lightning_dlm.training.fsdp2.FSDP2Strategy"
        assert strategy["init_args"]["activation_checkpointing"] is True
        assert not strategy["init_args"].get("wrap_classes")
        assert model["optim"]["lr"] == pytest.approx(2e-5)
    else:
        assert strategy == "ddp"
        assert 3e-5 <= model["optim"]["lr"] <= 3e-4
    context = family.config.get("n_positions") or 2048
    assert data["seq_len"] == min(2048, context)
    tokens_per_step = 8 * data["batch_size"] * trainer["accumulate_grad_batches"] * data["seq_len"]
    assert 2**18 <= tokens_per_step <= 2**20  # 0.26M-1M tokens a step
    diffusion = model["diffusion"]
    assert 0 < diffusion["anneal_steps"] <= trainer["max_steps"] // 10 and diffusion["shift"] is True
    assert data["train"][0]["path"] == "HuggingFaceFW/fineweb"
    # the estimate of benchmarks/family_table.py for the config's own batch: it fits an 80 GB GPU
    shape = family_table.shape_of(family_table.build_meta(family))
    sharded = params > 5e9
    memory = family_table.memory_per_gpu(family, shape, data["batch_size"], data["seq_len"], 8 if sharded else 1,
                                         checkpointing=sharded)
    assert memory < 0.85 * 80e9, memory / 2**30


@pytest.mark.parametrize("name", sorted(BY_YAML))
def test_the_header_says_whether_the_model_is_gated(name):
    family = BY_YAML[name]
    with open(os.path.join(FOLDER, name), encoding="utf-8") as fh:
        header = "".join(line for line in fh if line.startswith("#"))
    assert ("GATED" in header) == family.gated, header
    assert family.hub in header and "mask token (the rule, mode: auto)" in header.lower()
    if family.gated:
        assert "accepted on the model's hub page" in header and "HF_TOKEN" in header
    else:
        assert "not gated" in header


def test_the_shapes_give_the_published_parameter_counts():
    """The architectures are typed from the published config.json files: their parameter counts must
    be the published ones (to the parameter)."""
    for family in family_table.FAMILIES:
        assert family_table.shape_of(family_table.build_meta(family)).params == family.published_params, family.name


def test_the_readme_table_is_the_scripts(capsys):
    """README's "Adapt your own model" table is benchmarks/family_table.py's output, as printed."""
    table = family_table.main([])
    capsys.readouterr()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert table in readme
