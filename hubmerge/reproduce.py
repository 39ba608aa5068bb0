"""Re-run a published merge from its repo id, and verify it against the published weights.

Every hubmerge output holds ``hubmerge_recipe.yaml`` (inputs pinned to commits, every parameter
explicit). :func:`rerun` fetches it at a pinned commit and runs it again locally;
:func:`verify` then compares the result with the repo's weights tensor by tensor — bit for bit,
and by the largest absolute difference where they differ — reading a block of rows at a time,
so memory stays bounded by a block, never a model.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import RecipeError

#: Elements compared at once (a block of rows of one tensor).
BLOCK_ELEMENTS = 1 << 22


@dataclass
class TensorCheck:
    """How one tensor of the published merge compares with the re-run.

    Attributes:
        name: Tensor name.
        status: ``exact`` (same bits), ``close`` (max |diff| within the tolerance), ``differs``,
            ``missing`` (published, not re-made), ``unexpected`` (re-made, not published),
            ``shape`` or ``dtype`` (the two disagree).
        max_abs_diff: Largest absolute difference (``0`` when exact, ``None`` when not comparable;
            ``inf`` when a NaN differs).
        detail: A short explanation for the non-numeric statuses.
    """

    name: str
    status: str
    max_abs_diff: float | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        repo_id: The published merge.
        commit: The commit verified.
        atol: The tolerance used (0: bit-exact only).
        tensors: One :class:`TensorCheck` per tensor, in the published storage order.
        output_dir: The re-run's directory when kept, else ``None``.
        published_with: The published recipe's provenance (hubmerge/torch versions).
    """

    repo_id: str
    commit: str
    atol: float
    tensors: list[TensorCheck] = field(default_factory=list)
    output_dir: Path | None = None
    published_with: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """Every tensor is bit-identical."""
        return all(t.status == "exact" for t in self.tensors)

    @property
    def ok(self) -> bool:
        """Every tensor is exact or within the tolerance."""
        return bool(self.tensors) and all(t.status in ("exact", "close") for t in self.tensors)

    @property
    def mismatches(self) -> list[TensorCheck]:
        """The tensors that are neither exact nor within the tolerance."""
        return [t for t in self.tensors if t.status not in ("exact", "close")]

    @property
    def max_abs_diff(self) -> float:
        """The largest difference over all compared tensors."""
        return max((t.max_abs_diff for t in self.tensors if t.max_abs_diff is not None), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``hubmerge verify --json``)."""
        return {
            "repo_id": self.repo_id, "commit": self.commit, "atol": self.atol, "exact": self.exact,
            "ok": self.ok, "max_abs_diff": self.max_abs_diff, "published_with": self.published_with,
            "output_dir": str(self.output_dir) if self.output_dir else None,
            "tensors": [t.__dict__ for t in self.tensors],
        }


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if a.dtype.is_complex:  # pragma: no cover - no complex weights in practice
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    diff = (a.to(torch.float64) - b.to(torch.float64)).abs_()
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max())


def compare_checkpoints(published: str | Path, rerun: str | Path, *, atol: float = 0.0,
                        block_elements: int = BLOCK_ELEMENTS) -> list[TensorCheck]:
    """Compare two safetensors checkpoints tensor by tensor, a block of rows at a time.

    Args:
        published: Directory of the reference weights.
        rerun: Directory of the weights to check.
        atol: Largest absolute difference still reported as ``close``.
        block_elements: Elements read from each side at once.

    Returns:
        One :class:`TensorCheck` per tensor (published order, then tensors only the re-run has).

    Raises:
        CheckpointError, ModelReferenceError: If either side cannot be read.
    """
    from .checkpoint import Checkpoint

    ref, new = Checkpoint(Path(published)), Checkpoint(Path(rerun))
    checks: list[TensorCheck] = []
    try:
        for name, meta in ref.meta.items():
            other = new.meta.get(name)
            if other is None:
                checks.append(TensorCheck(name, "missing", None, "in the published merge, not in the re-run"))
                continue
            if other.shape != meta.shape:
                detail = f"published {list(meta.shape)}, re-run {list(other.shape)}"
                checks.append(TensorCheck(name, "shape", None, detail))
                continue
            if other.dtype != meta.dtype:
                detail = f"published {meta.dtype}, re-run {other.dtype}"
                checks.append(TensorCheck(name, "dtype", None, detail))
                continue
            rows = meta.shape[0] if meta.shape else 0
            per_row = math.prod(meta.shape[1:]) if meta.shape else 1
            blocks = [None] if rows == 0 else [
                (start, min(rows, start + max(1, block_elements // max(1, per_row))))
                for start in range(0, rows, max(1, block_elements // max(1, per_row)))
            ]
            exact, worst = True, 0.0
            for block in blocks:
                a, b = ref.get(name, block), new.get(name, block)
                if not _same_bits(a, b):
                    exact = False
                    worst = max(worst, _max_abs_diff(a, b))
                del a, b
            if exact:
                checks.append(TensorCheck(name, "exact", 0.0))
            else:
                checks.append(TensorCheck(name, "close" if worst <= atol else "differs", worst))
        for name in new.meta:
            if name not in ref.meta:
                detail = "in the re-run, not in the published merge"
                checks.append(TensorCheck(name, "unexpected", None, detail))
    finally:
        ref.close()
        new.close()
    return checks


def rerun(repo: str, *, output: str | Path | None = None, device: str | None = None, token: str | None = None,
          overwrite: bool = False, progress: Callable | None = None):
    """Fetch a published merge's recipe and run it again locally.

    Args:
        repo: ``org/name``, ``org/name@rev`` or ``hub://org/name[@rev]``.
        output: Output directory (default: :func:`hubmerge.registry.rerun_dir`).
        device: Compute device (overrides the recipe's).
        token: Hub token.
        overwrite: Replace an output directory that hubmerge did not write.
        progress: Engine progress callback.

    Returns:
        The engine's ``MergeResult`` (its ``output_dir`` holds the re-made merge).

    Raises:
        HubError, RecipeError, HubmergeError: As :func:`hubmerge.registry.hub_recipe` and
            :func:`hubmerge.engine.merge`.
    """
    from .engine import merge
    from .registry import hub_recipe, parse_hub_ref, reproducible_recipe

    repo_id, revision = parse_hub_ref(repo)
    entry = hub_recipe(repo_id, revision, token=token)
    recipe = reproducible_recipe(entry, output=output)
    return merge(recipe, device=device, token=token, overwrite=overwrite, progress=progress, file=entry.file)


def verify(repo: str, *, atol: float = 0.0, output: str | Path | None = None, device: str | None = None,
           token: str | None = None, progress: Callable | None = None) -> VerifyReport:
    """Re-run a published merge and compare its tensors with the published ones.

    Args:
        repo: ``org/name``, ``org/name@rev`` or ``hub://org/name[@rev]``; the revision is
            resolved to a commit once, and both the recipe and the weights are read there.
        atol: Largest absolute difference still accepted (0: only bit-identical tensors pass).
        output: Keep the re-run in this directory (default: a temporary one, removed after).
        device: Compute device (overrides the recipe's).
        token: Hub token.
        progress: Engine progress callback.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether it matches.

    Raises:
        RecipeError: The repo's recipe cannot be re-run here (per-task deployments, local inputs).
        HubError, HubmergeError: As :func:`rerun`.
    """
    from .engine import merge
    from .hub import download_model
    from .registry import hub_recipe, parse_hub_ref, reproducible_recipe

    if atol < 0 or not math.isfinite(atol):
        raise RecipeError(f"the tolerance must be a finite number >= 0, got {atol}")
    repo_id, revision = parse_hub_ref(repo)
    entry = hub_recipe(repo_id, revision, token=token)
    if entry.document.get("flexmerge"):
        raise RecipeError("verify checks single-model merges; this one is a FlexMerge deployment",
                          field="flexmerge", file=entry.file)
    report = VerifyReport(repo_id, entry.version, atol,
                          published_with=dict(entry.document.get("provenance") or {}))
    with tempfile.TemporaryDirectory(prefix="hubmerge-verify-") as scratch:
        target = Path(output) if output is not None else Path(scratch) / "rerun"
        recipe = reproducible_recipe(entry, output=target)
        result = merge(recipe, device=device, token=token, progress=progress, file=entry.file)
        published, _ = download_model(repo_id, revision=entry.version, token=token)
        report.tensors = compare_checkpoints(published, result.output_dir, atol=atol)
        report.output_dir = Path(result.output_dir) if output is not None else None
    return report
