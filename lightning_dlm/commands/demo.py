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


def pretrained_causal_lm(config: str) -> Optional[str]:
    """The config's ``model.backbone.pretrained`` when it is a local plain causal LM folder (no
    ``diffusion_config.json``): the AR model the demo compares against; else None."""
    from lightning_dlm.io.safe_read import is_exported_folder

    backbone = ((OmegaConf.to_container(OmegaConf.load(config)).get("model") or {}).get("backbone") or {})
    path = backbone.get("pretrained")
    if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")) and not is_exported_folder(path):
        return path
    return None


def _fit(config: str, overrides: List[str], steps_override: List[str]):
    """The fit's CLI object and its last checkpoint."""
    fit = _run_cli(["fit", "--config", config, *overrides, *steps_override])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    if not ckpt or not os.path.isfile(ckpt):
        raise DLMError("the fit wrote no checkpoint: check checkpoint.every_n_train_steps and trainer.max_steps")
    return fit, ckpt


def _fresh(config: str, run_dir: Optional[str]) -> None:
    ckpt_dir = checkpoint_dir(OmegaConf.to_container(OmegaConf.load(config)) if run_dir is None
                              else {"trainer": {"default_root_dir": run_dir}})
    if os.path.isdir(ckpt_dir):
        # the demo starts over each time: it replaces its own earlier run, and only that
        print(f"[demo] removing the previous demo checkpoints in {ckpt_dir}")
        shutil.rmtree(ckpt_dir)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


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
    block_config: Optional[str] = None,
    prompts: Optional[List[str]] = None,
    speed_length: int = 256,
    threshold: float = 0.9,
) -> None:
    """Adapt, evaluate before/after, and sample; beside the AR model it started from.

    Args:
        config: experiment YAML (e.g. experiments/micro/adapt.yaml, experiments/smollm2_shakespeare.yaml).
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
        max_steps: override trainer.max_steps of the config (and of block_config).
        run_dir: write logs and checkpoints here instead of the config's folders.
        block_config: also adapt the same AR model in block mode with this YAML (e.g.
            experiments/micro/adapt_block.yaml) and time its decoding against the AR model's.
        prompts: more prompts for the side-by-side samples (default: just ``prompt``).
        speed_length: tokens generated when timing decoding (batch 1).
        threshold: the block model's parallel-decoding confidence threshold.
    """
    from lightning_dlm.model.diffusion_model import DiffusionModel
    from lightning_dlm.sampling import generate

    for path, what in ((config, "config"), (block_config, "block_config")):
        if path is not None and not os.path.isfile(path):
            raise DLMError(f"{what} '{path}' does not exist: give a YAML under experiments/")
    if block_config is not None and run_dir is not None:
        raise DLMError("run_dir applies to one config: drop run_dir when giving block_config (each config has its folder)")
    ar_path = pretrained_causal_lm(config)
    overrides: List[str] = ["--trainer.default_root_dir", run_dir] if run_dir is not None else []
    for path in (config, block_config):
        if path is not None:
            _fresh(path, run_dir)
    # the validations write no logs of their own: their values go into the fit's TensorBoard run at
    # the steps they stand for (0 and the last), beside the training curves
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--verbose", "false", *overrides]
    steps_override = ["--trainer.max_steps", str(max_steps)] if max_steps is not None else []
    stages = 4 + (ar_path is not None) + 2 * (block_config is not None)
    stage = iter(range(1, stages + 1))
    times = {}
    t0 = time.time()
    ar_nll = None
    if ar_path is not None:
        print(f"[demo] {next(stage)}/{stages} the AR model {ar_path}: exact NLL on the held-out text")
        ar_nll = _val_nelbo(_run_cli(["validate", "--config", config, "--model.objective", "ar", *quiet]))
        print(f"[demo] the AR model: val NLL {ar_nll:.3f} (perplexity {math.exp(min(ar_nll, 50)):,.1f})")
    print(f"[demo] {next(stage)}/{stages} validating it as a diffusion LM before adaptation (NELBO bound)")
    before = _val_nelbo(_run_cli(["validate", "--config", config, *quiet]))
    print(f"[demo] before adaptation: val/nelbo {before:.3f}")
    times["validate"] = time.time() - t0
    t1 = time.time()
    print(f"[demo] {next(stage)}/{stages} adapting it into a diffusion LM (dlm fit --config {config})")
    fit, ckpt = _fit(config, overrides, steps_override)
    times["fit"] = time.time() - t1
    print(f"[demo] {next(stage)}/{stages} validating the adapted model")
    after = _val_nelbo(_run_cli(["validate", "--config", config, "--ckpt_path", ckpt, *quiet]))
    print(f"[demo] the adapted model: val/nelbo {after:.3f}")
    log_dir = log_validations(fit.trainer, before, after)
    block_ckpt = block_after = None
    if block_config is not None:
        t2 = time.time()
        print(f"[demo] {next(stage)}/{stages} adapting it in block mode (dlm fit --config {block_config})")
        block_ckpt = _fit(block_config, [], steps_override)[1]
        times["fit (block)"] = time.time() - t2
        print(f"[demo] {next(stage)}/{stages} validating the block model")
        block_after = _val_nelbo(_run_cli(["validate", "--config", block_config, "--ckpt_path", block_ckpt, *quiet]))
        print(f"[demo] the block model: val/nelbo {block_after:.3f}")
    t3 = time.time()
    print(f"[demo] {next(stage)}/{stages} sampling")
    module = DiffusionModel.from_pretrained(ckpt)
    decoding = dict(temperature=temperature, top_p=top_p, seed=0)
    every = [prompt, *[p for p in (prompts or []) if p != prompt]]
    ar = block = None
    if ar_path is not None:
        from lightning_dlm.evaluation.evaluators import load_evaluator

        ar = load_evaluator(ar_path, kind="ar")
    if block_ckpt is not None:
        block = DiffusionModel.from_pretrained(block_ckpt)
    bar = "=" * 72
    mark = span_marker(sys.stdout)
    how = f"{strategy} order" + (f" in blocks of {block_size}" if block_size else "")
    rows = []
    for i, text in enumerate(every):
        cont = generate(module, [text], length=length, steps=steps, block_size=block_size, strategy=strategy,
                        **decoding)
        shown = [("diffusion LM (full recipe)", cont.texts[0])]
        if block is not None:
            shown.append(("block diffusion LM", generate(block, [text], length=length, strategy="threshold",
                                                         threshold=threshold, **decoding).texts[0]))
        if ar is not None:
            shown.insert(0, ("AR model (its own generate)", ar.generate([text], length, **decoding)[0]))
        print(f"\n{bar}\nPrompt {i + 1}: {length} tokens each (diffusion: {steps} steps, {how}; generated text "
              f"{mark.legend}):\n{bar}")
        for name, sample in shown:
            print(f"--- {name}\n{text}{mark(sample)}")
        rows.append((text, shown))
    fill = generate(module, [infill_prefix], suffixes=[infill_suffix], length=length // 2, steps=steps // 2,
                    block_size=block_size if block_size and block_size <= length // 2 else None, strategy=strategy,
                    **decoding)
    print(f"\n{bar}\nInfilling ({length // 2} tokens between a fixed prefix and suffix; an AR model cannot):\n{bar}")
    print(f"{infill_prefix}{mark(fill.texts[0])}{infill_suffix}")
    judged = {}
    if ar is not None:
        from lightning_dlm.evaluation.genppl import score_samples

        names = [name for name, _ in rows[0][1]]
        for j, name in enumerate(names):
            judged[name] = score_samples(ar, [text for text, _ in rows], [shown[j][1] for _, shown in rows])
    times["sample"] = time.time() - t3
    speed = None
    if block is not None and ar is not None:
        t4 = time.time()
        print(f"[demo] timing {speed_length} tokens at batch 1: the AR model's generate (KV cache) and the block model")
        ar.generate([prompt], 8, **decoding)  # warm-up of both paths
        generate(block, [prompt], length=16, strategy="threshold", threshold=threshold, **decoding)
        _, ar_s = _timed(lambda: ar.generate([prompt], speed_length, **decoding))
        out, block_s = _timed(lambda: generate(block, [prompt], length=speed_length, strategy="threshold",
                                               threshold=threshold, **decoding))
        speed = dict(ar_tps=speed_length / ar_s, block_tps=speed_length / block_s, passes=out.forward_passes)
        times["speed"] = time.time() - t4
    print(f"\n{bar}\nSummary\n{bar}")
    if ar_nll is not None:
        print(f"AR model, exact NLL         : {ar_nll:8.3f}   (perplexity {math.exp(min(ar_nll, 50)):,.1f})")
    print(f"val/nelbo before adaptation : {before:8.3f}   (perplexity bound {math.exp(min(before, 50)):,.1f})")
    ratio = f", {math.exp(min(after, 50)) / math.exp(min(ar_nll, 50)):.2f}x the AR perplexity" if ar_nll is not None else ""
    print(f"val/nelbo after adaptation  : {after:8.3f}   (perplexity bound {math.exp(min(after, 50)):,.1f}{ratio})")
    if block_after is not None:
        print(f"block model, val/nelbo      : {block_after:8.3f}   (perplexity bound {math.exp(min(block_after, 50)):,.1f})")
    for name, result in judged.items():
        print(f"samples of the {name:<28}: gen. perplexity {result['gen_ppl']:7.1f} under the AR model, "
              f"distinct-2 {result['distinct_2']:.3f}, entropy {result['entropy']:.2f} bits")
    if speed is not None:
        print(f"decoding {speed_length} tokens, batch 1 : AR generate {speed['ar_tps']:,.0f} tok/s ({speed_length} passes), "
              f"block model {speed['block_tps']:,.0f} tok/s ({speed['passes']} passes, "
              f"{speed_length / max(speed['passes'], 1):.1f} tokens a pass): {speed['block_tps'] / speed['ar_tps']:.2f}x")
    print(f"checkpoint                  : {ckpt}" + (f"\nblock checkpoint            : {block_ckpt}" if block_ckpt else ""))
    if log_dir:
        print(f"tensorboard                 : tensorboard --logdir {log_dir}  (val/nelbo at step 0 = before)")
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f", total {time.time() - t0:.0f}s")


def demo_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm demo", description="Adapt a pretrained LM into a diffusion LM and sample from it.")
    parser.add_function_arguments(demo, as_group=False)
    cfg = parser.parse_args(args)
    demo(**cfg.as_dict())
