"""``dlm demo``: adapt a pretrained causal LM into a diffusion LM and show what it generates.

Runs, in one process: validation of the unadapted model (diffusion NELBO bound), ``fit``,
validation of the adapted model, then a continuation and an infill from the last checkpoint,
and prints a summary with timings.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import warnings
from typing import List, Optional

from jsonargparse import ArgumentParser
from omegaconf import OmegaConf

from lightning_dlm.commands.markers import span_marker
from lightning_dlm.core.errors import DLMError
from lightning_dlm.training.runs import checkpoint_dir

# In the corpus's own layout (the Gutenberg plays: "NAME." on a line of its own, a blank line
# between speeches), so the prompt reads like the text the model was adapted on.
DEFAULT_PROMPT = "ROMEO.\nO gentle Juliet,"
DEFAULT_INFILL = ("FIRST CITIZEN.\nBefore we proceed any further,", "\n\nALL.\nSpeak, speak.")


def _run_cli(args: List[str]):
    from lightning_dlm.training.cli import DLMCLI, lightning_kwargs

    with warnings.catch_warnings():
        # the demo drives LightningCLI in-process on purpose, while sys.argv holds `dlm demo ...`
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return DLMCLI(args=args, **lightning_kwargs())


def _val_nelbo(cli) -> float:
    value = cli.trainer.callback_metrics.get("val/nelbo")
    if value is None:
        raise DLMError("the demo config has no validation data: set data.val")
    return float(value)


def log_validations(trainer, before: float, after: float) -> Optional[str]:
    """Write the validations before and after adaptation into the fit's TensorBoard run as
    ``val/nelbo`` at step 0 and at the last step (so one plot shows them with the curves)."""
    logger = getattr(trainer, "logger", None)
    log_dir = getattr(logger, "log_dir", None)
    if not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=log_dir) as writer:
        writer.add_scalar("val/nelbo", before, 0)
        writer.add_scalar("val/nelbo", after, trainer.global_step)
        writer.add_scalar("demo/val_nelbo_before", before, 0)
        writer.add_scalar("demo/val_nelbo_after", after, trainer.global_step)
    return log_dir


def demo(
    config: str,
    prompt: str = DEFAULT_PROMPT,
    infill_prefix: str = DEFAULT_INFILL[0],
    infill_suffix: str = DEFAULT_INFILL[1],
    length: int = 48,
    steps: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.9,
    strategy: str = "confidence",
    block_size: Optional[int] = 8,
    max_steps: Optional[int] = None,
    run_dir: Optional[str] = None,
) -> None:
    """Adapt, evaluate before/after, and sample.

    Args:
        config: experiment YAML (e.g. experiments/smollm2_shakespeare.yaml).
        prompt: prefix of the continuation sample.
        infill_prefix: text before the infilled region.
        infill_suffix: text after it.
        length: tokens to generate in each sample.
        steps: denoising steps.
        temperature: sampling temperature.
        top_p: nucleus mass.
        strategy: the sampler's strategy (random, confidence, threshold).
        block_size: decode left to right in blocks of this many tokens (None: the whole span at once).
            Confidence order in blocks of 8 is what read most like language at the demo's budget
            (experiments/demo_quality/RESULTS.md).
        max_steps: override trainer.max_steps of the config.
        run_dir: write logs and checkpoints here instead of the config's folders.
    """
    from lightning_dlm.model.diffusion_model import DiffusionModel
    from lightning_dlm.sampling import generate

    if not os.path.isfile(config):
        raise DLMError(f"config '{config}' does not exist: give a YAML under experiments/")
    overrides: List[str] = []
    if run_dir is not None:
        overrides += ["--trainer.default_root_dir", run_dir]
    ckpt_dir = checkpoint_dir(OmegaConf.to_container(OmegaConf.load(config)) if run_dir is None
                              else {"trainer": {"default_root_dir": run_dir}})
    if os.path.isdir(ckpt_dir):
        # the demo starts over each time: it replaces its own earlier run, and only that
        print(f"[demo] removing the previous demo checkpoints in {ckpt_dir}")
        shutil.rmtree(ckpt_dir)
    # the validations before and after write no logs of their own: their values go into the fit's
    # TensorBoard run at the steps they stand for (0 and the last), beside the training curves
    # (and no table of Lightning's: the demo says the value in its own words)
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--verbose", "false", *overrides]
    t0 = time.time()
    print("[demo] 1/4 validating the pretrained model before adaptation (diffusion NELBO bound)")
    before = _val_nelbo(_run_cli(["validate", "--config", config, *quiet]))
    print(f"[demo] the pretrained model: val/nelbo {before:.3f}")
    t1 = time.time()
    print(f"[demo] 2/4 adapting it into a diffusion LM (dlm fit --config {config})")
    steps_override = ["--trainer.max_steps", str(max_steps)] if max_steps is not None else []
    fit = _run_cli(["fit", "--config", config, *overrides, *steps_override])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    if not ckpt or not os.path.isfile(ckpt):
        raise DLMError("the fit wrote no checkpoint: check checkpoint.every_n_train_steps and trainer.max_steps")
    t2 = time.time()
    print("[demo] 3/4 validating the adapted model")
    after = _val_nelbo(_run_cli(["validate", "--config", config, "--ckpt_path", ckpt, *quiet]))
    print(f"[demo] the adapted model: val/nelbo {after:.3f}")
    log_dir = log_validations(fit.trainer, before, after)
    t3 = time.time()
    print(f"[demo] 4/4 sampling from {ckpt}")
    module = DiffusionModel.from_pretrained(ckpt)
    decoding = dict(temperature=temperature, top_p=top_p, strategy=strategy, seed=0)
    cont = generate(module, [prompt], length=length, steps=steps, block_size=block_size, **decoding)
    fill = generate(module, [infill_prefix], suffixes=[infill_suffix], length=length // 2, steps=steps // 2,
                    block_size=block_size if block_size and block_size <= length // 2 else None, **decoding)
    t4 = time.time()
    bar = "=" * 72
    mark = span_marker(sys.stdout)
    how = f"{strategy} order" + (f" in blocks of {block_size}" if block_size else "")
    print(f"\n{bar}\nContinuation ({length} tokens, {steps} steps, {how}, generated text {mark.legend}):\n{bar}")
    print(f"{prompt}{mark(cont.texts[0])}")
    print(f"\n{bar}\nInfilling ({length // 2} tokens between a fixed prefix and suffix):\n{bar}")
    print(f"{infill_prefix}{mark(fill.texts[0])}{infill_suffix}")
    print(f"\n{bar}\nSummary\n{bar}")
    print(f"val/nelbo before adaptation : {before:8.3f}   (perplexity bound {math.exp(min(before, 50)):,.1f})")
    print(f"val/nelbo after adaptation  : {after:8.3f}   (perplexity bound {math.exp(min(after, 50)):,.1f})")
    print(f"checkpoint                  : {ckpt}")
    if log_dir:
        print(f"tensorboard                 : tensorboard --logdir {log_dir}  (val/nelbo at step 0 = before)")
    print(f"time: validate {t1 - t0:.0f}s, fit {t2 - t1:.0f}s, validate {t3 - t2:.0f}s, sample {t4 - t3:.0f}s, "
          f"total {t4 - t0:.0f}s")


def demo_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm demo", description="Adapt a pretrained LM into a diffusion LM and sample from it.")
    parser.add_function_arguments(demo, as_group=False)
    cfg = parser.parse_args(args)
    demo(**cfg.as_dict())
