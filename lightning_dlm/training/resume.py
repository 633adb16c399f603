"""Resuming with changed options, explicitly.

LightningCLI's own ``--ckpt_path`` handling parses the checkpoint's hyper-parameters over the
config, so options given on the command line (a new learning rate, a new schedule) were silently
replaced by the checkpoint's, and a config of another model width resumed without a word. Here a
resumed ``fit`` compares the checkpoint's hyper-parameters with the config, key by key:

* options that may change (:data:`MUTABLE`: the optimiser and its learning-rate schedule, the
  validation levels, how the backbone runs: attention kernel, gradient checkpointing, compile, kernels, where the
  weights or tokenizer were read from) take the config's value, and each change is printed;
* any other difference (model shape, objective, mask token, the noise seed) stops the run with a
  one-line error naming the key. (Data-order settings are checked by the datamodule.)

A weights-only checkpoint (the step files of ``dlm fit``, see
:class:`lightning_dlm.training.callbacks.StepCheckpoint`) holds no optimizer or schedule state: resuming from
one stops with one line naming the run's ``last.ckpt``.

:func:`apply_optim_changes` then rewrites the restored optimiser and scheduler state so a new
learning rate or schedule takes effect from the first resumed step.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import torch

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.io.format import SHARDED_META
from lightning_dlm.io.safe_read import NO_TRUST_HINT, refusal_of

#: Keys under ``model.`` that may differ from the checkpoint on resume (prefixes end with ".").
MUTABLE = (
    "optim.", "val_t_levels", "backbone.attn_implementation", "backbone.gradient_checkpointing",
    "backbone.pretrained", "backbone.tokenizer", "backbone.trust_remote_code", "backbone.compile",
    "backbone.kernels",
)
#: backbone options a checkpoint may predate, at the value it was trained with (how the backbone ran)
BACKBONE_DEFAULTS = {"backbone.compile": False, "backbone.kernels": "plain"}

Change = Tuple[str, Any, Any]


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves; ``backbone.config`` stays a
    dict leaf-by-leaf so a changed width is named exactly."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MUTABLE)


def compare_hparams(saved: Dict[str, Any], given: Dict[str, Any]) -> Tuple[List[Change], List[Change]]:
    """(allowed changes, refused changes) between the checkpoint's and the config's model options."""
    from dataclasses import asdict

    from lightning_dlm.core.config import DiffusionConfig

    old, new = flatten(_plain(saved)), flatten(_plain(given))
    # an option a checkpoint predates (e.g. diffusion.attention) was trained at its default
    defaults = flatten({"diffusion": _plain(asdict(DiffusionConfig()))}) if "diffusion" in _plain(saved) else {}
    defaults.update(BACKBONE_DEFAULTS if "backbone" in _plain(saved) else {})
    allowed, refused = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key)), new.get(key)
        if a == b:
            continue
        (allowed if is_mutable(key) else refused).append((key, a, b))
    return allowed, refused


def ckpt_path_target(path: str) -> str:
    """The file to read of a ``--ckpt_path``: the path itself, or a sharded folder's meta.pt; one
    line for a missing path or a folder that is not a sharded checkpoint."""
    if not os.path.exists(path):
        raise DLMError(f"--ckpt_path {path} does not exist: give a checkpoint written by dlm fit "
                       f"(e.g. runs/<run>/checkpoints/last.ckpt)")
    target = os.path.join(path, SHARDED_META) if os.path.isdir(path) else path
    if not os.path.isfile(target):
        raise DLMError(f"--ckpt_path {path} is a folder but not a sharded checkpoint (no {SHARDED_META}): give a .ckpt file")
    return target


def read_resume_checkpoint(path: str) -> Dict[str, Any]:
    """A ``dlm fit`` checkpoint given to ``--ckpt_path`` (a file, or a sharded folder's meta.pt),
    tensors memory-mapped: one-line errors for a missing or unreadable one."""
    target = ckpt_path_target(path)
    try:
        checkpoint = torch.load(target, map_location="cpu", weights_only=True, mmap=os.path.isfile(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
        refused = refusal_of(target, err, hint=NO_TRUST_HINT)  # it holds code: refused, not damaged
        if refused is not None:
            raise refused from None
        first = first_line(err, 160)
        raise DLMError(f"--ckpt_path {path} is not a readable checkpoint ({first}): it may be truncated or not "
                       f"written by dlm fit; resume from an earlier checkpoint of the run") from None
    if not isinstance(checkpoint, dict):
        raise DLMError(f"--ckpt_path {path} is not a checkpoint written by dlm fit (it holds no checkpoint dict)")
    return checkpoint


def is_weights_only(checkpoint: Dict[str, Any], sharded: bool = False) -> bool:
    """Whether a checkpoint lacks the training state a resume needs: Lightning writes
    ``lr_schedulers`` (a list, maybe empty) and ``optimizer_states`` into every full checkpoint and
    neither into a weights-only one (a sharded folder keeps the optimizer in its shards, so only
    ``lr_schedulers`` is in its meta.pt)."""
    return "lr_schedulers" not in checkpoint or (not sharded and "optimizer_states" not in checkpoint)


def check_full_state(path: str, checkpoint: Dict[str, Any]) -> None:
    """Refuse to resume from a weights-only checkpoint (the step files of ``dlm fit``), in one line."""
    if is_weights_only(checkpoint, sharded=os.path.isdir(path)):
        last = os.path.join(os.path.dirname(os.path.normpath(path)), "last.ckpt")
        raise DLMError(f"cannot resume from {path}: it is a weights-only step checkpoint (no optimizer or "
                       f"learning-rate schedule state); resume from {last}, which holds the full state (step files "
                       f"load for dlm sample, eval, export and validate)")


def check_resume(path: str, given_model: Any) -> List[Change]:
    """Refuse a resume from a weights-only checkpoint, or whose model options differ where they may
    not; return the allowed changes."""
    checkpoint = read_resume_checkpoint(path)
    check_full_state(path, checkpoint)
    saved = dict(checkpoint.get("hyper_parameters") or {})
    del checkpoint
    if not saved:
        return []
    allowed, refused = compare_hparams(saved, given_model)
    if refused:
        key, a, b = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(k for k, _, _ in refused[1:4])})" if len(refused) > 1 else ""
        raise DLMError(
            f"cannot resume {path} with model.{key} = {b!r}: the checkpoint was trained with {a!r}{more}; resume "
            f"with the checkpoint's value, or start a new run in another folder (--trainer.default_root_dir)"
        )
    return allowed


def apply_optim_changes(checkpoint: Dict[str, Any], lr: float, lr_at_step: float, betas, weight_decay: float,
                        eps: float) -> None:
    """Make a restored optimiser / LambdaLR state follow new options: the schedule's base lr is
    the new peak lr, the current lr is the new schedule's value at the resumed step. Group 0
    holds the decayed matrices, group 1 the undecayed parameters (``optim.param_groups``)."""
    for state in checkpoint.get("optimizer_states", []):
        for index, group in enumerate(state.get("param_groups", [])):
            group["lr"] = lr_at_step
            group["initial_lr"] = lr
            group["betas"] = tuple(betas)
            group["eps"] = eps
            group["weight_decay"] = weight_decay if index == 0 else 0.0
    for state in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in state:
            state["base_lrs"] = [lr] * len(state["base_lrs"])
            state["_last_lr"] = [lr_at_step] * len(state.get("_last_lr", state["base_lrs"]))
