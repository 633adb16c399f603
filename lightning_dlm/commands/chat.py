"""``dlm chat``: a terminal chat with a checkpoint, each reply shown as it denoises.

    dlm chat --ckpt runs/sft/checkpoints/last.ckpt [--strategy confidence --max_length 128 --cfg_scale 1]

Every turn is rendered with the tokenizer's chat template (the whole conversation so far, ready
for the assistant's reply), decoded with the EOS-aware sampler (at most ``--max_length`` tokens,
stopping at the model's EOS) and shown live: on a terminal the reply's masked slots (``░``) fill
in step by step; elsewhere only the reply is printed. ``/exit``, ``/quit``, end of input (Ctrl-D)
or Ctrl-C at the prompt ends the chat (``bye``, exit 0); ``/reset`` forgets the conversation.
Ctrl-C while a reply is decoding stops that reply: its line becomes ``dlm> (interrupted)``, the
turn is forgotten and the prompt comes back. Warnings raised while a reply decodes (shown only with
``--verbose``) are printed after its line, never inside the live display.
"""

from __future__ import annotations

import sys
import warnings
from typing import List, Optional

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from lightning_dlm.core.errors import DLMError
from lightning_dlm.sampling.engine import sampler_defaults

_SAMPLER = sampler_defaults()
MASK_GLYPH = "░"
EXIT_WORDS = ("/exit", "/quit")
INTERRUPTED = "(interrupted)"


def render_reply(ids: List[int], tokenizer, mask_id: int, eos_id: Optional[int]) -> str:
    """The reply region of a canvas as text: masked slots as ``░``, cut at the first EOS."""
    parts: List[str] = []
    run: List[int] = []
    for token in ids:
        if eos_id is not None and token == eos_id:
            break
        if token == mask_id:
            if run:
                parts.append(tokenizer.decode(run, skip_special_tokens=True))
                run = []
            parts.append(MASK_GLYPH)
        else:
            run.append(token)
    if run:
        parts.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(parts)


class LiveDenoiser:
    """A denoiser that shows the canvas it is given (the reply as it stands) before each step."""

    supports_cache = False

    def __init__(self, inner, show):
        self.inner, self.show = inner, show

    def logits(self, ids, attention_mask, keep):
        self.show(ids)
        return self.inner.logits(ids, attention_mask, keep)


class ChatSession:
    """The conversation and how one reply is decoded (no terminal code: tests drive it directly)."""

    def __init__(self, model, system: Optional[str] = None, max_length: int = 128, seed: int = 0, **sampler):
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise DLMError("this checkpoint has no tokenizer: it cannot chat")
        if not getattr(tokenizer, "chat_template", None):
            raise DLMError("this model's tokenizer has no chat template, so a conversation cannot be rendered: "
                           "chat with an instruction-tuned model (e.g. SmolLM2-Instruct adapted with dlm sft fit)")
        if max_length < 1:
            raise DLMError(f"--max_length must be >= 1, got {max_length}")
        self.model, self.tokenizer, self.max_length, self.seed = model, tokenizer, max_length, seed
        self.sampler = sampler
        self.system = system
        self.messages: List[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_text(self, user: str) -> str:
        messages = self.messages + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def reply(self, user: str, show=None) -> str:
        """Decode the assistant's reply to ``user``; ``show(text)`` is called with the reply as it
        stands before every denoising step and once at the end."""
        from lightning_dlm.model.loading import start_and_pad_ids
        from lightning_dlm.sampling import SamplerConfig, build_canvas, decode
        from lightning_dlm.sampling.denoisers import ModelDenoiser
        from lightning_dlm.sampling.generate import row_seeds, suppressed_ids

        net, tokenizer = self.model, self.tokenizer
        prefix = tokenizer(self.prompt_text(user), add_special_tokens=False)["input_ids"]
        start, pad = start_and_pad_ids(tokenizer)
        canvas = build_canvas([prefix], self.max_length, net.mask_token_id, pad, start, None, net.max_positions,
                              next(net.parameters()).device, align_targets=True)
        a, b = canvas.target_span()
        mask_id, eos_id = net.mask_token_id, tokenizer.eos_token_id
        options = dict(self.sampler)
        options["steps"] = options.get("steps") or self.max_length
        config = SamplerConfig(stop_at_eos=True, **options)
        denoiser = ModelDenoiser(net)
        if show is not None:
            denoiser = LiveDenoiser(denoiser, lambda ids: show(render_reply(ids[0, a:b].tolist(), tokenizer, mask_id, eos_id)))
        out = decode(denoiser, canvas, config, schedule=net.schedule, seeds=row_seeds(self.seed + len(self.messages), [prefix]),
                     shift=net.shift, eos_id=eos_id, pad_id=pad, suppress_ids=suppressed_ids(net, tokenizer),
                     mask_id=mask_id)
        text = tokenizer.decode(out.tokens[0], skip_special_tokens=True).strip()
        if show is not None:
            show(text)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text


def chat(
    ckpt: str,
    system: Optional[str] = None,
    max_length: int = 128,
    steps: Optional[int] = None,
    strategy: str = "confidence",
    temperature: float = 0.0,
    top_k: int = _SAMPLER["top_k"],
    top_p: float = 1.0,
    block_size: Optional[int] = _SAMPLER["block_size"],
    cfg_scale: float = _SAMPLER["cfg_scale"],
    seed: int = 0,
    live: bool = True,
    device: str = "auto",
    trust_checkpoint: bool = False,
) -> None:
    """Chat with a lightning_dlm checkpoint in the terminal.

    Args:
        ckpt: a .ckpt written by `dlm fit` / `dlm sft fit`, a sharded checkpoint folder, or a folder written by `dlm export`.
        system: a system message that leads the conversation.
        max_length: the longest reply in tokens (each reply stops at the model's EOS).
        steps: denoising steps per reply (default: one per token of max_length).
        strategy: random, confidence or threshold.
        temperature: sampling temperature (0 = argmax).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1].
        block_size: decode left to right in blocks of this many tokens.
        cfg_scale: classifier-free guidance weight (0 = none; the unconditional pass sees the conversation masked).
        seed: random seed of the replies.
        live: show each reply denoising (on a terminal).
        device: cpu, cuda, or auto.
        trust_checkpoint: unpickle the checkpoint in full, which runs any code in it: only for a file whose author you trust.
    """
    import torch

    from lightning_dlm.model.diffusion_model import DiffusionModel

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DiffusionModel.from_pretrained(ckpt, map_location=device, trust_checkpoint=trust_checkpoint)
    session = ChatSession(model, system=system, max_length=max_length, seed=seed, steps=steps, strategy=strategy,
                          temperature=temperature, top_k=top_k, top_p=top_p, block_size=block_size, cfg_scale=cfg_scale)
    from lightning_dlm.sampling import SamplerConfig

    SamplerConfig(**{**session.sampler, "steps": steps or max_length}).check()  # bad options: one line, before any turn
    terminal = sys.stdout.isatty()
    print(f"dlm chat: {ckpt} ({strategy}, up to {max_length} tokens a reply). /exit, Ctrl-D or Ctrl-C ends, "
          f"/reset forgets; Ctrl-C during a reply stops it.", flush=True)
    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the chat ends
            print(flush=True)
            break
        user = user.strip()
        if user in EXIT_WORDS:
            break
        if user == "/reset":
            session.reset()
            print("(conversation forgotten)", flush=True)
            continue
        if not user:
            continue
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:  # printed after the reply's line, not inside it
                if live and terminal:
                    _reply_live(session, user)
                else:
                    print(f"dlm> {session.reply(user)}", flush=True)
        except KeyboardInterrupt:  # Ctrl-C mid-reply: this reply stops (and is not kept), the prompt comes back
            if not (live and terminal):  # (the live display has already become this line)
                print(("\r" if terminal else "") + f"dlm> {INTERRUPTED}", flush=True)  # \r: over the echoed ^C
        except DLMError as err:  # e.g. the conversation outgrew the model's positions: say so, go on
            print(f"error: {err} (/reset starts over)", flush=True)
        finally:
            for warning in caught:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    print("bye", flush=True)


def _reply_live(session: ChatSession, user: str) -> str:
    """One reply, its masked slots filling in on one live line (rich redraws it in place: no stray
    lines); on Ctrl-C the line becomes ``dlm> (interrupted)`` and KeyboardInterrupt goes on."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    with Live(Text("dlm> "), console=console, auto_refresh=False, transient=False) as live:
        def show(text: str) -> None:
            live.update(Text("dlm> " + text), refresh=True)

        try:
            return session.reply(user, show=show)
        except KeyboardInterrupt:
            live.update(Text(f"dlm> {INTERRUPTED}"), refresh=True)  # over the partial canvas and the echoed ^C
            raise


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dlm chat", description=(
        "Chat with a lightning_dlm checkpoint in the terminal. /exit, Ctrl-D or Ctrl-C at the prompt ends the chat; "
        "Ctrl-C while a reply decodes stops that reply (it is forgotten) and the prompt comes back; /reset forgets "
        "the conversation."))
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with these options")
    parser.add_function_arguments(chat, as_group=False, skip={"trust_checkpoint", "live"})
    parser.add_argument("--live", action=ActionYesNo, default=True, help="show each reply denoising (on a terminal)")
    parser.add_argument("--trust_checkpoint", action=ActionYesNo, default=False,
                        help="unpickle the checkpoint in full, which runs any code in it (only for a file you trust)")
    return parser


def chat_command(args: List[str]) -> None:
    cfg = build_parser().parse_args(args)
    cfg.pop("config", None)
    chat(**cfg.as_dict())
