"""An lm-evaluation-harness model for diffusion checkpoints: ``lightning_dlm`` (alias ``dlm``).

    dlm lm-eval --model lightning_dlm --model_args ckpt=runs/x/last.ckpt,levels=32 --tasks hellaswag
    # or, in Python: import lightning_dlm.evaluation.harness, then lm_eval.simple_evaluate(model="lightning_dlm", ...)

lm-eval 0.4 finds external models only once their module is imported (it has no plugin entry
points), hence ``dlm lm-eval``: it imports this module and hands the rest of the command line to
lm-eval's own CLI.

* ``loglikelihood``: the ELBO bound of log p(continuation | context), ``-n * score`` of the
  paper's multiple-choice protocol (``levels`` levels of t, Monte Carlo masks; see
  :mod:`lightning_dlm.evaluation.choice`); "greedy" = every continuation token is the argmax
  when all of them are masked.
* ``loglikelihood_rolling``: the same bound over lm-eval's rolling windows (each token
  scored once, with the most context that fits). A block model's windows are scored block by
  block (each block given the clean blocks before it, blocks aligned on the window's start): a
  sum of per-block bounds, exact at block size 1.
* ``generate_until``: the sampler library (``strategy``, ``steps``, ``block_size``, ``cache``...)
  with EOS stopping, then cut at the first ``until`` string.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import List, Optional, Tuple

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.choice import diffusion_choice_scores
from lightning_dlm.evaluation.evaluators import DiffusionEvaluator, load_evaluator


@register_model("lightning_dlm", "dlm")
class DiffusionHarnessLM(LM):
    def __init__(self, ckpt: Optional[str] = None, pretrained: Optional[str] = None, levels: int = 32,
                 batch_size: int = 16, device: str = "cpu", seed: int = 0, strategy: str = "confidence",
                 steps: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
                 block_size: Optional[int] = None, cache: str = "none", max_gen_toks: int = 256,
                 max_length: Optional[int] = None, evaluator: Optional[DiffusionEvaluator] = None, **_):
        super().__init__()
        path = ckpt or pretrained
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DLMError(f"device {device} was asked for but this machine has no CUDA: use device=cpu")
        if evaluator is None:
            if not path:
                raise DLMError("lightning_dlm needs a checkpoint: --model_args ckpt=<.ckpt or exported folder>")
            evaluator = load_evaluator(str(path), kind="diffusion", device=str(device))
        self.evaluator = evaluator
        self.levels, self.batch_size, self.seed = int(levels), int(batch_size), int(seed)
        self.sampler = dict(strategy=strategy, temperature=float(temperature), top_p=float(top_p),
                            block_size=block_size, cache=cache, seed=int(seed))
        if steps:
            self.sampler["steps"] = int(steps)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else (evaluator.max_length or 2048)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's constructor path: ``--model_args`` win over its own ``--batch_size`` / ``--device``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if not str(extra.get("batch_size", 1)).isdigit():  # "auto" and the like: keep our default
            extra.pop("batch_size", None)
        extra.pop("max_batch_size", None)
        device = str(extra.get("device", "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's own default is cuda:0; on a machine without CUDA run on the CPU (and say so)
            print(f"lightning_dlm: device {device} is not available, evaluating on the cpu", file=sys.stderr)
            extra["device"] = "cpu"
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # lm-eval calls these with a list of Instance objects whose .args hold the request
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        if not requests:
            return []
        contexts, continuations = zip(*[req.args for req in requests])
        bar = tqdm(total=len(requests) * self.levels, desc="loglikelihood", disable=disable_tqdm)
        out = self.evaluator.choice(list(contexts), list(continuations), levels=self.levels,
                                    batch_size=self.batch_size, seed=self.seed, progress=bar.update)
        bar.close()
        return [(float(ll), bool(g)) for ll, g in zip(out["loglik"], out["greedy"])]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        ev = self.evaluator
        if ev.start_id is None:
            raise DLMError("loglikelihood_rolling needs a bos or eos token in the tokenizer to start each text")
        rows, starts, owner = [], [], []
        for n, req in enumerate(requests):
            windows = get_rolling_token_windows(token_list=ev.encode(req.args[0]), prefix_token=ev.start_id,
                                                max_seq_len=self._max_length - 1, context_len=1)
            # (a window is context + targets = max_seq_len + 1 tokens: it must fit the positions)
            for context, target in map(make_disjoint_window, windows):
                rows.append(list(context) + list(target))
                starts.append(len(context))
                owner.append(n)
        bar = tqdm(total=len(rows) * self.levels, desc="loglikelihood_rolling", disable=disable_tqdm)
        scores, _ = diffusion_choice_scores(ev.net, rows, starts, ev.pad_id, levels=self.levels,
                                            shift=ev.net.shift, batch_size=self.batch_size,
                                            seed=self.seed, progress=bar.update,
                                            block_size=ev.net.diffusion.block_size if ev.is_block else None)
        bar.close()
        totals = [0.0] * len(requests)
        for score, row, start, n in zip(scores, rows, starts, owner):
            totals[n] -= score * (len(row) - start)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        ev = self.evaluator
        groups = defaultdict(list)
        for n, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", self.sampler["temperature"]))
            if kwargs.get("do_sample") is False:  # lm-eval's greedy requests
                temperature = 0.0
            groups[(length, temperature)].append((n, context, until))
        out: List[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (length, temperature), rows in groups.items():
            opts = dict(self.sampler, temperature=temperature)
            texts = ev.generate([c for _, c, _ in rows], length, batch_size=self.batch_size, stop_at_eos=True,
                                progress=bar.update, **opts)
            for (n, _, until), text in zip(rows, texts):
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[n] = text
        bar.close()
        return out

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.evaluator.tokenizer, "name_or_path", "lightning_dlm").replace("/", "__")


def lm_eval_command(argv: List[str]) -> None:
    """``dlm lm-eval ARGS``: lm-eval's CLI with the lightning_dlm model registered."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models stay available next to ours)
    from lm_eval.__main__ import cli_evaluate

    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    except Exception as err:
        if not _is_network_error(err):
            raise
        detail = " ".join(str(err).split()) or type(err).__name__
        raise DLMError(f"lm-eval could not reach the Hugging Face hub for a task's data ({detail}): hub tasks such as "
                       "hellaswag need network; offline, run a local task YAML, e.g. --tasks hellaswag_sample "
                       "--include_path data/examples/lm_eval_tasks/") from None
    finally:
        sys.argv = saved


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) says the hub could not be reached."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError) or type(err).__name__ in (
                "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "ReadTimeout", "LocalEntryNotFoundError"):
            return True  # builtin, requests' and huggingface_hub's connection errors
        err = err.__cause__ or err.__context__
    return False
