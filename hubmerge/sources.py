"""Model references -> local directories -> lazy tensor readers.

A reference resolves to a :class:`ResolvedModel` (a local directory, plus the Hub
repo and the commit hash it was pinned to). Experts are opened as :class:`Expert`
objects that produce task vectors one tensor at a time: a full fine-tune subtracts
the base; an adapter (a directory holding ``adapter_config.json``) expands its
low-rank factors, see :mod:`hubmerge.adapters`.

The engine splits the work of an expert in two: :meth:`Expert.fetch` does the I/O
(runs in a reader thread, returns CPU tensors) and :meth:`Expert.task_vector` does
the maths on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .errors import IncompatibleModelError, ModelReferenceError
from .recipe import ModelRef

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local.

    Attributes:
        ref: The reference as written in the recipe.
        directory: Local directory with its files.
        repo_id: Hub repo id, or ``None`` for a local directory.
        revision: The commit hash the reference was pinned to (Hub), else ``None``.
    """

    ref: ModelRef
    directory: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        """The reference's label (its ``name`` or repo/directory name)."""
        return self.ref.label

    @property
    def is_adapter(self) -> bool:
        """Whether the directory holds a PEFT adapter."""
        return (self.directory / ADAPTER_CONFIG).is_file()

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the input for lineage (card, resolved recipe)."""
        return {
            "name": self.label,
            "repo": self.repo_id,
            "path": None if self.repo_id else str(self.directory),
            "revision": self.revision,
            "kind": "adapter" if self.is_adapter else "full",
        }


def resolve(ref: ModelRef, *, token: str | None = None) -> ResolvedModel:
    """Make a model reference local.

    Args:
        ref: A local path or a Hub repo (optionally at a revision).
        token: Hub token for private repos (never logged).

    Returns:
        The :class:`ResolvedModel`; Hub references are pinned to a commit hash.

    Raises:
        ModelReferenceError: If the local directory is missing.
        HubError: If the Hub cannot provide the repo or revision.
    """
    if ref.path is not None:
        directory = Path(ref.path).expanduser()
        if not directory.is_dir():
            raise ModelReferenceError(f"model directory not found: {ref.path}")
        return ResolvedModel(ref, directory.resolve())
    from .hub import download_model

    directory, commit = download_model(ref.repo, revision=ref.revision, token=token)
    return ResolvedModel(ref, directory, repo_id=ref.repo, revision=commit)


class Expert:
    """An expert model that yields task vectors tensor by tensor.

    Subclasses implement :meth:`check`, :meth:`fetch` and :meth:`task_vector`.
    """

    def __init__(self, resolved: ResolvedModel):
        self.resolved = resolved
        self.label = resolved.label

    def check(self, base: Checkpoint) -> None:
        """Check that the expert fits the base, before any tensor data is read.

        Args:
            base: The base checkpoint (headers only).

        Raises:
            IncompatibleModelError: Naming the first tensor that does not fit.
        """
        raise NotImplementedError

    #: Whether :meth:`fetch` accepts ``rows`` (reads a block of rows of the task vector).
    supports_rows: bool = False

    def changes(self, name: str) -> bool:
        """Whether the expert may change tensor ``name`` (``False``: its task vector is zero).

        Args:
            name: A tensor name of the base.

        Returns:
            ``True`` unless the expert knows, without reading data, that it leaves ``name`` as is.
        """
        return True

    def fetch(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        """Read what :meth:`task_vector` needs for tensor ``name`` (CPU, stored dtype).

        Args:
            name: A tensor name of the base.
            rows: A block of rows to read (only when :attr:`supports_rows`).

        Returns:
            Opaque payload for :meth:`task_vector`, or ``None`` if the expert leaves
            this tensor unchanged.
        """
        raise NotImplementedError

    def task_vector(self, name: str, fetched: Any, base: torch.Tensor) -> torch.Tensor | None:
        """The task vector ``theta_expert - theta_base`` of tensor ``name``.

        Args:
            name: Tensor name.
            fetched: What :meth:`fetch` returned.
            base: The base weight in the compute dtype on the compute device.

        Returns:
            A tensor like ``base`` (same device and dtype), or ``None`` for zero.
        """
        raise NotImplementedError

    def read_weight_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> bool:
        """Read the expert's full weight for ``name`` straight into ``out`` if it can.

        The engine's fast path: the weights of all experts land in one stacked buffer,
        from which the base is then subtracted in place (no intermediate copies).

        Args:
            name: Tensor name.
            out: Contiguous CPU buffer in the compute dtype.
            rows: A block of rows, or ``None``.

        Returns:
            ``False`` if this expert cannot (adapters, another stored dtype).
        """
        return False

    def task_vector_into(self, name: str, fetched: Any, base: torch.Tensor, out: torch.Tensor) -> bool:
        """Write the task vector of ``name`` into ``out`` (same shape, device and dtype as ``base``).

        Args:
            name: Tensor name.
            fetched: What :meth:`fetch` returned.
            base: The base weight (or block of rows) in the compute dtype on the compute device.
            out: Where to write.

        Returns:
            ``False`` when the expert leaves the tensor unchanged (``out`` is then untouched).

        Raises:
            IncompatibleModelError: If the task vector's shape does not match the base's.
        """
        delta = self.task_vector(name, fetched, base) if fetched is not None else None
        if delta is None:
            return False
        if tuple(delta.shape) != tuple(base.shape):
            raise IncompatibleModelError(
                f"expert {self.label!r}: task vector of {name!r} has shape {list(delta.shape)}, "
                f"the base has {list(base.shape)}"
            )
        out.copy_(delta)
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this expert reads."""
        return 0

    def close(self) -> None:
        """Release file handles."""


class FullExpert(Expert):
    """A full fine-tune stored as safetensors: task vector = its weight - base weight."""

    def __init__(self, resolved: ResolvedModel):
        super().__init__(resolved)
        self.checkpoint = Checkpoint(resolved.directory)

    def check(self, base: Checkpoint) -> None:
        ours = self.checkpoint.meta
        for name, meta in base.meta.items():
            if name not in ours:
                raise IncompatibleModelError(f"expert {self.label!r} has no tensor {name!r} that the base has")
            if ours[name].shape != meta.shape:
                raise IncompatibleModelError(
                    f"expert {self.label!r}: tensor {name!r} has shape {list(ours[name].shape)}, "
                    f"the base has {list(meta.shape)}"
                )
            if ours[name].dtype.is_floating_point != meta.dtype.is_floating_point:
                raise IncompatibleModelError(
                    f"expert {self.label!r}: tensor {name!r} is {ours[name].dtype}, the base has {meta.dtype}"
                )
        extra = [n for n in ours if n not in base.meta]
        if extra:
            raise IncompatibleModelError(
                f"expert {self.label!r} has tensor {extra[0]!r} that the base lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )

    supports_rows = True

    def fetch(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.checkpoint.get(name, rows)

    def task_vector(self, name: str, fetched: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return fetched.to(device=base.device, dtype=base.dtype) - base

    def task_vector_into(self, name: str, fetched: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> bool:
        out.copy_(fetched, non_blocking=True)  # converts dtype/device without a temporary
        out.sub_(base)
        return True

    def read_weight_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> bool:
        if self.checkpoint.meta[name].dtype != out.dtype:
            return False
        self.checkpoint.read_into(name, out, rows)
        return True

    @property
    def nbytes(self) -> int:
        return self.checkpoint.nbytes

    def close(self) -> None:
        self.checkpoint.close()


def open_expert(resolved: ResolvedModel, base: Checkpoint) -> Expert:
    """Open an expert as a full fine-tune or, when it holds ``adapter_config.json``, an adapter.

    Args:
        resolved: The expert, made local.
        base: The base checkpoint (for adapters that need its shapes).

    Returns:
        An :class:`Expert`.

    Raises:
        ModelReferenceError, CheckpointError, AdapterError: If the expert cannot be read.
    """
    if resolved.is_adapter:
        from .adapters import open_adapter

        return open_adapter(resolved, base)
    return FullExpert(resolved)
