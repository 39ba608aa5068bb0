"""Repo metadata the Hub derives from a commit's files: card data, tags, config, safetensors.

``model_info`` / ``list_models`` answers carry ``cardData`` (the README's YAML header),
``tags`` (card tags plus ``license:``, ``dataset:``, ``base_model:``, library, pipeline,
``safetensors`` and the config's ``model_type``, as the Hub adds them), ``config`` (the
``architectures``/``model_type`` of ``config.json``) and ``safetensors`` (parameter counts
per dtype read from the safetensors headers). All of it is computed from stored blobs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import yaml

from .storage import Commit, RepoStore

logger = logging.getLogger(__name__)

_FRONT_MATTER_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_MAX_JSON_FILE = 4 * 1024 * 1024
_MAX_SAFETENSORS_HEADER = 25_000_000
#: Card metadata is small: refuse alias blow-ups ("billion laughs") and deep nesting.
_MAX_YAML_ALIASES = 64
_MAX_YAML_DEPTH = 32
_MAX_COUNT = 2**63 - 1


class _CardLoader(yaml.SafeLoader):
    """A safe YAML loader with bounded aliases and nesting (the card comes from any client)."""

    aliases = 0
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > _MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {_MAX_YAML_ALIASES} YAML aliases")
        self.depth += 1
        try:
            if self.depth > _MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {_MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _json_safe(value: Any) -> Any:
    """The YAML value as JSON: keys as strings, dates and other scalars as text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_COUNT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


@dataclass(frozen=True)
class RepoSummary:
    """What the Hub reports about one commit of a repo beyond its file list."""

    card_data: dict | None
    tags: list[str]
    library_name: str | None
    pipeline_tag: str | None
    config: dict | None
    safetensors: dict | None


def parse_card_metadata(text: str) -> dict | None:
    """Parse the YAML header of a README.

    Args:
        text: The README's content.

    Returns:
        The metadata dict (JSON-safe), or ``None`` without a header.

    Raises:
        ValueError: If the header is not valid YAML or not a mapping.
    """
    match = _FRONT_MATTER_RE.search(text)
    if match is None:
        return None
    try:
        data = yaml.load(match.group(2), Loader=_CardLoader)  # a SafeLoader subclass
    except Exception as exc:  # noqa: BLE001 - YAMLError, and ValueError/IndexError... from bad scalars
        raise ValueError(f"Invalid YAML in the model card metadata: {exc}"[:1000]) from None
    if data is None:
        return None
    if isinstance(data, dict):
        return _json_safe(data)
    raise ValueError("The model card metadata must be a YAML mapping.")


def validate_card(content: str) -> tuple[list[dict], list[dict]]:
    """Validate a README as ``/api/validate-yaml`` does.

    Returns:
        ``(errors, warnings)``: lists of ``{"message": ...}``.
    """
    try:
        metadata = parse_card_metadata(content)
    except ValueError as exc:
        return [{"message": str(exc)}], []
    if not metadata:
        return [], [{"message": "empty or missing yaml metadata in repo card"}]
    return [], []


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value if item is not None]
    return [str(value)]


def _read_json_file(store: RepoStore, commit: Commit, path: str) -> dict | None:
    entry = commit.tree.get(path)
    if entry is None or entry.size > _MAX_JSON_FILE:
        return None
    try:
        data = json.loads(store.read_blob(entry.sha256))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _safetensors_counts(store: RepoStore, sha256: str) -> dict[str, int] | None:
    """Parameters per dtype in one safetensors file, from its header only."""
    try:
        with open(store.blob_path(sha256), "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_SAFETENSORS_HEADER:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        dtype, shape = info.get("dtype"), info.get("shape")
        if not (isinstance(dtype, str) and isinstance(shape, list) and len(shape) <= 64
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_COUNT for d in shape)):
            return None  # not a header the Hub would count: no parameter counts
        counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
        if counts[dtype] > _MAX_COUNT:
            return None
    return counts


def _safetensors_files(store: RepoStore, commit: Commit) -> list[str]:
    """The weight files the Hub counts: the index's shards, else ``model``/adapter, else all at root."""
    index = _read_json_file(store, commit, "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):
        return sorted({f for f in index["weight_map"].values() if isinstance(f, str) and f in commit.tree})
    for single in ("model.safetensors", "adapter_model.safetensors"):
        if single in commit.tree:
            return [single]
    return sorted(p for p in commit.tree if "/" not in p and p.endswith(".safetensors"))


def summarize(store: RepoStore, repo_type: str, commit: Commit) -> RepoSummary:
    """Compute the metadata the Hub shows for ``commit``.

    Args:
        store: Where the blobs are.
        repo_type: ``model`` or ``dataset``.
        commit: The commit to describe.

    Returns:
        A :class:`RepoSummary`.
    """
    card: dict | None = None
    readme = commit.tree.get("README.md")
    if readme is not None and readme.size <= _MAX_JSON_FILE:
        try:
            card = parse_card_metadata(store.read_blob(readme.sha256).decode("utf-8", errors="replace"))
        except ValueError:
            logger.debug("Ignoring invalid card metadata in commit %s", commit.id)
    card = card or None
    meta = card or {}
    tags: list[str] = list(_as_list(meta.get("tags")))
    library_name = meta.get("library_name") if isinstance(meta.get("library_name"), str) else None
    pipeline_tag = meta.get("pipeline_tag") if isinstance(meta.get("pipeline_tag"), str) else None
    config = None
    safetensors = None
    if repo_type == "model":
        raw_config = _read_json_file(store, commit, "config.json")
        if raw_config is not None:
            config = {k: raw_config[k] for k in ("architectures", "model_type") if k in raw_config} or None
        if library_name is None:
            if "adapter_config.json" in commit.tree:
                library_name = "peft"
            elif config is not None:
                library_name = "transformers"
        files = _safetensors_files(store, commit)
        if files:
            total: dict[str, int] = {}
            for path in files:
                counts = _safetensors_counts(store, commit.tree[path].sha256)
                if counts is None:
                    total = {}
                    break
                for dtype, count in counts.items():
                    total[dtype] = total.get(dtype, 0) + count
            if total:
                safetensors = {"parameters": total, "total": sum(total.values())}
            tags.append("safetensors")
        if config and isinstance(config.get("model_type"), str):
            tags.append(config["model_type"])
    for prefix, key in (("license:", "license"), ("dataset:", "datasets"), ("base_model:", "base_model")):
        tags.extend(prefix + value for value in _as_list(meta.get(key)))
    tags.extend(_as_list(meta.get("language")))
    if library_name:
        tags.insert(0, library_name)
    if pipeline_tag:
        tags.append(pipeline_tag)
    return RepoSummary(
        card_data=card,
        tags=list(dict.fromkeys(tags)),
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        config=config,
        safetensors=safetensors,
    )
