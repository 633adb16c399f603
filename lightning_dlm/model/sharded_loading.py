"""Pretrained weights into an FSDP2-sharded model, each rank reading only its own shards.

Loading a 7B model the plain way makes every rank read the full float32 weights into memory
before they are sharded (about 27 GB a rank, 216 GB on an 8-GPU node). Here instead:

1. every rank builds the architecture with its **parameters on the meta device** (no memory) and
   its buffers real (``accelerate.init_empty_weights(include_buffers=False)``: non-persistent
   buffers such as the rotary ``inv_freq`` are computed from the config, not stored in weights);
2. ``fully_shard`` turns each parameter into a DTensor (still on the meta device), and
   :func:`materialize_empty` gives every rank empty storage for its own shards only;
3. :func:`read_local_shards` fills each rank's shards from the Hugging Face safetensors files,
   reading with ``safetensors.safe_open(...).get_slice`` the rows (in general: the block) that the
   DTensor's own chunk list (``__create_chunk_list__``, the protocol torch.distributed.checkpoint
   plans its reads with) says this rank holds. A rank therefore holds its shards plus one slice
   in flight, never a full copy (tested on 2 CPU processes in tests/test_fsdp2.py).

torch's ``HuggingFaceStorageReader`` (torch.distributed.checkpoint) reads the same files through
DCP, but it needs the model's shapes to equal the file's; an added mask token makes the embedding
one row longer than the file, so that row is computed here: :func:`fill_mask_rows` writes the mean
of the file's rows (plus the configured noise) as ``add_mask_token`` does on an unsharded model,
from per-rank partial sums all-reduced over the shard groups.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.model.config import BackboneConfig
from lightning_dlm.model.loading import DTYPES, resolve_hf_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


def loads_pretrained_weights(cfg: BackboneConfig) -> bool:
    """Whether ``cfg`` loads pretrained weights (rather than building a random model)."""
    return cfg.pretrained is not None and not cfg.from_scratch


def build_empty_causal_lm(cfg: BackboneConfig) -> PreTrainedModel:
    """The causal LM of ``cfg`` with every parameter on the meta device and real buffers."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise DLMError("loading weights into a sharded model needs accelerate: pip install accelerate") from None
    config = resolve_hf_config(cfg)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    return model


@torch.no_grad()
def materialize_empty(module: nn.Module, device: torch.device) -> None:
    """Empty storage on ``device`` for the meta parameters and buffers of ``module`` (for a sharded
    model: this rank's shards only). Buffers that are already real (the rotary ``inv_freq``,
    computed from the config) keep their values; ``nn.Module.to_empty`` alone would wipe them."""
    kept = {name: buffer.detach().clone() for name, buffer in module.named_buffers() if not buffer.is_meta}
    module.to_empty(device=device)
    for name, buffer in module.named_buffers():
        if name in kept:
            buffer.copy_(kept[name])


# --- the safetensors files, read a block of rows at a time ------------------------------------
#: safetensors dtype names (the format's header: https://github.com/huggingface/safetensors, "Format")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


class SafetensorsFile:
    """One ``.safetensors`` file, whose rows are read with plain file reads into memory of ours.

    The format is an 8-byte little-endian header length, a JSON header (``{name: {dtype, shape,
    data_offsets}}``) and the tensors' bytes, row-major. A block of rows of a tensor is therefore
    one contiguous byte range, read with ``readinto`` straight into the destination. (safetensors'
    own ``safe_open`` maps the whole file: the pages a rank touches count in its resident memory,
    and the kernel's read-around maps more than the rows asked for.)
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as err:
            raise DLMError(f"cannot read the safetensors header of '{path}' ({first_line(err)}): the file is damaged "
                           f"or not safetensors; download the weights again") from None
        header.pop("__metadata__", None)
        self.header: Dict[str, dict] = header
        self.data_start = 8 + size

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read_rows(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``key`` (all of a 0-d tensor), in the file's dtype,
        into ``out`` when it is a contiguous tensor of that dtype and shape."""
        entry = self.header[key]
        dtype, shape = ST_DTYPES.get(entry["dtype"]), tuple(entry["shape"])
        if dtype is None:
            raise DLMError(f"weight {key} of '{self.path}' has dtype {entry['dtype']}, which a sharded load does not "
                           f"read: convert the weights to float32, bfloat16 or float16")
        inner = shape[1:] if shape else ()
        rows = (stop - start,) if shape else ()
        row_bytes = torch.Size(inner).numel() * torch.empty((), dtype=dtype).element_size()
        if out is None or out.dtype != dtype or not out.is_contiguous() or tuple(out.shape) != rows + inner:
            out = torch.empty(rows + inner, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self.data_start + entry["data_offsets"][0] + (start * row_bytes if shape else 0))
            done = 0
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise DLMError(f"'{self.path}' ends inside weight {key}: the file is truncated; download it again")
                done += got
        return out


def weight_files(pretrained: str) -> Dict[str, str]:
    """``{weight name: safetensors file}`` of a pretrained folder or hub name (its index, or the
    single ``model.safetensors``)."""
    folder = os.path.expanduser(pretrained)
    if not os.path.isdir(folder):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id=pretrained, allow_patterns=["*.safetensors", "*.json"])
        except Exception as err:  # noqa: BLE001 - any hub failure is the same one line
            raise DLMError(f"could not fetch the weights of '{pretrained}' ({first_line(err)}): check the name and "
                           f"your network access, or give a local folder") from None
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map") or {}
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.isfile(single):
        return {name: single for name in SafetensorsFile(single).header}
    raise DLMError(f"'{pretrained}' has no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}), which a "
                   f"sharded load reads shard by shard: save the model with save_pretrained(safe_serialization=True)")


# --- which block of a tensor this rank holds ---------------------------------------------------
def local_block(tensor: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...], Tuple[int, ...]]:
    """(this rank's local tensor, its offsets, its sizes) in the global tensor: a DTensor's own
    chunk (one per rank: FSDP2's ``Shard(0)``, or replicated), or a plain tensor whole."""
    chunks = getattr(tensor, "__create_chunk_list__", None)
    if chunks is None:
        return tensor, (0,) * tensor.dim(), tuple(tensor.shape)
    (chunk,) = chunks()
    return tensor.to_local(), tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)


def _state_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of what a state dict of ``model`` holds, shared (tied) tensors once (under the
    first name: the input embedding of a tied LM head)."""
    seen = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def _file_key(name: str, files: Dict[str, str], prefix: str) -> Optional[str]:
    """The file's name for the model's tensor ``name`` (some files leave out the base-model prefix:
    GPT-2's ``h.0.attn...`` for ``transformer.h.0.attn...``)."""
    if name in files:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in files:
        return name[len(prefix) + 1:]
    return None


@torch.no_grad()
def read_local_shards(model: PreTrainedModel, pretrained: str, growable: Iterable[str] = ()) -> Dict[str, int]:
    """Fill this rank's block of every parameter and persistent buffer of ``model`` (sharded by
    ``fully_shard``, materialised by :func:`materialize_empty`) from the safetensors of ``pretrained``.

    A tensor named in ``growable`` may have more rows than the file's (an embedding grown by an added
    mask token): it gets the file's rows and zeros after them (:func:`fill_mask_rows` writes the mask
    row). Returns ``{name: rows in the file}`` of those grown tensors. Missing weights are one line.
    """
    files = weight_files(pretrained)
    growable = set(growable)
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan: List[Tuple[str, str, torch.Tensor]] = []
    missing = []
    for name, tensor in _state_tensors(model):
        key = _file_key(name, files, prefix)
        if key is None:
            missing.append(name)
        else:
            plan.append((name, key, tensor))
    if missing:
        raise DLMError(f"the safetensors of '{pretrained}' lack {len(missing)} weight(s) of {type(model).__name__}, "
                       f"e.g. {missing[0]}: it is not the model the config describes; fix model.backbone.pretrained")
    grown: Dict[str, int] = {}
    opened: Dict[str, SafetensorsFile] = {}
    for name, key, tensor in plan:
        path = files[key]
        stored = opened.setdefault(path, SafetensorsFile(path))
        shape, full = stored.shape(key), tuple(tensor.shape)
        if len(shape) != len(full) or shape[1:] != full[1:] or (shape and shape[0] > full[0]) or (
                shape and shape[0] < full[0] and name not in growable):
            raise DLMError(f"weight {name} is {list(shape)} in '{pretrained}' but {list(full)} in the model: "
                           f"fix model.backbone.pretrained or the backbone config")
        if shape and shape[0] < full[0]:
            grown[name] = shape[0]
        local, offsets, sizes = local_block(tensor)
        if not shape:  # a 0-d tensor
            local.copy_(stored.read_rows(key, 0, 0))
            continue
        if tuple(offsets[1:]) != (0,) * (len(full) - 1) or tuple(sizes[1:]) != full[1:]:
            raise DLMError(f"weight {name} is sharded along a dimension other than its rows, which the sharded load "
                           f"does not read: shard parameters by rows (fully_shard's default)")
        start, stop = offsets[0], offsets[0] + sizes[0]
        if local.numel() == 0:
            continue
        have = max(0, min(stop, shape[0]) - start)
        if have:
            target = local[:have]
            block = stored.read_rows(key, start, start + have, out=target)
            if block is not target:
                target.copy_(block)
        if stop > shape[0]:
            local[have:].zero_()
    return grown


def _shard_groups(tensor: torch.Tensor) -> list:
    """The process groups over which ``tensor``'s rows are split (none for a plain tensor)."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return []
    mesh = tensor.device_mesh
    return [mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard()]


@torch.no_grad()
def _row_mean(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean of rows ``[0, rows)`` of a (possibly row-sharded) tensor, on every rank."""
    import torch.distributed as dist

    local, offsets, sizes = local_block(tensor)
    start = offsets[0] if offsets else 0
    stop = min(start + (sizes[0] if sizes else 0), rows)
    total = local.new_zeros(tensor.shape[1:], dtype=torch.float32)
    if stop > start:
        total += local[: stop - start].float().sum(dim=0)
    for group in _shard_groups(tensor):
        dist.all_reduce(total, group=group)
    return total / rows


@torch.no_grad()
def _write_row(tensor: torch.Tensor, row: int, value: torch.Tensor) -> None:
    local, offsets, sizes = local_block(tensor)
    start = offsets[0] if offsets else 0
    if start <= row < start + (sizes[0] if sizes else 0):
        local[row - start] = value.to(local.dtype)


@torch.no_grad()
def fill_mask_rows(model: PreTrainedModel, mask_id: int, rows: int, noise_std: float, seed: int) -> None:
    """The added mask token's rows in a sharded model, as ``add_mask_token`` writes them unsharded:
    the input embedding's row ``mask_id`` is the mean of its rows ``[0, rows)`` plus noise of
    ``noise_std`` (a generator seeded by ``seed``); an untied output embedding's row is its mean
    row, its bias the mean bias."""
    generator = torch.Generator().manual_seed(seed)
    embedding = model.get_input_embeddings().weight
    mean = _row_mean(embedding, rows)
    if noise_std > 0:
        mean = mean + noise_std * torch.randn(mean.shape, generator=generator).to(mean.device)
    _write_row(embedding, mask_id, mean)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        _write_row(output.weight, mask_id, _row_mean(output.weight, rows))
        if getattr(output, "bias", None) is not None:
            _write_row(output.bias, mask_id, _row_mean(output.bias, rows))


def _name_of(model: nn.Module, tensor: torch.Tensor) -> Optional[str]:
    return next((name for name, t in _state_tensors(model) if t is tensor), None)


@torch.no_grad()
def read_pretrained_shards(model: PreTrainedModel, cfg: BackboneConfig, mask_id: int, mask_added: bool,
                           seed: int = 0) -> None:
    """This rank's shards of ``cfg.pretrained`` into the sharded, materialised ``model``, and the
    rows of an added mask token as an unsharded load writes them (``mask_id``, seeded by ``seed``)."""
    if not mask_added:
        read_local_shards(model, cfg.pretrained)
        return
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    growable = [_name_of(model, embedding)]
    if output is not None and output.weight is not embedding:
        growable += [_name_of(model, output.weight)] + ([_name_of(model, output.bias)] if getattr(output, "bias", None) is not None else [])
    grown = read_local_shards(model, cfg.pretrained, growable=[name for name in growable if name])
    old_rows = grown.get(growable[0], embedding.shape[0])
    fill_mask_rows(model, mask_id, min(old_rows, mask_id), cfg.mask_token.init_noise_std, seed)
