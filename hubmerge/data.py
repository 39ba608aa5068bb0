"""The recipe's ``data:``: unlabeled samples per task, for methods that learn from data (AdaMerging).

Every expert (task) gets its samples from a **source**: the ``data:`` section's default, or its own
entry under ``data.tasks`` (by expert label). A source is a Hub *dataset* repo (``repo``, optionally
at a ``revision``; pinned to the commit read) or a local ``path`` (a file, or a directory); ``files``
picks the files inside it, ``{task}`` standing for the expert's label (default ``{task}.*``). Every
matching file is read, in name order, and the rows concatenated:

* ``.safetensors`` — tensors named like the model's inputs (``pixel_values``, ``input_ids``,
  ``attention_mask``...), all with the same leading dimension (one row per sample). The demo
  suite's own splits have this form;
* ``.jsonl`` (one JSON object per line) or ``.json`` (a list of objects) — numbers and nested
  lists become tensors (sequences of unequal length are padded with 0 and get an
  ``attention_mask`` when they have none);
* ``.parquet`` — the same columns (needs ``pyarrow``).

A ``text`` column is tokenised with the base model's tokenizer (padding to the longest sample,
truncation at ``max_length``); ``label``/``labels`` columns are set aside (the data is used
unlabeled; evaluation code may read them). Image files are not decoded: give ``pixel_values``.
At most ``limit`` samples per task are kept: with ``seed`` set, a seeded permutation picks them
(the same samples on every run); with ``seed: null`` the first ones in file order.

Typical use::

    from hubmerge.data import load_task_data
    data = load_task_data(recipe.data, ["digit", "parity"], base_dir=base_directory)
    for batch in data["digit"].batches(16):
        model(**batch)
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_SUFFIXES", "TaskData", "load_task_data", "read_samples", "source_for"]

#: File types read, by suffix.
SUPPORTED_SUFFIXES = (".safetensors", ".jsonl", ".json", ".parquet")
#: Columns set aside as labels (the data is used unlabeled).
LABEL_COLUMNS = ("labels", "label")
#: Largest JSON/JSONL file read (bytes): samples for test-time adaptation are small.
MAX_TEXT_FILE_BYTES = 512 * 1024 * 1024


@dataclass
class TaskData:
    """One task's samples.

    Attributes:
        task: The expert's label.
        inputs: Model inputs, each with one row per sample (``pixel_values`` or ``input_ids``...).
        labels: The labels found in the files, if any (never used for learning).
        source: Where the samples came from (``datasets/org/name@<commit>:file`` or a local path).
    """

    task: str
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    source: str = ""
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the samples in batches (columns of all-padding trimmed).

        Args:
            batch_size: Samples per batch.
            generator: Shuffle with this generator (default: in order).

        Yields:
            Model-input mappings.
        """
        count = len(self)
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
        for start in range(0, count, batch_size):
            yield self.batch(order[start:start + batch_size])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at ``index`` as one batch, trimming columns that are padding in every sample."""
        batch = {k: v[index] for k, v in self.inputs.items()}
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] > 0:
            width = max(1, int(mask.sum(1).max()))
            batch = {k: (v[:, :width] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v)
                     for k, v in batch.items()}
        return batch


def source_for(spec, task: str):
    """The :class:`~hubmerge.recipe.DataSource` of ``task``: its ``data.tasks`` entry, else the default.

    An entry that gives only ``files`` reads those files from the default repo or path.

    Raises:
        DataError: Neither gives a repo or path.
    """
    source = spec.tasks.get(task)
    if source is not None and source.given:
        return source
    if spec.given:
        if source is not None and "files" in source.model_fields_set:  # the default repo/path, its own files
            return spec.model_copy(update={"files": source.files})
        return spec
    raise DataError(f"data: no source for task {task!r} (set data.repo/data.path or data.tasks.{task})")


def load_task_data(spec, tasks: list[str], *, base_dir: str | Path | None = None,
                   token: str | None = None) -> dict[str, TaskData]:
    """Read the samples of every task as a recipe's ``data:`` describes them.

    Args:
        spec: The recipe's :class:`~hubmerge.recipe.DataSpec`.
        tasks: The experts' labels, in recipe order.
        base_dir: The base model's directory (its tokenizer reads a ``text`` column).
        token: Hub token for private dataset repos (never logged).

    Returns:
        Task label to :class:`TaskData`, in the order of ``tasks``.

    Raises:
        DataError: No file matches, a file is unreadable or inconsistent, a ``text`` column
            without a tokenizer, no samples.
        HubError: The Hub cannot provide a dataset repo.
    """
    out: dict[str, TaskData] = {}
    for task in tasks:
        source = source_for(spec, task)
        files, where = _files_of(source, task, token=token)
        columns: dict[str, list[torch.Tensor]] = {}
        texts: list[str] = []
        for path in files:
            read = read_samples(path)
            text = read.pop("text", None)
            if text is not None:
                texts += list(text)
            for key, value in read.items():
                columns.setdefault(key, []).append(value)
        if texts:
            for key, value in _tokenise(texts, base_dir, spec.max_length, where).items():
                columns.setdefault(key, []).append(value)
        data = {k: _concat(v, k, where) for k, v in columns.items()}
        labels = None
        for name in LABEL_COLUMNS:
            if name in data:
                labels = data.pop(name)
                break
        for name in LABEL_COLUMNS:
            data.pop(name, None)
        _check_rows(data, where)
        count = next(iter(data.values())).shape[0] if data else 0
        if count == 0:
            raise DataError(f"{where}: no samples (only label columns, or empty files)")
        if spec.seed is not None:
            pick = torch.randperm(count, generator=torch.Generator().manual_seed(int(spec.seed)))[:spec.limit]
        else:
            pick = torch.arange(min(count, spec.limit))
        data = {k: v[pick] for k, v in data.items()}
        out[task] = TaskData(task, data, labels[pick] if labels is not None else None, where,
                             [Path(f).name for f in files])
        logger.info("data: %s: %d of %d samples from %s", task, len(pick), count, where)
    return out


# -- files --------------------------------------------------------------------------------------------------

def _files_of(source, task: str, *, token: str | None) -> tuple[list[Path], str]:
    """The local files of ``source`` for ``task`` (downloaded when a dataset repo) and a description."""
    pattern = source.files.replace("{task}", task)
    if source.repo is not None:
        from .hub import download_dataset

        directory, commit = download_dataset(source.repo, revision=source.revision, token=token,
                                             allow_patterns=[pattern])
        where = f"datasets/{source.repo}@{commit[:12]}:{pattern}"
        files = _match(directory, pattern)
        if not files:
            raise DataError(f"{where}: no file matches {pattern!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        return files, where
    path = Path(source.path).expanduser()
    where = f"{path}"
    if path.is_file():
        if _suffix(path) is None:
            raise DataError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        return [path], where
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    files = _match(path, pattern)
    where = f"{path}/{pattern}"
    if not files:
        raise DataError(f"{where}: no file matches (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return files, where


def _match(directory: Path, pattern: str) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and fnmatch.fnmatchcase(rel, pattern) and _suffix(path) is not None:
            found.append(path)
    return found


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def read_samples(path: str | Path) -> dict[str, Any]:
    """Read one data file into columns: tensors (one row per sample), or a list of strings for ``text``.

    Args:
        path: A ``.safetensors``, ``.jsonl``, ``.json`` or ``.parquet`` file.

    Returns:
        Column name to a tensor with one row per sample (``text``: a list of strings).

    Raises:
        DataError: Unsupported, unreadable or malformed file.
    """
    path = Path(path)
    suffix = _suffix(path)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if suffix in (".jsonl", ".json"):
            if path.stat().st_size > MAX_TEXT_FILE_BYTES:
                raise DataError(f"{path}: larger than {MAX_TEXT_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                loaded = json.loads(text)
                rows = loaded if isinstance(loaded, list) else _rows_of_columns(loaded, path)
            return _columns(rows, path)
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or give .jsonl "
                                "or .safetensors files") from None
            return _columns(pq.read_table(str(path)).to_pylist(), path)
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # safetensors raises its own errors too
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})"[:500]) from None
    except Exception as exc:  # noqa: BLE001 - safetensors_rust.SafetensorError and friends
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})"[:500]) from None
    raise DataError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _rows_of_columns(columns: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise DataError(f"{path}: a .json file holds a list of samples or a mapping of column lists")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise DataError(f"{path}: columns of different lengths {sorted(lengths)}")
    count = lengths.pop() if lengths else 0
    return [{k: v[i] for k, v in columns.items()} for i in range(count)]


def _columns(rows: list[Any], path: Path) -> dict[str, Any]:
    """Rows (mappings) to columns: ``text`` stays a list of strings, everything else becomes a tensor."""
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every sample must be a JSON object (column -> value)")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, Any] = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        if any(v is None for v in values):
            raise DataError(f"{path}: column {key!r} is missing in some samples")
        if key == "text":
            if not all(isinstance(v, str) for v in values):
                raise DataError(f"{path}: column 'text' must hold strings")
            out[key] = values
            continue
        if any(isinstance(v, str) for v in values):
            if key in LABEL_COLUMNS:
                continue  # class names: unused
            raise DataError(f"{path}: column {key!r} holds text; only `text` is tokenised (others must be numbers)")
        out[key] = _tensor(values, key, path)
    if "input_ids" in out and "attention_mask" not in out and isinstance(out["input_ids"], _Ragged):
        out["attention_mask"] = out["input_ids"].mask
    return {k: (v.tensor if isinstance(v, _Ragged) else v) for k, v in out.items()}


class _Ragged:
    """Sequences of unequal length, padded with 0, with their mask."""

    def __init__(self, tensor: torch.Tensor, mask: torch.Tensor):
        self.tensor, self.mask = tensor, mask


def _tensor(values: list[Any], key: str, path: Path):
    try:
        return torch.tensor(values)
    except (ValueError, TypeError):
        pass
    if all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in values):
        width = max((len(v) for v in values), default=0)
        dtype = torch.float32 if any(isinstance(x, float) for v in values for x in v) else torch.long
        tensor = torch.zeros(len(values), width, dtype=dtype)
        mask = torch.zeros(len(values), width, dtype=torch.long)
        for i, v in enumerate(values):
            tensor[i, :len(v)] = torch.tensor(v, dtype=dtype)
            mask[i, :len(v)] = 1
        return _Ragged(tensor, mask)
    raise DataError(f"{path}: column {key!r} is not numbers or (nested) lists of numbers of one shape")


def _tokenise(texts: list[str], base_dir: str | Path | None, max_length: int, where: str) -> dict[str, torch.Tensor]:
    if base_dir is None:
        raise DataError(f"{where}: a `text` column needs the base model's tokenizer (no base directory given)")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: a `text` column needs a tokenizer, and the base at {base_dir} has none "
                        f"({type(exc).__name__}); give input_ids instead") from None
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def _concat(parts: list[torch.Tensor], key: str, where: str) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if parts[0].dim() >= 2 and any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        if all(p.dim() == 2 for p in parts):  # token sequences of different widths: pad with 0
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        else:
            raise DataError(f"{where}: column {key!r} has shapes {[list(p.shape[1:]) for p in parts]} in different files")
    return torch.cat(parts)


def _check_rows(data: Mapping[str, torch.Tensor], where: str) -> None:
    rows = {k: (v.shape[0] if v.dim() else -1) for k, v in data.items()}
    if len(set(rows.values())) > 1:
        raise DataError(f"{where}: columns have different numbers of samples: {rows}")
    if any(v == -1 for v in rows.values()):
        raise DataError(f"{where}: a column is a scalar, not one value per sample")
