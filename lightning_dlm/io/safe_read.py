"""Reading lightning_dlm models with clear errors: a ``.ckpt`` file written by ``dlm fit``, a sharded
checkpoint folder (FSDP ``state_dict_type: sharded``), or a folder written by ``dlm export``.

A sharded folder is Lightning's layout: ``torch.distributed.checkpoint`` files (``.metadata`` and one
``__<rank>_<n>.distcp`` file per rank) holding ``{"model": state_dict, "optimizer_<i>": ...}``, plus
``meta.pt``, the rest of the checkpoint (hyper-parameters, lightning_dlm's metadata). It is
consolidated in one process on the CPU; only the model's tensors are read, not the optimizer's.

Loading runs no code from the files: every checkpoint file is read with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only), a sharded folder's index with an unpickler that
knows only torch.distributed.checkpoint's record types, and file names stored in a checkpoint are
checked before anything is written. ``trust=True`` (``--trust_checkpoint``), for files whose author
you trust, unpickles them in full, loudly: :func:`_torch_load` is the one place that can.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import sys
import zipfile
from typing import Any, Dict, Iterable

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.io.format import CHECKPOINT_KEY, DCP_METADATA, EXPORT_CONFIG, SHARDED_META

# Wrapper modules that add a component to every parameter name: torch.compile (``_orig_mod``, also on
# submodules), FSDP and activation checkpointing (anywhere in the name), DDP / DataParallel and
# Fabric (at the front).
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING_WRAPPERS = frozenset({"module", "_forward_module"})


def strip_wrapper_prefixes(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The state dict with the names the unwrapped module uses (``net.model....``)."""
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        parts = [part for part in key.split(".") if part not in _WRAPPER_PARTS]
        while len(parts) > 1 and parts[0] in _LEADING_WRAPPERS:
            parts = parts[1:]
        name = ".".join(parts)
        if name in out:
            raise DLMError(f"the checkpoint holds '{name}' twice once wrapper prefixes are removed: it mixes wrapped and unwrapped weights")
        out[name] = value
    return out


def is_exported_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, EXPORT_CONFIG))


def is_sharded_checkpoint(path: str) -> bool:
    """A folder in Lightning's sharded-checkpoint layout (complete or not)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in (SHARDED_META, DCP_METADATA))


def is_diffusion_checkpoint(path: str) -> bool:
    """Whether ``path`` is a lightning_dlm diffusion model: a ``.ckpt`` or sharded folder written by
    ``dlm fit``, or a folder written by ``dlm export``. Cheap: no weights are read, and nothing is
    unpickled (the pickle's opcodes are only scanned for lightning_dlm's metadata key). Never raises."""
    try:
        if is_exported_folder(path):
            return True
        if os.path.isdir(path):
            meta_path = os.path.join(path, SHARDED_META)
            return os.path.isfile(meta_path) and _looks_like_diffusion_file(meta_path)
        if os.path.isfile(path):
            return _looks_like_diffusion_file(path)
    except Exception:  # unreadable or foreign files are simply not diffusion checkpoints
        return False
    return False


def _has_diffusion_meta(checkpoint, key: str) -> bool:
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict) and "backbone" in checkpoint[key]


def _looks_like_diffusion_file(path: str) -> bool:
    """A torch.save zip file whose pickle names lightning_dlm's metadata key and ``backbone``: read
    with pickletools, which parses opcodes and builds no object (the loader checks the real structure)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
        if not names:
            return False
        data = archive.read(names[0])
    strings = {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name)}
    return CHECKPOINT_KEY in strings and "backbone" in strings


# --- reading files without running their code --------------------------------------------------------
TRUST_HINT = "if you trust whoever wrote it, rerun with --trust_checkpoint (trust_checkpoint=True in Python) to unpickle it in full"
#: the fix of a refused file where there is no --trust_checkpoint (dlm fit --ckpt_path, dlm validate / test)
NO_TRUST_HINT = ("dlm fit, validate and test read only tensors and plain data from a checkpoint (they have no "
                 "--trust_checkpoint): give a checkpoint written by dlm fit")

# Types beyond torch.load(weights_only=True)'s defaults (tensors, dtypes, numbers, strings, lists,
# tuples, dicts, OrderedDict, ...) that checkpoints of `dlm fit` hold: none. The hyper-parameters and
# lightning_dlm's metadata are plain dicts (dataclasses.asdict), Lightning's own entries (loops,
# callbacks, optimizer, LambdaLR and data-module states) dicts of numbers, strings and tensors; tests
# check it with torch.serialization.get_unsafe_globals_in_checkpoint. Add a type here only if
# constructing it and setting its fields runs no code of the file's choosing.
SAFE_GLOBALS: tuple = ()

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-zip torch.save file


def _torch_load(source, *, trust: bool, mmap: bool = False):
    """The one call of ``torch.load`` in lightning_dlm (on the CPU). ``trust``: unpickle in full,
    which runs whatever code the file names; otherwise only tensors and plain data are built."""
    import torch

    if trust:
        return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)


def warn_trusted(path: str) -> None:
    print(f"warning: --trust_checkpoint: unpickling '{path}' in full: code in the file can run", file=sys.stderr, flush=True)


def check_plain_names(names: Iterable[Any], what: str, source: str) -> None:
    """File names stored in a checkpoint must be plain names (joined to a folder, they stay in it)."""
    for name in names:
        bad = None
        if not isinstance(name, str) or not name:
            bad = "not a non-empty string"
        elif "\0" in name:
            bad = "it holds a NUL character"
        elif name in (".", ".."):
            bad = "it names a folder"
        elif os.path.isabs(name) or "/" in name or "\\" in name or (os.altsep and os.altsep in name):
            bad = "it is a path, not a plain file name"
        if bad:
            raise DLMError(f"{what} {name!r} in {source} is refused ({bad}): the checkpoint is damaged or crafted; nothing was written")


def _torch_file_kind(path: str, what: str) -> str:
    """``zip`` (torch.save's format, memory-mappable) or ``legacy`` (pre-1.6 torch.save), judged from
    the bytes without unpickling; anything else is refused."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        raise DLMError(f"{what} '{path}' is empty: copy it again from the training run")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise DLMError(f"{what} '{path}' is damaged or truncated (its zip index is unreadable): "
                           f"copy it again from the training run") from None
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise DLMError(f"'{path}' is a zip file but not a PyTorch checkpoint (no data.pkl): pass a .ckpt written by `dlm fit`")
        return "zip"
    try:  # a pre-zip torch.save file starts with a pickle of its magic number, and nothing else
        ops = []
        for op, arg, _ in pickletools.genops(io.BytesIO(head)):
            ops.append((op.name, arg))
            if op.name == "STOP":
                break
        values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
        if values == [_TORCH_LEGACY_MAGIC] and ops[-1][0] == "STOP":
            return "legacy"
    except Exception:  # noqa: BLE001 - not a pickle at all
        pass
    raise DLMError(f"'{path}' is not a PyTorch checkpoint (not written by torch.save): pass a .ckpt written by `dlm fit`")


def load_checkpoint_file(path: str, trust: bool = False, what: str = "checkpoint", hint: str = TRUST_HINT) -> Any:
    """The object in a file written by ``torch.save``, tensors memory-mapped. Only tensors and plain
    data are built unless ``trust``; whatever else the file pickles is refused with a one-line
    :class:`DLMError` (ending with ``hint``, the fix), as are missing, empty, truncated and foreign files."""
    if not os.path.exists(path):
        raise DLMError(f"{what} '{path}' does not exist: give the path of a .ckpt (or sharded checkpoint folder) written by `dlm fit`")
    if not os.path.isfile(path):
        raise DLMError(f"{what} '{path}' is not a file: give a .ckpt written by `dlm fit`")
    kind = _torch_file_kind(path, what)
    if trust:
        warn_trusted(path)
    try:
        # mmap: the tensors stay on disk until used, so reading a checkpoint's metadata costs little
        return _torch_load(path, trust=trust, mmap=kind == "zip")
    except DLMError:
        raise
    except pickle.UnpicklingError as err:
        if not trust:
            raise _unsafe_error(path, str(err), what, hint) from None
        raise _damaged_error(path, err, what) from None
    except Exception as err:  # noqa: BLE001 - corrupt files raise many types
        raise _damaged_error(path, err, what) from None


def refusal_of(path: str, err: BaseException, what: str = "checkpoint", hint: str = TRUST_HINT):
    """The one-line refusal of a file that ``torch.load(weights_only=True)`` stopped at an object that
    is not a tensor or plain data (unpickling it could run code), or None when ``err`` is anything
    else (a damaged or truncated file)."""
    text = str(err)
    named = "GLOBAL" in text or ("WeightsUnpickler error" in text and "Unsupported operand" not in text)
    if not isinstance(err, pickle.UnpicklingError) or not named:
        return None
    return _unsafe_error(path, str(err), what, hint)


def _unsafe_error(path: str, text: str, what: str, hint: str = TRUST_HINT) -> DLMError:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found is None and "Unsupported operand" in text:  # not a valid pickle: damaged, not dangerous
        return DLMError(f"could not read {what} '{path}' (its pickle is damaged): copy it again from the training run")
    if found is not None:
        holds = f"it references {found.group(1)}"
    else:
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        holds = f"it holds an object that is not a tensor or plain data ({detail[0][:160] if detail else 'unknown'})"
    return DLMError(f"refusing to load {what} '{path}': {holds}, and unpickling it could run code in the file; {hint}")


def _damaged_error(path: str, err: BaseException, what: str) -> DLMError:
    first = first_line(err, 160, default="")
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return DLMError(f"could not read {what} '{path}' ({detail}): the file is damaged or truncated; copy it again from the training run")


# --- reading checkpoints ----------------------------------------------------------------------------
def require_exists(path: str) -> None:
    if not os.path.exists(path):
        raise DLMError(f"checkpoint '{path}' does not exist: give the path of a .ckpt (or sharded checkpoint folder) written by `dlm fit`")


def read_checkpoint(path: str, trust: bool = False) -> Dict[str, Any]:
    """A ``dlm fit`` checkpoint as one dict: ``state_dict`` (consolidated, wrapper prefixes removed),
    ``hyper_parameters``, the lightning_dlm metadata and the rest. Tensors of a ``.ckpt`` file are
    memory-mapped. ``trust``: unpickle the files in full (see :func:`load_checkpoint_file`)."""
    require_exists(path)
    if is_exported_folder(path):
        raise DLMError(f"'{path}' is a folder written by `dlm export`, not a training checkpoint: "
                       f"load it with DiffusionModel.from_pretrained")
    if os.path.isdir(path):
        checkpoint = _read_sharded(path, trust)
    else:
        checkpoint = load_checkpoint_file(path, trust)
    if not _has_diffusion_meta(checkpoint, CHECKPOINT_KEY) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DLMError(f"'{path}' is not a lightning_dlm diffusion checkpoint: pass a .ckpt written by `dlm fit`")
    meta = checkpoint[CHECKPOINT_KEY]
    files = meta.get("tokenizer_files") or {}
    if not isinstance(files, dict):
        raise DLMError(f"the tokenizer files of '{path}' are not a {{name: content}} mapping: the checkpoint is damaged")
    check_plain_names(files, "tokenizer file name", f"checkpoint '{path}'")
    backbone = meta["backbone"]
    if not trust and isinstance(backbone, dict) and backbone.get("trust_remote_code"):
        raise DLMError(f"refusing to load checkpoint '{path}': its model needs trust_remote_code, which runs code "
                       f"that the checkpoint names; {TRUST_HINT}")
    checkpoint["state_dict"] = strip_wrapper_prefixes(checkpoint["state_dict"])
    return checkpoint


def _read_sharded(path: str, trust: bool = False) -> Dict[str, Any]:
    if not is_sharded_checkpoint(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            raise _not_diffusion_folder(path)
        raise DLMError(
            f"'{path}' is a folder but not a checkpoint: give a .ckpt file, a sharded checkpoint folder "
            f"(with {DCP_METADATA} and {SHARDED_META}) or a folder written by `dlm export`"
        )
    for name, what in ((DCP_METADATA, "the torch.distributed.checkpoint index"), (SHARDED_META, "Lightning's checkpoint metadata")):
        if not os.path.isfile(os.path.join(path, name)):
            raise DLMError(
                f"sharded checkpoint '{path}' is missing {name} ({what}): copy the whole folder that `dlm fit` wrote"
            )
    if trust:
        warn_trusted(path)
    reader = _dcp_reader(path, trust)
    try:
        metadata = reader.read_metadata()
    except DLMError:
        raise
    except Exception as err:
        raise DLMError(f"could not read {DCP_METADATA} of sharded checkpoint '{path}' ({type(err).__name__}): "
                       f"the folder is damaged") from None
    _check_shards(path, metadata)
    checkpoint = _load_quietly(os.path.join(path, SHARDED_META), trust, what=f"the {SHARDED_META} of sharded checkpoint")
    if not isinstance(checkpoint, dict):
        raise DLMError(f"'{path}' is not a lightning_dlm diffusion checkpoint: its {SHARDED_META} holds no checkpoint dict")
    checkpoint["state_dict"] = _consolidate_model(reader, path, trust)
    return checkpoint


def _load_quietly(path: str, trust: bool, what: str) -> Any:
    """:func:`load_checkpoint_file` for a file inside a folder whose trust was announced already."""
    if not os.path.isfile(path):
        raise DLMError(f"{what} '{path}' does not exist: copy the whole folder that `dlm fit` wrote")
    kind = _torch_file_kind(path, what)
    try:
        return _torch_load(path, trust=trust, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        raise (_damaged_error(path, err, what) if trust else _unsafe_error(path, str(err), what)) from None
    except Exception as err:  # noqa: BLE001
        raise _damaged_error(path, err, what) from None


# --- torch.distributed.checkpoint's index, read without running code -------------------------------
_DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided & co. by name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Builds only torch.distributed.checkpoint's plain record types (dataclasses and enums), torch
    dtypes, layouts and memory formats: the index (``.metadata``) of a sharded checkpoint is a plain
    pickle, which torch itself reads with ``pickle.load``."""

    def find_class(self, module: str, name: str):
        import torch

        if name in _DCP_RECORDS.get(module, ()):
            return super().find_class(module, name)
        value = vars(torch).get(name) if module == "torch" else None  # no attribute hooks, no lazy imports
        if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
            return value
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not a record of torch.distributed.checkpoint")


def _dcp_reader(path: str, trust: bool):
    """A ``FileSystemReader`` whose index is read by :class:`_IndexUnpickler` unless ``trust``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if trust:
                return super().read_metadata(*args, **kwargs)
            rank = kwargs.get("rank")  # torch falls back to per-rank index files
            index = os.path.join(path, DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}")
            try:
                with open(index, "rb") as fh:
                    metadata = _IndexUnpickler(fh).load()
            except pickle.UnpicklingError as err:
                if "GLOBAL" in str(err):
                    raise _unsafe_error(index, str(err), f"the {DCP_METADATA} of sharded checkpoint") from None
                raise
            if not isinstance(metadata, Metadata):
                raise DLMError(f"the {DCP_METADATA} of sharded checkpoint '{path}' is not a torch.distributed.checkpoint "
                               f"index: the folder is damaged")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(path)


def _check_shards(path: str, metadata) -> None:
    """Every shard file the index names must exist and be long enough: name the ones that are not."""
    needed: Dict[str, int] = {}
    storage = getattr(metadata, "storage_data", None)
    try:
        for info in (storage or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    except (AttributeError, TypeError, ValueError):
        raise DLMError(f"the {DCP_METADATA} of sharded checkpoint '{path}' does not describe its shard files: "
                       f"the folder is damaged") from None
    check_plain_names(needed, "shard file name", f"the index of sharded checkpoint '{path}'")  # the shards lie in the folder
    missing = sorted(name for name in needed if not os.path.isfile(os.path.join(path, name)))
    if missing:
        raise DLMError(
            f"sharded checkpoint '{path}' is missing {len(missing)} of its {len(needed)} shard files "
            f"({', '.join(missing)}): copy every file of the folder that `dlm fit` wrote (one per rank)"
        )
    short = sorted(name for name, end in needed.items() if os.path.getsize(os.path.join(path, name)) < end)
    if short:
        raise DLMError(f"shard files of '{path}' are truncated ({', '.join(short)}): copy them again from the training run")


def _set_path(root: Dict[str, Any], path, value: Any) -> Dict[str, Any]:
    """Put ``value`` at ``path`` (a torch.distributed.checkpoint object path: keys and list indices)
    inside the nested containers of ``root``, creating them as needed; returns ``root``."""
    node: Any = root
    for here, after in zip(path[:-1], path[1:]):
        empty = [] if isinstance(after, int) else {}
        if isinstance(node, list):
            node.extend([None] * (here + 1 - len(node)))
            node[here] = empty if node[here] is None else node[here]
        else:
            node.setdefault(here, empty)
        node = node[here]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value
    return root


#: where a sharded folder keeps the model's weights: Lightning's FSDPStrategy (FSDP1) writes ``model``,
#: its ModelParallelStrategy (FSDP2, lightning_dlm.training.fsdp2) ``state_dict``
MODEL_ENTRIES = ("model", "state_dict")


def _consolidate_model(reader, path: str, trust: bool = False) -> Dict[str, Any]:
    """The full (unsharded) model state dict, read in this one process on the CPU.

    torch.distributed.checkpoint's public ``load`` (``no_dist``: this process alone) into CPU
    tensors allocated from the index, for the model's entry only (:data:`MODEL_ENTRIES`): the optimizer states, twice the
    model's size for AdamW, are never read (what torch's ``format_utils.dcp_to_torch_save`` does
    for the whole checkpoint). The index's flattened keys are loaded as they are and nested again
    from its ``planner_data``. Tensors are read by torch with ``weights_only=True``; non-tensor
    entries (pickled bytes, which torch's planner would unpickle in full) go through
    :func:`_torch_load` too.
    """
    import warnings

    import torch
    from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, TensorStorageMetadata, load

    refused: list = []
    loaded: Dict[str, Any] = {}  # the non-tensor entries, as read

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded[fqn] = _torch_load(value, trust=trust)
            except pickle.UnpicklingError as err:
                if not trust:
                    refused.append(_unsafe_error(f"{path}:{fqn}", str(err), "the entry of sharded checkpoint"))
                raise

    try:
        metadata = reader.read_metadata()
        planner_data = getattr(metadata, "planner_data", None) or {}
        where: Dict[str, tuple] = {}  # flattened key -> its path in the saved state ("model", name)
        flat: Dict[str, Any] = {}
        for key, info in metadata.state_dict_metadata.items():
            at = tuple(planner_data.get(key) or (key,))
            if at[0] not in MODEL_ENTRIES:
                continue
            where[key] = at
            flat[key] = torch.empty(info.size, dtype=info.properties.dtype) if isinstance(info, TensorStorageMetadata) else None
        with warnings.catch_warnings():  # one process on purpose: torch's note that it assumes so is noise here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            load(flat, storage_reader=reader, planner=Planner(flatten_state_dict=False), no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        if refused:
            raise refused[0] from None
        first = first_line(err, default="")
        raise DLMError(f"could not consolidate sharded checkpoint '{path}' ({type(err).__name__}: {first[:200]}): "
                       f"the folder is damaged") from None
    state: Dict[str, Any] = {}
    for key, at in where.items():
        _set_path(state, at, loaded.get(key, flat[key]))
    model = next((state[entry] for entry in MODEL_ENTRIES if entry in state), None)
    if not isinstance(model, dict) or not model:
        raise DLMError(f"sharded checkpoint '{path}' holds no model weights (no 'model' entry): was it written by `dlm fit`?")
    return model


# --- exported folders -------------------------------------------------------------------------------
def read_export_config(path: str) -> Dict[str, Any]:
    """The ``diffusion_config.json`` of a folder written by ``dlm export``."""
    file = os.path.join(path, EXPORT_CONFIG)
    try:
        with open(file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise DLMError(f"could not read '{file}' ({type(err).__name__}): export the checkpoint again with `dlm export`") from None
    missing = [key for key in ("mask_token_id", "shift", "schedule") if key not in config]
    if not isinstance(config, dict) or missing:
        raise DLMError(f"'{file}' lacks {', '.join(missing) or 'a JSON object'}: export the checkpoint again with `dlm export`")
    return config


def _not_diffusion_folder(path: str) -> DLMError:
    return DLMError(
        f"'{path}' is not a diffusion model (a Hugging Face folder without {EXPORT_CONFIG}, and none of the released "
        f"diffusion LMs lightning_dlm reads: DiffuGPT, DiffuLLaMA, Dream, LLaDA, Fast-dLLM v2, Tiny-A2D): export a "
        f"lightning_dlm checkpoint with `dlm export`, or download a release in full (config.json, weights, tokenizer "
        f"files); for an AR model use transformers' AutoModelForCausalLM.from_pretrained"
    )
