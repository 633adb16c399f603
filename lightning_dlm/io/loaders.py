"""One registry of the places a diffusion model is read from, each giving the same record.

A loader says whether it reads a path (:meth:`Loader.matches`) and reads it into a
:class:`StoredModel`: the transformers model's description and tensors, the tokenizer, the mask
token, the diffusion options and what the run recorded. Assembling the model from that record is
:mod:`lightning_dlm.model.pretrained`'s (``DiffusionModel.from_pretrained``); nothing here builds
a model, and nothing runs code from the files (see :mod:`.safe_read`).

Registered, in the order they are tried: ``hub`` (a hub name of an exported model; downloads, then
reads it as ``exported``), ``exported`` (a folder written by ``dlm export``), ``checkpoint`` (a
``.ckpt`` file or a sharded checkpoint folder written by ``dlm fit``). :func:`register_loader`
adds one in front of them: :mod:`lightning_dlm.io.releases` registers the released diffusion LMs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.io.format import BACKBONE_PREFIX, CHECKPOINT_KEY, EXPORT_CONFIG, checkpoint_info
from lightning_dlm.io.safe_read import is_exported_folder, read_checkpoint, read_export_config, require_exists
from lightning_dlm.io.tokenizer_files import tokenizer_from_files


@dataclass
class StoredModel:
    """What a loader read. Either ``folder`` (a transformers model folder, loaded with its own
    config and dtype) or ``backbone`` + ``state`` (a checkpoint's backbone record and the
    transformers model's own tensors) is set."""

    mask_token_id: int
    mask_token_added: bool
    diffusion: Dict[str, Any]
    tokenizer: Any
    info: Dict[str, Any] = field(default_factory=dict)
    folder: Optional[str] = None
    backbone: Optional[Dict[str, Any]] = None
    state: Optional[Dict[str, Any]] = None


class Loader:
    """One kind of source: ``matches(path)`` cheaply (no weights read), then ``read(path, trust)``.
    ``release``: a released diffusion LM's folder layout (also read from a hub download)."""

    name = "loader"
    release = False

    def matches(self, path: str) -> bool:
        raise NotImplementedError

    def read(self, path: str, trust: bool) -> StoredModel:
        raise NotImplementedError


def custom_code_refusal(path: str, err: BaseException):
    """The one line for transformers refusing (``trust_remote_code=False``) a folder whose config.json or
    tokenizer_config.json names its own Python code (``auto_map``), or None for any other error."""
    if "custom code" not in str(err):
        return None
    return DLMError(f"refusing to load '{path}': its config.json or tokenizer_config.json names custom Python code "
                    f"(auto_map), which lightning_dlm never runs from a model folder: load a folder written by dlm "
                    f"export, or remove auto_map where transformers' own model class fits")


def backbone_state_dict(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The transformers model's own state dict (``net.model.`` removed) of a DiffusionLM state dict
    whose wrapper prefixes are already removed."""
    state = {key[len(BACKBONE_PREFIX):]: value for key, value in state_dict.items() if key.startswith(BACKBONE_PREFIX)}
    if not state:
        some = ", ".join(sorted(state_dict)[:3]) or "none"
        raise DLMError(f"the checkpoint holds no '{BACKBONE_PREFIX}*' weights (first keys: {some}): was it written by `dlm fit`?")
    return state


class ExportedLoader(Loader):
    """A folder written by ``dlm export`` / ``DiffusionModel.save_pretrained``."""

    name = "exported"

    def matches(self, path: str) -> bool:
        return is_exported_folder(path)

    def read(self, path: str, trust: bool) -> StoredModel:
        from transformers import AutoTokenizer

        cfg = read_export_config(path)
        try:
            # never the folder's own Python files (auto_map): transformers would ask on a terminal, and run them on a yes
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            refusal = custom_code_refusal(path, err)
            if refusal is not None:
                raise refusal from None
            first = first_line(err, 160)
            raise DLMError(f"could not read the tokenizer in '{path}' ({first}): export the checkpoint again") from None
        mask_id = int(cfg["mask_token_id"])
        if tokenizer.mask_token_id is not None and tokenizer.mask_token_id != mask_id:
            raise DLMError(f"'{path}': the tokenizer's mask token id {tokenizer.mask_token_id} differs from {EXPORT_CONFIG}'s "
                           f"{mask_id}: export the checkpoint again with `dlm export`")
        info = {key: cfg[key] for key in ("seed", "val_t_levels", "objective", "tokens_seen", "global_step",
                                          "source_checkpoint") if key in cfg}
        return StoredModel(mask_id, bool(cfg.get("mask_token_added", False)), diffusion=cfg, tokenizer=tokenizer,
                           info=info, folder=path)


class CheckpointLoader(Loader):
    """A ``.ckpt`` file or a sharded checkpoint folder written by ``dlm fit``."""

    name = "checkpoint"

    def matches(self, path: str) -> bool:
        return os.path.exists(path) and not is_exported_folder(path)

    def read(self, path: str, trust: bool) -> StoredModel:
        checkpoint = read_checkpoint(path, trust=trust)
        meta = checkpoint[CHECKPOINT_KEY]
        if not meta.get("tokenizer_files"):
            raise DLMError("the checkpoint carries no tokenizer: train with model.backbone.tokenizer (or pretrained) set")
        backbone = meta["backbone"]
        # custom tokenizer code only where the checkpoint was trusted and its model needs remote code (see read_checkpoint)
        remote = trust and isinstance(backbone, dict) and bool(backbone.get("trust_remote_code"))
        return StoredModel(int(meta["mask_token_id"]), bool(meta["mask_token_added"]),
                           diffusion=(checkpoint.get("hyper_parameters") or {}).get("diffusion") or {},
                           tokenizer=tokenizer_from_files(meta["tokenizer_files"], trust_remote_code=remote),
                           info=checkpoint_info(checkpoint, path), backbone=backbone,
                           state=backbone_state_dict(checkpoint.pop("state_dict")))


class HubLoader(Loader):
    """A hub name (``owner/name``, not a local path) of an exported model or of a released diffusion
    LM (a loader whose ``release`` is true reads the downloaded folder); needs the network."""

    name = "hub"

    def matches(self, path: str) -> bool:
        return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))

    def read(self, path: str, trust: bool) -> StoredModel:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id=path)
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: one line
            first = first_line(err, 160)
            raise DLMError(f"could not fetch '{path}' from the Hugging Face hub ({first}): give a local .ckpt, exported folder or "
                           f"released diffusion LM folder, or check the name and your network access") from None
        if os.path.isfile(os.path.join(folder, EXPORT_CONFIG)):
            return ExportedLoader().read(folder, trust)
        for loader in LOADERS:  # a released diffusion LM's own layout (lightning_dlm.io.releases)
            if getattr(loader, "release", False) and loader.matches(folder):
                return loader.read(folder, trust)
        raise DLMError(f"hub model '{path}' has no {EXPORT_CONFIG} and is none of the released diffusion LMs "
                       f"lightning_dlm reads: it is not a diffusion model (an AR model loads with transformers' "
                       f"AutoModelForCausalLM)")


LOADERS: List[Loader] = [HubLoader(), ExportedLoader(), CheckpointLoader()]


def register_loader(loader: Loader) -> Loader:
    """Try ``loader`` before the built-in ones (e.g. a released model family's own folder layout)."""
    LOADERS.insert(0, loader)
    return loader


def read_stored(path: str, trust: bool = False) -> StoredModel:
    """The :class:`StoredModel` of ``path`` from the first loader that reads it."""
    for loader in LOADERS:
        if loader.matches(path):
            return loader.read(path, trust)
    require_exists(path)  # nothing matched: the one-line "does not exist"
    raise DLMError(f"no loader reads '{path}': give a .ckpt, a sharded checkpoint folder or an exported folder")
