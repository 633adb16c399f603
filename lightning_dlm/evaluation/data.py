"""Reading task files: local JSON lines / JSON / parquet, or hub datasets when online."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from lightning_dlm.core.errors import DLMError

HUB_PREFIX = "hf://"


def read_records(path: str, split: str = "validation", name: Optional[str] = None,
                 limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """The records of a task file (``.jsonl``, ``.json``, ``.parquet``) or of ``hf://<dataset>``.

    ``limit`` keeps the first records only (for quick runs).
    """
    return read_located(path, split, name, limit)[0]


def read_located(path: str, split: str = "validation", name: Optional[str] = None,
                 limit: Optional[int] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """:func:`read_records` and where each record is, for error messages, counted from 1:
    ``line N`` of a JSON-lines file (blank lines count), ``record N`` otherwise."""
    if path.startswith(HUB_PREFIX):
        rows = _hub(path[len(HUB_PREFIX):], split, name, limit)
        return rows, [f"record {n}" for n in range(1, len(rows) + 1)]
    if not os.path.isfile(path):
        raise DLMError(f"task file '{path}' does not exist: give a .jsonl, .json or .parquet file "
                       f"(or hf://<dataset> for a hub dataset)")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import datasets

        rows = datasets.Dataset.from_parquet(path).to_list()
    elif lower.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows, places = [], []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DLMError(f"line {n} of '{path}' is not JSON ({err.msg}): fix the file") from None
                    places.append(f"line {n}")
    elif lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise DLMError(f"'{path}' is not JSON ({err.msg}): fix the file") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DLMError(f"'{path}' holds no list of records: give a JSON list (or JSON lines)")
    else:
        raise DLMError(f"task file '{path}' has an unknown extension: use .jsonl, .json or .parquet")
    if not lower.endswith(".jsonl"):
        places = [f"record {n}" for n in range(1, len(rows) + 1)]
    if not all(isinstance(r, dict) for r in rows):
        raise DLMError(f"'{path}' has records that are not JSON objects: one object per record")
    return (rows[:limit], places[:limit]) if limit else (rows, places)


def _hub(dataset: str, split: str, name: Optional[str], limit: Optional[int]) -> List[Dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset, name, split=split, streaming=True)
    except Exception as err:  # offline, unknown dataset, unknown split: many types
        raise DLMError(f"could not open hub dataset '{dataset}' split '{split}' ({type(err).__name__}): "
                       f"check the name and the network, or download it to a .jsonl file") from None
    rows = []
    for row in ds:
        rows.append(dict(row))
        if limit and len(rows) >= limit:
            break
    return rows
