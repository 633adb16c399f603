"""What every released diffusion LM's loader shares: recognise the folder from its published files,
read its weights under the names of a standard transformers class, read its tokenizer without its
own Python code, and say in one line what is wrong.

A release loader (:class:`ReleaseLoader`) is a :class:`~lightning_dlm.io.loaders.Loader`: it
``matches`` a folder by its published ``config.json`` (``model_type`` / ``architectures``, and
weight names where the config alone is another model's), and ``read`` gives the
:class:`~lightning_dlm.io.loaders.StoredModel` of a checkpoint: ``backbone`` names the transformers
config (a standard class, or :mod:`lightning_dlm.model.llada`), ``state`` its tensors,
``diffusion`` the release's conventions (shift, attention, block size), ``info`` its EOS and name.
The ``auto_map`` of a published config or tokenizer config is never followed: the release is read
through our own classes, and a folder we do not recognise stays refused.

Each release is its own small module in this package, registered with :func:`register_release`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.io.loaders import Loader, StoredModel
from lightning_dlm.io.safe_read import is_exported_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: published config keys that name code or bookkeeping, never carried into our config
DROPPED_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
                "_name_or_path", "task_specific_params")


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or None when it is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def weight_files(folder: str) -> List[str]:
    """The safetensors files of a folder: ``model.safetensors``, or the shards its index names."""
    index = read_json(os.path.join(folder, WEIGHTS_INDEX))
    if index is not None and isinstance(index.get("weight_map"), dict):
        return [os.path.join(folder, name) for name in sorted(set(index["weight_map"].values()))]
    single = os.path.join(folder, WEIGHTS_FILE)
    return [single] if os.path.isfile(single) else []


def weight_names(folder: str) -> List[str]:
    """The tensor names of a folder's safetensors files (headers only, no tensor read)."""
    index = read_json(os.path.join(folder, WEIGHTS_INDEX))
    if index is not None and isinstance(index.get("weight_map"), dict):
        return sorted(index["weight_map"])
    names: List[str] = []
    for file in weight_files(folder):
        try:
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                names.extend(handle.keys())
        except Exception:  # noqa: BLE001 - unreadable: not this release (the reader says why later)
            return []
    return sorted(names)


def read_weights(folder: str, release: str) -> Dict[str, Any]:
    """Every tensor of the folder's safetensors files (safetensors holds tensors only: no code runs)."""
    files = weight_files(folder)
    if not files:
        raise DLMError(f"'{folder}' has no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}): download the {release} release in "
                       f"full (the safetensors files), e.g. huggingface-cli download <name> --local-dir {folder}")
    from safetensors.torch import load_file

    state: Dict[str, Any] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as err:  # noqa: BLE001 - truncated, not safetensors, ...: one line
            raise DLMError(f"could not read '{file}' ({first_line(err, 120)}): download the {release} release again") from None
    return state


class ReleaseLoader(Loader):
    """One released diffusion LM: its published layout (class attributes) and how it maps onto ours.

    Subclasses set ``name``, ``title`` (the README's name), ``hub_names``, ``model_types`` /
    ``architectures`` (what its ``config.json`` publishes), ``target_type`` (the transformers
    ``model_type`` it is loaded as), ``tokenizer_class`` (a transformers class name: the published
    ``tokenizer_class`` may be the release's own code), and implement :meth:`conventions` and
    :meth:`mask_token`; :meth:`hf_config` and :meth:`rename` where the layout differs.
    """

    name = "release"
    release = True
    title = "release"
    hub_names: tuple = ()
    model_types: tuple = ()
    architectures: tuple = ()
    target_type = ""
    tokenizer_class = "PreTrainedTokenizerFast"
    embedding_key = "model.embed_tokens.weight"  # the input embedding's name in the standard class

    # --- recognising the folder -----------------------------------------------------------------
    def published_config(self, path: str) -> Optional[Dict[str, Any]]:
        """The folder's config.json; None for a folder written by ``dlm export`` (its own loader reads it)."""
        if not os.path.isdir(path) or is_exported_folder(path):
            return None
        return read_json(os.path.join(path, CONFIG_FILE))

    def matches(self, path: str) -> bool:
        config = self.published_config(path)
        if config is None:
            return False
        archs = config.get("architectures") or []
        return config.get("model_type") in self.model_types and (not self.architectures or any(
            arch in self.architectures for arch in archs)) and self.matches_layout(path, config)

    def matches_layout(self, path: str, config: Dict[str, Any]) -> bool:
        """Beyond the config (e.g. weight names, where the config is a plain AR model's)."""
        return True

    # --- the mapping onto our classes -------------------------------------------------------------
    def hf_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """The transformers config (``model_type`` included) of the published one."""
        out = {key: value for key, value in config.items() if key not in DROPPED_KEYS}
        out["model_type"] = self.target_type
        return out

    def rename(self, name: str) -> Optional[str]:
        """The standard class's name of a published weight (None: not a weight of the model)."""
        return name

    def conventions(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """The diffusion options the release was trained with (``shift``, ``attention``, ``block_size``...)."""
        raise NotImplementedError

    def mask_token(self, path: str, config: Dict[str, Any], tokenizer) -> int:
        """The mask id, checked against the tokenizer (:meth:`missing_mask` when it lacks it)."""
        raise NotImplementedError

    def eos_token_id(self, config: Dict[str, Any], tokenizer) -> Optional[int]:
        """The end-of-sequence id the release generates and pads with (the config's, else the tokenizer's)."""
        eos = config.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return int(eos) if isinstance(eos, int) else tokenizer.eos_token_id

    def mask_at_id(self, path: str, tokenizer, token: str, mask_id: int) -> int:
        """``mask_id`` (the id the release's config names), checked: the tokenizer holds ``token`` there."""
        if mask_id >= len(tokenizer) or tokenizer.convert_ids_to_tokens(mask_id) != token:
            raise self.missing_mask(path, token, mask_id)
        return mask_id

    def mask_by_token(self, path: str, tokenizer, token: str, usual_id: Optional[int] = None) -> int:
        """The id of ``token`` in the tokenizer's vocabulary (``usual_id``: where the release has it, for the error)."""
        mask_id = tokenizer.get_vocab().get(token)
        if mask_id is None:
            raise self.missing_mask(path, token, usual_id)
        return int(mask_id)

    def missing_mask(self, path: str, token: str, token_id: Optional[int] = None) -> DLMError:
        where = f" at id {token_id}" if token_id is not None else ""
        return DLMError(f"'{path}' is a {self.title} folder but its tokenizer lacks the mask token {token!r}{where}: "
                        f"download the release's tokenizer files again (tokenizer_config.json, "
                        f"special_tokens_map.json / added_tokens.json)")

    # --- reading ----------------------------------------------------------------------------------
    def load_tokenizer(self, path: str):
        """The tokenizer through a transformers class named here (never the folder's ``auto_map``):
        ``tokenizer.json`` where the release has one, else its vocabulary files."""
        import transformers

        name = "PreTrainedTokenizerFast" if os.path.isfile(os.path.join(path, "tokenizer.json")) else self.tokenizer_class
        cls = getattr(transformers, name)
        try:
            return cls.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 - missing or damaged files: one line
            raise DLMError(f"could not read the tokenizer of the {self.title} folder '{path}' ({first_line(err, 120)}): "
                           f"download the release's tokenizer files too") from None

    def tokenizer(self, path: str):
        """The release's tokenizer, its EOS the one the release generates and pads with."""
        config = self.published_config(path) or {}
        tokenizer = self.load_tokenizer(path)
        eos = self.eos_token_id(config, tokenizer)
        if eos is not None and tokenizer.eos_token_id != eos and eos < len(tokenizer):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        return tokenizer

    def state_dict(self, path: str) -> Dict[str, Any]:
        """The release's tensors under the standard class's names."""
        state = {}
        for key, value in read_weights(path, self.title).items():
            target = self.rename(key)
            if target is not None:
                state[target] = value
        return state

    def model_config(self, path: str, state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The transformers config of the folder (its vocabulary size the embedding's, where ``state`` is given:
        a release may have resized its embeddings for an added mask row without saying so)."""
        hf_config = self.hf_config(self.published_config(path) or {})
        rows = self.embedding_rows(path) if state is None else (
            int(state[self.embedding_key].shape[0]) if self.embedding_key in state else None)
        if rows is not None:
            hf_config["vocab_size"] = rows
        return hf_config

    def embedding_rows(self, path: str) -> Optional[int]:
        """The input embedding's rows, from the safetensors headers (no tensor read)."""
        published = {self.rename(name): name for name in weight_names(path)}
        name = published.get(self.embedding_key)
        if name is None:
            return None
        from safetensors import safe_open

        for file in weight_files(path):
            with safe_open(file, framework="pt") as handle:
                if name in handle.keys():
                    return int(handle.get_slice(name).get_shape()[0])
        return None

    def read(self, path: str, trust: bool) -> StoredModel:
        config = self.published_config(path) or {}
        tokenizer = self.tokenizer(path)
        mask_id = int(self.mask_token(path, config, tokenizer))
        state = self.state_dict(path)
        info = {"release": self.name, "eos_token_id": self.eos_token_id(config, tokenizer), "objective": "diffusion",
                "source_checkpoint": os.path.abspath(path)}
        return StoredModel(mask_id, False, diffusion=dict(self.conventions(config)), tokenizer=tokenizer, info=info,
                           backbone={"config": self.model_config(path, state)}, state=state)


RELEASES: List[ReleaseLoader] = []


def register_release(cls):
    """Class decorator: a release loader, tried before lightning_dlm's own formats."""
    from lightning_dlm.io.loaders import register_loader

    loader = cls()
    RELEASES.append(loader)
    register_loader(loader)
    return cls


def release_of(path: str) -> Optional[ReleaseLoader]:
    """The release loader that recognises the folder ``path``, or None."""
    return next((loader for loader in RELEASES if loader.matches(str(path))), None)


def is_release(path: str) -> bool:
    """Whether ``path`` is a released diffusion LM: a folder a release loader recognises, or one of
    the releases' hub names (cheap: no weights read, no network)."""
    return str(path) in {name for loader in RELEASES for name in loader.hub_names} or release_of(path) is not None
