"""The dlm CLI: every experiment config parses and builds on the meta device; fit -> sample; errors."""

import glob
import os
import re
import subprocess
import sys

import pytest
import torch
from jsonargparse import Namespace
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lightning_dlm.cli import main
from lightning_dlm.data import TextDataModule
from lightning_dlm.model import DiffusionModel, resolve_hf_config
from lightning_dlm.model.layers import decoder_layer_classes, decoder_layers
from lightning_dlm.training.cli import DLMCLI
from lightning_dlm.training.fsdp2 import FSDP2Strategy
from lightning_dlm.training.module import DiffusionLM
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.yaml")))

# The architectures behind the hub names the paper configs use (the hub is unreachable in tests).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
KNOWN = {
    "gpt2": (GPT2Config(), 124_439_808),
    "gpt2-medium": (GPT2Config(n_embd=1024, n_layer=24, n_head=16), 354_823_168),
    "meta-llama/Llama-2-7b-hf": (LlamaConfig(**LLAMA2_7B), 6_738_415_616),
    "assets/smollm2-135m": (
        LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True),
        134_515_008,
    ),
}


class ParseOnly(DLMCLI):
    """Parse a config without building anything (nor checking this machine's devices)."""

    def before_instantiate_classes(self):
        pass

    def instantiate_classes(self):
        pass


def parse(path, *extra, instantiate=False):
    cli = ParseOnly(DiffusionLM, TextDataModule, run=False, args=["--config", path, *extra],
                    parser_kwargs={"parser_mode": "omegaconf"})
    # instantiate: the objects the CLI would build from the config (model, data, strategy,
    # callbacks), except the Trainer itself
    return cli.parser.instantiate(cli.config) if instantiate else cli.config


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_config_parses_and_builds_on_meta(path):
    cfg = parse(path)
    module = DiffusionLM(**cfg.model.as_dict())
    backbone = module.backbone_cfg
    assert cfg.data.tokenizer == backbone.tokenizer_source  # linked from the model section
    assert cfg.trainer.max_steps > 0 and cfg.checkpoint.every_n_train_steps > 0
    if backbone.pretrained in KNOWN:
        hf_config, n_params = KNOWN[backbone.pretrained]
    else:
        hf_config, n_params = resolve_hf_config(backbone), None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    if n_params is not None:
        assert sum(p.numel() for p in model.parameters()) == n_params
    if backbone.mask_token.mode == "reuse":
        net = DiffusionModel(model, backbone.mask_token.id, False)
        assert net.mask_token_id < net.vocab_size
    limit = getattr(hf_config, "max_position_embeddings", None) or hf_config.n_positions
    assert cfg.data.seq_len <= limit
    strategy = cfg.trainer.strategy
    if isinstance(strategy, Namespace):  # e.g. FSDP2 for 7B: the strategy object must build
        assert strategy.class_path == "lightning_dlm.training.fsdp2.FSDP2Strategy"
        built = FSDP2Strategy(**strategy.init_args.as_dict())
        # the shard (and checkpointing) unit: the decoder layer class this model is made of, taken
        # from its own _no_split_modules when the config names none
        layers = decoder_layers(model, decoder_layer_classes(model, built.wrap_classes))
        assert len(layers) == hf_config.num_hidden_layers
    callbacks = [c.class_path for c in cfg.trainer.callbacks or []]
    assert callbacks.count("lightning_dlm.training.callbacks.TrainingThroughput") == 1  # tokens/s and MFU in every run


def test_7b_config_builds_on_meta_with_the_papers_size_and_mask_token():
    """The DiffuLLaMA config through our own model path (config -> DiffusionModel), on the meta
    device: LLaMA-2-7B's 6.74B parameters, the reused mask id 811 (no new row), 32 FSDP units."""
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig

    cfg = parse(os.path.join(REPO, "experiments", "diffullama_7b.yaml"))
    section = cfg.model.backbone.as_dict()
    assert section["pretrained"] == "meta-llama/Llama-2-7b-hf" and section["dtype"] == "float32"
    backbone = BackboneConfig(
        config=dict(model_type="llama", **LLAMA2_7B), mask_token=MaskTokenConfig(**section["mask_token"]),
        attn_implementation=section["attn_implementation"], dtype=section["dtype"],
    )
    with torch.device("meta"):
        net = DiffusionModel.from_config(backbone)
    assert sum(p.numel() for p in net.parameters()) == 6_738_415_616
    assert net.mask_token_id == 811 and not net.mask_token_added and net.vocab_size == 32_000
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in net.parameters())
    strategy = FSDP2Strategy(**cfg.trainer.strategy.init_args.as_dict())
    assert strategy.activation_checkpointing and strategy.param_dtype == torch.bfloat16 and strategy.replicas == 1
    assert strategy.wrap_classes == []  # from the model: LlamaDecoderLayer
    units = decoder_layers(net, decoder_layer_classes(net))
    assert {type(u).__name__ for u in units} == {"LlamaDecoderLayer"}
    # 32 decoder-layer units of 202M parameters (what a GPU all-gathers at a time) and the root unit
    # (embeddings, LM head, final norm) hold every parameter once
    assert len(units) == 32 and {sum(p.numel() for p in u.parameters()) for u in units} == {202_383_360}
    root = [p for name, p in net.named_parameters() if ".layers." not in name]
    assert sum(p.numel() for p in root) == 2 * 32_000 * 4096 + 4096


def test_fsdp_overrides_compose_hybrid_shard_and_float32_reduction():
    overrides = os.path.join(REPO, "experiments", "overrides")
    cfg = parse(os.path.join(REPO, "experiments", "diffullama_7b.yaml"),
                "--config", os.path.join(overrides, "fsdp_hybrid_shard.yaml"),
                "--config", os.path.join(overrides, "fsdp_fp32_reduce.yaml"), instantiate=True)
    strategy = cfg.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy.replicas == 8  # HSDP: 8 replicas of a node's shards
    assert strategy.activation_checkpointing  # kept from the base
    mixed = strategy.mixed_precision_policy()
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    # without the overrides: one shard group, gradients reduced in the parameters' bf16
    plain = parse(os.path.join(REPO, "experiments", "diffullama_7b.yaml"), instantiate=True)
    assert plain.trainer.strategy.replicas == 1
    assert plain.trainer.strategy.mixed_precision_policy().reduce_dtype is None and plain.trainer.precision == "bf16-mixed"


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("debug")
    main(["fit", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--trainer.max_steps", "8",
          "--trainer.val_check_interval", "4", "--trainer.default_root_dir", str(root),
          "--checkpoint.dirpath", str(root / "ck"), "--checkpoint.every_n_train_steps", "4",
          "--trainer.enable_progress_bar", "false"])
    return root


def test_fit_writes_checkpoints_and_tensorboard_logs(debug_run):
    assert sorted(os.listdir(debug_run / "ck")) == ["last.ckpt", "step0000004.ckpt", "step0000008.ckpt"]
    events = glob.glob(str(debug_run / "**" / "events.out.tfevents.*"), recursive=True)
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/nelbo", "train/anneal_ratio", "train/masked_fraction", "train/lr",
                "train/tokens_seen", "val/nelbo", "val/ppl_bound", "perf/tokens_per_s", "perf/tokens_per_s_per_device",
                "perf/flops_per_s_per_device"]:
        assert tag in tags, tag
    assert "perf/mfu" not in tags  # no peak FLOP/s is known for a CPU
    tokens = [e.value for e in acc.Scalars("perf/tokens_per_s")]
    assert tokens and all(0 < v < 1e8 for v in tokens)


def test_sample_continuation_and_infill(debug_run, capsys):
    ckpt = str(debug_run / "ck" / "last.ckpt")
    main(["sample", "--ckpt", ckpt, "--prompt", "Once upon a time", "--length", "6", "--steps", "6"])
    out = capsys.readouterr().out
    assert "Once upon a time\u27e6" in out and "forward passes" in out
    main(["sample", "--ckpt", ckpt, "--prompt", "The dog", "--suffix", "the river.", "--length", "5"])
    out = capsys.readouterr().out
    assert "The dog\u27e6" in out and "\u27e7the river." in out


def test_validate_from_checkpoint(debug_run, capsys):
    main(["validate", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--trainer.default_root_dir",
          str(debug_run), "--ckpt_path", str(debug_run / "ck" / "last.ckpt"), "--trainer.enable_progress_bar", "false"])
    assert "val/nelbo" in capsys.readouterr().out


def _error_of(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err.strip()


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    debug = os.path.join(REPO, "experiments", "debug.yaml")
    base = ["fit", "--config", debug, "--trainer.default_root_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ck")]
    err = _error_of(base + ["--model.backbone.pretrained", str(tmp_path / "no_model")], capsys)
    assert err.startswith("error: model path") and "does not exist" in err and "\n" not in err
    err = _error_of(base + ["--data.train", "[{path: " + str(tmp_path / "none.txt") + "}]"], capsys)
    assert err.startswith("error:") and "none.txt" in err and "\n" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = _error_of(base + ["--data.train", "[{path: " + str(empty) + "}]"], capsys)
    assert err.startswith("error:") and "empty" in err
    err = _error_of(base + ["--model.backbone.mask_token.mode", "reuse", "--model.backbone.mask_token.id", "999999"], capsys)
    assert "outside the vocabulary" in err and "\n" not in err
    err = _error_of(base + ["--data.seq_len", "1024"], capsys)
    assert "above the model's position limit" in err
    assert _error_of(base + ["--model.backbone.no_such_key", "1"], capsys)  # jsonargparse names the key
    assert not os.path.exists(tmp_path / "ck") or not os.listdir(tmp_path / "ck")  # no checkpoint written
    err = _error_of(["sample", "--ckpt", str(tmp_path / "missing.ckpt")], capsys)
    assert err.startswith("error: checkpoint") and "does not exist" in err
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    err = _error_of(["sample", "--ckpt", str(foreign)], capsys)
    assert "not a lightning_dlm diffusion checkpoint" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("config, extra, expected", [
    ("diffullama_7b.yaml", [], "trainer.strategy fsdp2 needs CUDA GPUs and this machine has none"),
    ("debug.yaml", ["--trainer.strategy", "fsdp2", "--trainer.accelerator", "auto"],
     "trainer.strategy fsdp2 needs CUDA GPUs and this machine has none"),
    ("debug.yaml", ["--trainer.strategy", "fsdp"], "trainer.strategy FSDP needs CUDA GPUs and this machine has none"),
    ("diffugpt_s.yaml", [], "trainer.accelerator is gpu but no CUDA GPU is visible"),
])
def test_gpu_configs_on_a_cpu_machine_stop_early_with_one_line(tmp_path, capsys, config, extra, expected):
    root = tmp_path / "run"
    err = _error_of(["fit", "--config", os.path.join(REPO, "experiments", config), "--trainer.default_root_dir", str(root),
                     "--checkpoint.dirpath", str(root / "ck"), *extra], capsys)
    assert err.startswith("error: " + expected) and "\n" not in err
    assert "--trainer.accelerator cpu" in err  # names the fix
    assert not root.exists()  # refused before anything was built or written


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lightning_dlm", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "fit" in out.stdout and "validate" in out.stdout


def test_demo_runs_end_to_end_on_the_debug_config(tmp_path, capsys):
    main(["demo", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--max_steps", "4",
          "--run_dir", str(tmp_path), "--length", "8", "--steps", "8", "--prompt", "Once upon a time"])
    out = capsys.readouterr().out
    assert "Once upon a time\u27e6" in out and "\u27e7" in out and "\033[" not in out  # markers; no colour off a tty
    assert "val/nelbo before adaptation" in out and "val/nelbo after adaptation" in out
    assert "8 steps, confidence order in blocks of 8" in out  # the demo's decoding (experiments/demo_quality)
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
    # one TensorBoard run: the fit's, holding the validations before (step 0) and after (step 4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {os.path.dirname(p) for p in glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)}
    assert len(runs) == 1
    values = {}
    for events in glob.glob(os.path.join(runs.pop(), "events.out.tfevents.*")):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in ("demo/val_nelbo_before", "demo/val_nelbo_after"):
            if tag in acc.Tags()["scalars"]:
                values[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    before = float(re.search(r"val/nelbo before adaptation :\s+([0-9.]+)", out).group(1))
    assert values["demo/val_nelbo_before"][0][0] == 0 and values["demo/val_nelbo_after"][0][0] == 4
    assert values["demo/val_nelbo_before"][0][1] == pytest.approx(before, abs=1e-3)


def test_sample_help_shows_the_sampler_defaults_of_sampler_config(capsys):
    from lightning_dlm.sampling import SamplerConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    options = re.split(r"\n  (?=--)", capsys.readouterr().out.split("options:", 1)[1])  # one entry per option
    defaults = SamplerConfig()
    for name in ("steps", "temperature", "top_k", "top_p", "strategy", "cache"):
        (entry,) = [" ".join(o.split()) for o in options if o.startswith(f"--{name} ")]
        assert re.search(r"default: ([^)]+)\)$", entry).group(1) == str(getattr(defaults, name)), entry


def test_dlm_help_lists_every_subcommand_with_one_line(capsys):
    from lightning_dlm.cli.main import SUBCOMMANDS, entry_point

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    width = max(len(row.name) for row in SUBCOMMANDS)
    for row in SUBCOMMANDS:
        line = next(line for line in out.splitlines() if line.strip().startswith(row.name + " "))
        assert line.strip() == f"{row.name.ljust(width)}  {row.help}"
        assert callable(entry_point(row))  # every row's entry imports and names a function
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "subcommands:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "--config", "x.yaml"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: unknown subcommand 'fitt': choose one of fit, validate, test, "
                                               "predict, sample, demo, export, eval, lm-eval, sweep, compare, sft, chat (dlm --help)")


@pytest.mark.parametrize("name", ["fit", "validate", "test", "sample", "demo", "export", "eval", "lm-eval", "sweep", "compare"])
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out.lower() and len(out.splitlines()) > 3


def test_python_dash_m_lightning_dlm_help_is_the_same():
    proc = subprocess.run([sys.executable, "-m", "lightning_dlm", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lm-eval   run lm-evaluation-harness" in proc.stdout


def test_the_readme_quotes_dlm_help_as_it_is(capsys):
    # the README's copy of `dlm --help` must be the real output, or it drifts when a subcommand is added
    with pytest.raises(SystemExit):
        main(["--help"])
    real = capsys.readouterr().out.strip()
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    intro = "`dlm --help` lists every subcommand"
    quoted = readme[readme.index(intro):].split("```\n", 2)[1].strip()
    assert quoted == real
