"""``dlm sample``: decode continuations or infills from a trained checkpoint."""

from __future__ import annotations

from typing import List, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_dlm.errors import DLMError


def sample(
    ckpt: str,
    prompt: Union[str, List[str]] = "",
    suffix: Union[str, List[str], None] = None,
    length: int = 64,
    steps: int = 64,
    temperature: float = 0.9,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Decode text with a lightning_dlm checkpoint (random-order sampler).

    Args:
        ckpt: a .ckpt written by `dlm fit`.
        prompt: text before the generated region, or a list of texts ('[a, b]') for a batch.
        suffix: text after it, for infilling (a list: one per prompt).
        length: number of tokens to generate.
        steps: denoising steps T.
        temperature: sampling temperature (0 = greedy).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1].
        seed: random seed.
        device: cpu, cuda, or auto.
    """
    import torch

    from lightning_dlm.checkpoints import load_diffusion_lm
    from lightning_dlm.sampling import generate

    prompt = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(suffix, str):
        suffix = [suffix]
    if suffix is not None and len(suffix) != len(prompt):
        raise DLMError(f"got {len(prompt)} --prompt and {len(suffix)} --suffix: give one suffix per prompt")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_diffusion_lm(ckpt, map_location=device)
    out = generate(module, prompt, length=length, suffixes=suffix, steps=steps, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed)
    for i, text in enumerate(out.texts):
        head = f"--- sample {i + 1}/{len(out.texts)}"
        print(head)
        if suffix is not None:
            print(f"{prompt[i]}[{text}]{suffix[i]}")
        else:
            print(f"{prompt[i]}[{text}]")
    print(f"({out.forward_passes} forward passes; generated text in [brackets])")


def sample_command(args: List[str]) -> None:
    parser = ArgumentParser(prog="dlm sample", description="Decode text with a lightning_dlm checkpoint.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    parser.add_function_arguments(sample, as_group=False)
    cfg = parser.parse_args(args)
    cfg.pop("config", None)
    sample(**cfg.as_dict())
