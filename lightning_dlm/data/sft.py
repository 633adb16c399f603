"""Supervised fine-tuning data: prompt/response pairs and chats in the paper's SFT layout.

Records (JSON Lines files, ``.json`` lists, or a hub dataset) are either
``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(rendered with the tokenizer's chat template; only assistant turns are targets).

Layout of one example (the paper's SFT layout): ``[BOS] prompt response EOS EOS ... EOS``:

* prompt tokens are never noised nor scored (``prompt_mask`` True there: the model's
  ``maskable_positions`` excludes them);
* the response, its EOS and the EOS padding after it are noised and scored, which is how the
  model learns where to stop; every position is a real token (the padding is attended), so the
  ELBO divides by the real target positions of each batch (response + EOS + padding);
* a batch is padded to its length bucket (the longest example rounded up to ``bucket_size``,
  at most ``seq_len``) or to ``seq_len`` (``padding: fixed``);
* an example longer than ``seq_len`` is cut from the response side (``too_long: cut``) or left
  out (``too_long: refuse``); both are counted and logged. A prompt that leaves no room for a
  target is refused with one line naming its record.

Batches are a pure function of (seed, rank, world size, batch counter): example order is a
permutation of the examples per epoch seeded by (seed, epoch), cut into global batches dealt
round-robin to the ranks. A resume starts at the consumed-batch counter (exact, O(1)).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lightning_dlm.core.errors import DLMError, first_line
from lightning_dlm.core.seeding import derive_seed

PADDINGS = ("bucket", "fixed")
TOO_LONG = ("cut", "refuse")


@dataclass
class SFTSource:
    """One SFT record set.

    Attributes:
        path: a local ``.jsonl`` / ``.json`` file, or a hub dataset name (then ``split`` / ``name``).
        split: hub split.
        name: hub configuration name.
        prompt_field, response_field, messages_field: the record's field names.
    """

    path: str
    split: str = "train"
    name: Optional[str] = None
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


@dataclass
class SFTExample:
    """A tokenized example: ``ids`` and, per token, whether it is a target (noised and scored)."""

    ids: List[int]
    targets: List[bool]
    where: str  # "file:line", for messages about it
    cut: bool = False


@dataclass
class SFTStats:
    """What encoding did to the records (logged once)."""

    examples: int = 0
    cut: int = 0
    refused: int = 0
    refused_where: List[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"sft data: {self.examples} examples, {self.cut} cut from the response side, {self.refused} refused as too long"
        if self.refused_where:
            text += f" (first: {', '.join(self.refused_where[:3])})"
        return text


def read_records(source: SFTSource) -> List[tuple[str, dict]]:
    """``[(where, record)]`` of a source: JSON Lines / JSON from disk, else a hub dataset."""
    path = os.path.expanduser(source.path)
    if os.path.isfile(path):
        return _read_local(path)
    if path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json")):
        raise DLMError(f"SFT data file '{source.path}' does not exist: give a .jsonl file or a hub dataset name")
    try:
        import datasets

        rows = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as err:  # noqa: BLE001 - offline, unknown name: one line
        first = first_line(err, 160)
        raise DLMError(f"could not load SFT dataset '{source.path}' ({first}): give a local .jsonl file or check the name") from None
    return [(f"{source.path}[{source.split}]:{i}", dict(row)) for i, row in enumerate(rows)]


def _read_local(path: str) -> List[tuple[str, dict]]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DLMError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}): fix the file") from None
        return [(f"{path}:{i + 1}", row) for i, row in enumerate(rows)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DLMError(f"{path}:{number}: not a JSON object ({err.msg}): fix that line") from None
        records.append((f"{path}:{number}", row))
    return records


def chat_segments(tokenizer, messages: Sequence[dict], where: str) -> List[tuple[str, bool]]:
    """``[(text, is_target)]`` of a chat rendered by the tokenizer's chat template: the content of
    each assistant turn with its end-of-turn text is a target, everything else (system, user turns,
    role headers) is not. Pieces are found by rendering growing prefixes of the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise DLMError(f"{where}: a 'messages' record needs a tokenizer with a chat template, and this tokenizer has none: "
                       f"use a chat model's tokenizer, or give prompt/response records")

    def render(turns, generation_prompt=False) -> str:
        if not turns:
            return ""
        return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=generation_prompt)

    segments: List[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DLMError(f"{where}: message {k} needs 'role' and 'content' fields")
        full = render(messages[: k + 1])
        if not full.startswith(done):
            raise DLMError(f"{where}: the chat template does not render the conversation turn by turn (turn {k}): "
                           f"give prompt/response records instead")
        if message["role"] == "assistant":
            header = render(messages[:k], generation_prompt=True)
            if not header.startswith(done) or not full.startswith(header):
                header = done
            segments.append((header[len(done):], False))
            segments.append((full[len(header):], True))
        else:
            segments.append((full[len(done):], False))
        done = full
    if not any(target and text for text, target in segments):
        raise DLMError(f"{where}: the conversation has no assistant turn to learn from: add one")
    return segments


class SFTEncoder:
    """Turns records into :class:`SFTExample` (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer with an EOS token.
        seq_len: the longest example.
        too_long: ``cut`` (from the response side) or ``refuse`` examples longer than ``seq_len``.
        template: ``plain`` renders prompt/response as ``[BOS] prompt response EOS``; ``chat``
            renders them as a user turn and an assistant turn with the chat template.
        add_bos: start plain examples with BOS (when the tokenizer has one).
    """

    def __init__(self, tokenizer, seq_len: int, too_long: str = "cut", template: str = "plain", add_bos: bool = True):
        if tokenizer.eos_token_id is None:
            raise DLMError("the tokenizer has no EOS token: SFT pads with EOS; give a tokenizer with eos_token")
        if too_long not in TOO_LONG:
            raise DLMError(f"unknown data.too_long '{too_long}': choose one of {', '.join(TOO_LONG)}")
        if template not in ("plain", "chat"):
            raise DLMError(f"unknown data.template '{template}': choose plain or chat")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.too_long = too_long
        self.template = template
        self.add_bos = add_bos
        self.eos = int(tokenizer.eos_token_id)

    def _ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def segments(self, record: Any, where: str, source: SFTSource) -> List[tuple[List[int], bool]]:
        """``[(ids, is_target)]`` of one record, with one-line errors naming the record and field."""
        if not isinstance(record, dict):
            raise DLMError(f"{where}: a record must be a JSON object with '{source.prompt_field}' and "
                           f"'{source.response_field}', or '{source.messages_field}'")
        if source.messages_field in record:
            messages = record[source.messages_field]
            if not isinstance(messages, list) or not messages:
                raise DLMError(f"{where}: field '{source.messages_field}' must be a non-empty list of messages")
            return [(self._ids(text), target) for text, target in chat_segments(self.tokenizer, messages, where)]
        for name in (source.prompt_field, source.response_field):
            if name not in record:
                raise DLMError(f"{where}: the record has no '{name}' field (it needs '{source.prompt_field}' and "
                               f"'{source.response_field}', or '{source.messages_field}')")
            if not isinstance(record[name], str):
                raise DLMError(f"{where}: field '{name}' must be a string")
        prompt, response = record[source.prompt_field], record[source.response_field]
        if self.template == "chat":
            if not getattr(self.tokenizer, "chat_template", None):  # the records are fine: the option is not
                raise DLMError(f"{where}: data.template chat renders prompt/response records with the tokenizer's chat "
                               f"template, and this tokenizer has none: set data.template: plain (or use a chat "
                               f"model's tokenizer)")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return [(self._ids(text), target) for text, target in chat_segments(self.tokenizer, messages, where)]
        bos = self.tokenizer.bos_token_id
        start = [int(bos)] if self.add_bos and bos is not None else []
        return [(start + self._ids(prompt), False), (self._ids(response) + [self.eos], True)]

    def encode(self, record: Any, where: str, source: SFTSource) -> Optional[SFTExample]:
        """The example of one record, or None when it is refused as too long."""
        ids: List[int] = []
        targets: List[bool] = []
        for piece, target in self.segments(record, where, source):
            ids += piece
            targets += [target] * len(piece)
        first_target = targets.index(True) if True in targets else len(ids)
        if first_target >= self.seq_len:
            raise DLMError(f"{where}: the prompt is {first_target} tokens, which leaves no room for the response in "
                           f"data.seq_len {self.seq_len}: raise data.seq_len or shorten the prompt")
        if len(ids) <= self.seq_len:
            return SFTExample(ids, targets, where)
        if self.too_long == "refuse":
            return None
        return SFTExample(ids[: self.seq_len], targets[: self.seq_len], where, cut=True)

    def encode_all(self, sources: Sequence[SFTSource]) -> tuple[List[SFTExample], SFTStats]:
        stats = SFTStats()
        examples: List[SFTExample] = []
        for source in sources:
            for where, record in read_records(source):
                example = self.encode(record, where, source)
                if example is None:
                    stats.refused += 1
                    stats.refused_where.append(where)
                    continue
                stats.cut += int(example.cut)
                examples.append(example)
        stats.examples = len(examples)
        if not examples:
            raise DLMError("the SFT data holds no usable example (all refused as too long or empty): "
                           "raise data.seq_len or set data.too_long: cut")
        return examples, stats


def padded_length(lengths: Sequence[int], seq_len: int, padding: str, bucket_size: int) -> int:
    """The length a batch is padded to: ``seq_len`` (fixed) or the longest example rounded up to
    a multiple of ``bucket_size``, at most ``seq_len`` (bucket)."""
    if padding == "fixed":
        return seq_len
    longest = max(lengths)
    return min(seq_len, -(-longest // bucket_size) * bucket_size)


def collate_sft(examples: Sequence[SFTExample], eos_id: int, length: int) -> dict:
    """``dict(input_ids, prompt_mask)`` (B, length): EOS padding, which is a target; prompt_mask
    True where the token is never noised nor scored."""
    ids = torch.full((len(examples), length), int(eos_id), dtype=torch.long)
    prompt = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids, dtype=torch.long)
        prompt[row, :n] = ~torch.tensor(example.targets, dtype=torch.bool)
    return {"input_ids": ids, "prompt_mask": prompt}


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch (the same on every rank and worker)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 11))
    return torch.randperm(num_examples, generator=generator)


class SFTBatchStream(IterableDataset):
    """Infinite training batches of one rank; batch ``n`` is a pure function of the settings and ``n``.

    Global batch ``g = n * world_size + rank`` holds the examples at positions ``[g*B, (g+1)*B)`` of
    the endless sequence of shuffled epochs. With DataLoader workers, worker ``w`` serves counters
    ``start + w + i * W`` (the DataLoader asks its workers round-robin).
    """

    def __init__(self, examples: Sequence[SFTExample], eos_id: int, seq_len: int, batch_size: int, padding: str = "bucket",
                 bucket_size: int = 64, seed: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        self.examples = list(examples)
        self.eos_id = eos_id
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.padding = padding
        self.bucket_size = bucket_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self._orders: dict[int, torch.Tensor] = {}

    def _example(self, position: int) -> SFTExample:
        epoch, offset = divmod(position, len(self.examples))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.examples), self.seed, epoch)}
        return self.examples[int(self._orders[epoch][offset])]

    def batch(self, counter: int) -> dict:
        """Batch ``counter`` of this rank."""
        first = (counter * self.world_size + self.rank) * self.batch_size
        chosen = [self._example(first + k) for k in range(self.batch_size)]
        length = padded_length([len(e.ids) for e in chosen], self.seq_len, self.padding, self.bucket_size)
        batch = collate_sft(chosen, self.eos_id, length)
        batch["index"] = torch.tensor(counter, dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = self.start_batch + worker
        while True:
            yield self.batch(counter)
            counter += workers


def eval_batches(examples: Sequence[SFTExample], eos_id: int, seq_len: int, batch_size: int, padding: str,
                 bucket_size: int) -> List[dict]:
    """Fixed evaluation batches, in order."""
    out = []
    for start in range(0, len(examples), batch_size):
        chosen = examples[start:start + batch_size]
        length = padded_length([len(e.ids) for e in chosen], seq_len, padding, bucket_size)
        out.append(collate_sft(chosen, eos_id, length))
    return out
