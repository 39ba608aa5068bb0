"""Writing merges back as PEFT LoRA adapters.

Two ways, both ending in an ``adapter_config.json`` written by PEFT's ``LoraConfig`` and an
``adapter_model.safetensors`` with PEFT's key names, loadable with
``PeftModel.from_pretrained(base_model, directory)``:

* :func:`stack_loras` — exact. A linear combination ``sum_i c_i tau_i`` of LoRA experts is
  itself a LoRA of rank ``sum_i r_i``: stack the ``A_i`` and the ``c_i * scaling_i * B_i``.
  ``c_i`` comes from the method (:func:`linear_coefficients`).
* :func:`low_rank_adapter` — approximate. Any merged task vector of a linear, ``Conv1D`` or
  embedding weight is truncated to its best rank-``r`` approximation (SVD), with the relative
  Frobenius error ``||Δ - Δ_r|| / ||Δ||`` reported per module. Stream with
  :class:`LoraAdapterWriter` to keep only the factors in memory.

Every written module gets ``lora_alpha = r`` (scaling 1); modules whose rank differs from the
most common one get ``rank_pattern``/``alpha_pattern`` entries that match exactly their name.

Modules are written under the names PEFT finds them by on the installed transformers: its
in-memory names, which for some architectures differ from the checkpoint's (ViT in
transformers 5: ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``);
see :func:`~hubmerge.adapters.modules.base_aliases`.
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterError
from ..writer import ShardedWriter, TensorSpec
from .config import CONFIG_FILE
from .lora import LoraBiasUpdate, LoraExpert
from .modules import PEFT_PREFIX, NameAliases

#: Layer classes a LoRA factor pair can be written for, and the layout of their weight.
LAYER_TYPES = ("Linear", "Conv1D", "Embedding")


@dataclass
class LoraFactors:
    """One module's factors in PEFT's layout: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``.

    For an embedding ``A`` is ``(r, num_embeddings)`` and ``B`` ``(dim, r)``; for ``Conv1D``
    ``in``/``out`` are those of the layer (its weight is stored ``(in, out)``).
    """

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    layer_type: str

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return self.lora_A.shape[0]


def peft_delta_layout(delta: torch.Tensor, layer_type: str) -> torch.Tensor:
    """The matrix ``B @ A`` must equal for PEFT to add ``delta`` to a layer of ``layer_type``.

    Linear: ``delta`` itself (``(out, in)``). ``Conv1D`` and embeddings store the transpose
    of PEFT's ``B @ A`` (``fan_in_fan_out``; ``Embedding.get_delta_weight``).
    """
    if layer_type not in LAYER_TYPES:
        raise AdapterError(f"not supported yet: a LoRA adapter for a {layer_type} layer")
    return delta if layer_type == "Linear" else delta.T


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``B @ A`` of ``matrix`` (Eckart–Young), singular values split evenly.

    Args:
        matrix: 2-D, any float dtype (computed in float32, float64 stays float64).
        rank: Wanted rank; capped at ``min(matrix.shape)``.

    Returns:
        ``(A, B)`` with ``A`` ``(k, n)`` and ``B`` ``(m, k)``, ``k = min(rank, m, n)``.
    """
    work = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(work), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root


@dataclass
class LoraAdapterWriter:
    """Collects LoRA factors module by module and writes one PEFT LoRA adapter directory.

    Only the factors stay in memory. The directory is written atomically by
    :class:`~hubmerge.writer.ShardedWriter` (stem ``adapter_model``) when :meth:`finish` is called.
    Module names are written as given: give transformers' in-memory names
    (:meth:`~hubmerge.adapters.modules.NameAliases.memory_module`), which PEFT looks for.

    Attributes:
        target: The output directory.
        dtype: Dtype of the written tensors.
        overwrite: Replace an existing directory that hubmerge did not write.
        errors: Relative Frobenius error of each module added by :meth:`add_delta`.
    """

    target: Path
    dtype: torch.dtype = torch.float32
    overwrite: bool = False
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    files: dict[str, bytes | str | Path] = field(default_factory=dict)

    def add_factors(
        self, module: str, lora_A: torch.Tensor, lora_B: torch.Tensor, layer_type: str = "Linear"
    ) -> None:
        """Add exact factors for ``module`` (PEFT's layout, scaling 1).

        Raises:
            AdapterError: If the module is already present or the factors do not multiply.
        """
        if module in self.factors or module in self.saved:
            raise AdapterError(f"module {module!r} added twice to the adapter")
        peft_delta_layout(torch.empty(0, 0), layer_type)  # checks the layer type
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise AdapterError(
                f"module {module!r}: factors {list(lora_A.shape)} and {list(lora_B.shape)} do not multiply"
            )
        self.factors[module] = LoraFactors(
            module,
            lora_A.detach().to("cpu", self.dtype).contiguous(),
            lora_B.detach().to("cpu", self.dtype).contiguous(),
            layer_type,
        )

    def add_delta(self, module: str, delta: torch.Tensor, rank: int, layer_type: str = "Linear") -> float:
        """Add the best rank-``rank`` approximation of a weight's task vector.

        Args:
            module: The module's in-memory name in the base (``encoder.layer.0.attention.self.query``).
            delta: The merged task vector of its weight, shaped like the weight.
            rank: Wanted rank (capped at the smaller dimension: exact there).
            layer_type: ``Linear``, ``Conv1D`` or ``Embedding``
                (see :func:`~hubmerge.adapters.modules.base_layer_types`).

        Returns:
            The relative Frobenius error ``||Δ - Δ_r|| / ||Δ||`` of the written factors (0 for Δ = 0,
            which writes nothing).
        """
        if delta.ndim != 2:
            raise AdapterError(f"module {module!r}: a {delta.ndim}-D task vector cannot be a LoRA")
        if rank < 1:
            raise AdapterError(f"rank must be at least 1, got {rank}")
        matrix = peft_delta_layout(delta, layer_type)
        work = torch.float64 if delta.dtype == torch.float64 else torch.float32
        matrix = matrix.to(work)
        norm = torch.linalg.matrix_norm(matrix).item()
        if norm == 0.0:
            self.errors[module] = 0.0
            return 0.0
        lora_A, lora_B = truncated_svd(matrix, rank)
        self.add_factors(module, lora_A, lora_B, layer_type)
        stored = self.factors[module]
        approx = stored.lora_B.to(matrix.device, work) @ stored.lora_A.to(matrix.device, work)
        error = torch.linalg.matrix_norm(matrix - approx).item() / norm
        self.errors[module] = error
        return error

    def add_module_to_save(self, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Save every parameter of ``module`` whole (PEFT's ``modules_to_save``), e.g. a changed LayerNorm.

        Args:
            module: The module's in-memory name in the base.
            tensors: Its parameters' new values by in-memory parameter name (``weight``, ``bias``),
                all of them.
        """
        if module in self.factors or module in self.saved:
            raise AdapterError(f"module {module!r} added twice to the adapter")
        self.saved[module] = {k: v.detach().to("cpu", self.dtype).contiguous() for k, v in tensors.items()}

    def add_file(self, relative: str, content: bytes | str | Path) -> None:
        """Add another file to the output directory (a README, the recipe...)."""
        self.files[relative] = content

    def config(self, *, base_model_name_or_path: str | None = None, revision: str | None = None):
        """The ``peft.LoraConfig`` describing the collected modules."""
        from peft import LoraConfig

        if not self.factors:
            raise AdapterError("the adapter would be empty: no module has a non-zero task vector")
        ranks = {m: f.rank for m, f in self.factors.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
        return LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=sorted(self.factors),
            rank_pattern=pattern,
            alpha_pattern=dict(pattern),
            fan_in_fan_out=any(f.layer_type == "Conv1D" for f in self.factors.values()),
            modules_to_save=sorted(self.saved) or None,
            init_lora_weights=True,
            inference_mode=True,
            base_model_name_or_path=base_model_name_or_path,
            revision=revision,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's key names."""
        out: dict[str, torch.Tensor] = {}
        for module, f in sorted(self.factors.items()):
            if f.layer_type == "Embedding":
                out[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = f.lora_A
                out[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = f.lora_B
            else:
                out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = f.lora_A
                out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = f.lora_B
        for module, tensors in sorted(self.saved.items()):
            for param, tensor in sorted(tensors.items()):
                out[f"{PEFT_PREFIX}{module}.{param}"] = tensor
        return out

    def finish(self, *, base_model_name_or_path: str | None = None, revision: str | None = None) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the extra files, atomically.

        Args:
            base_model_name_or_path: Recorded in the config (the base's repo id or path).
            revision: The base's pinned revision, recorded in the config.

        Returns:
            The output directory.

        Raises:
            AdapterError: If nothing was added.
            OutputExistsError: If the target exists and is not hubmerge's (without ``overwrite``).
        """
        config = self.config(base_model_name_or_path=base_model_name_or_path, revision=revision)
        tensors = self.state_dict()
        specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
        writer = ShardedWriter(
            Path(self.target), specs, shard_size=sys.maxsize, overwrite=self.overwrite, stem="adapter_model"
        )
        try:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            with tempfile.TemporaryDirectory() as tmp:
                config.save_pretrained(tmp)
                writer.add_file(CONFIG_FILE, Path(tmp) / CONFIG_FILE)
                for relative, content in self.files.items():
                    writer.add_file(relative, content)
                return writer.finish()
        except BaseException:
            writer.abort()
            raise


def stack_loras(
    experts: Sequence[LoraExpert],
    coefficients: Sequence[float],
    target: str | Path,
    *,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
) -> Path:
    """Write ``sum_i c_i tau_i`` of LoRA experts as one exactly equivalent LoRA adapter.

    For each module, ``A = [A_1; A_2; ...]`` and ``B = [c_1 s_1 B_1, c_2 s_2 B_2, ...]`` with
    ``s_i`` the expert's scaling there (rsLoRA and patterns included), so that
    ``B @ A = sum_i c_i s_i B_i @ A_i``; the rank is the sum of the experts' ranks at that module.
    Modules are named as transformers names them in memory (the experts' ``aliases``), whatever
    naming the experts themselves used.

    Args:
        experts: LoRA experts checked against the same base (:meth:`LoraExpert.check`).
        coefficients: ``c_i``, one per expert (see :func:`linear_coefficients`).
        target: Output directory.
        overwrite: Replace an existing directory that hubmerge did not write.
        base_model_name_or_path, revision: Recorded in ``adapter_config.json``.

    Returns:
        The output directory.

    Raises:
        AdapterError: For a DoRA adapter (not linear in its factors), an adapter with
            ``lora_bias`` or saved full tensors (``modules_to_save``, ``bias``), a count mismatch,
            or a base weight transformers does not load as a tensor of its own (fused experts).
    """
    if len(experts) != len(coefficients) or not experts:
        raise AdapterError(f"{len(coefficients)} coefficients for {len(experts)} adapters")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, str]]] = {}
    for expert, c in zip(experts, coefficients, strict=True):
        if not isinstance(expert, LoraExpert) or expert.use_dora:
            kind = getattr(expert, "kind", type(expert).__name__)
            raise AdapterError(
                f"expert {expert.label!r} is {kind}, not a plain LoRA; stacking would not be exact "
                "(write a low-rank adapter instead)"
            )
        for name, plan in expert.plan.items():
            if plan.replace is not None or isinstance(plan.update, LoraBiasUpdate):
                raise AdapterError(
                    f"expert {expert.label!r} changes {name!r} outside its LoRA factors "
                    "(modules_to_save, bias or "
                    "lora_bias); stacking cannot carry that (write a low-rank adapter instead)"
                )
            update = plan.update
            layer_type = (
                "Embedding" if update.embedding else ("Conv1D" if update.fan_in_fan_out else "Linear")
            )
            lora_A = expert.weights.get(update.keys["lora_A"]).float()
            lora_B = expert.weights.get(update.keys["lora_B"]).float() * (float(c) * update.scaling)
            module = _memory_module(name, expert.aliases, f"expert {expert.label!r}")
            parts.setdefault(module, []).append((lora_A, lora_B, layer_type))
    writer = LoraAdapterWriter(Path(target), overwrite=overwrite)
    for module, pieces in parts.items():
        types = {t for _, _, t in pieces}
        if len(types) > 1:
            raise AdapterError(f"module {module!r} is {' and '.join(sorted(types))} in different experts")
        writer.add_factors(
            module,
            torch.cat([a for a, _, _ in pieces], 0),
            torch.cat([b for _, b, _ in pieces], 1),
            types.pop(),
        )
    return writer.finish(base_model_name_or_path=base_model_name_or_path, revision=revision)


@dataclass
class LowRankAdapter:
    """Result of :func:`low_rank_adapter`: where it was written and the error per module."""

    path: Path
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        """The largest relative Frobenius error over the modules."""
        return max(self.errors.values(), default=0.0)


def low_rank_adapter(
    delta_by_module: Mapping[str, torch.Tensor],
    rank: int,
    target: str | Path,
    *,
    layer_types: Mapping[str, str],
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    aliases: NameAliases | None = None,
) -> LowRankAdapter:
    """Write merged task vectors as a LoRA adapter of rank ``rank`` (truncated SVD per module).

    Args:
        delta_by_module: Module name (or its weight's name) to the merged task vector of its weight;
            checkpoint names with ``aliases``, else the names written.
        rank: Rank of every module (capped at its smaller dimension, where the adapter is exact).
        target: Output directory.
        layer_types: In-memory module name to layer class (``Linear``, ``Conv1D``, ``Embedding``),
            e.g. :func:`~hubmerge.adapters.modules.base_layer_types` of the base directory.
        overwrite: Replace an existing directory that hubmerge did not write.
        base_model_name_or_path, revision: Recorded in ``adapter_config.json``.
        dtype: Dtype of the written factors.
        aliases: The base's in-memory names (:func:`~hubmerge.adapters.modules.base_aliases`):
            checkpoint names are written as transformers names the modules in memory.

    Returns:
        A :class:`LowRankAdapter` with the relative Frobenius error ``||Δ - Δ_r|| / ||Δ||`` per module.

    Raises:
        AdapterError: A module of unknown or unsupported layer type, a non-matrix task vector,
            all task vectors zero, or a weight transformers does not load as a tensor of its own.
    """
    writer = LoraAdapterWriter(Path(target), dtype=dtype, overwrite=overwrite)
    for name, delta in delta_by_module.items():
        weight = name if name.endswith(".weight") else f"{name}.weight"
        module = _memory_module(weight, aliases, "low-rank adapter")
        layer_type = layer_types.get(module)
        if layer_type is None:
            raise AdapterError(f"module {module!r}: layer type unknown (give it in layer_types)")
        writer.add_delta(module, delta, rank, layer_type)
    path = writer.finish(base_model_name_or_path=base_model_name_or_path, revision=revision)
    return LowRankAdapter(path, dict(writer.errors))


def _memory_module(weight: str, aliases: NameAliases | None, who: str) -> str:
    """The in-memory module of the base weight ``weight`` (a checkpoint name)."""
    if aliases is None:
        return weight.removesuffix(".weight")
    try:
        module, param = aliases.memory_module(weight)
    except AdapterError as exc:
        raise AdapterError(f"{who}: {exc}") from None
    if param != "weight":
        raise AdapterError(
            f"{who}: base weight {weight!r} is {module}.{param} in transformers' model, not a module's "
            "weight; a LoRA factor pair cannot be written for it"
        )
    return module


def _task_arithmetic(params, count: int) -> list[float]:
    weights = params.weights if params.weights is not None else [1.0] * count
    return [params.scale * w for w in weights]


def _linear(params, count: int) -> list[float]:
    weights = params.weights if params.weights is not None else [1.0 / count] * count
    total = math.fsum(weights)
    if params.normalize:
        return [w / total for w in weights]
    if abs(total - 1.0) > 1e-12:
        raise AdapterError(
            f"linear with normalize: false and weights summing to {total} also scales the base "
            "by that sum; not expressible as an adapter on the base"
        )
    return list(weights)


#: Methods whose merge is ``theta_0 + sum_i c_i tau_i``, with the rule giving ``c_i`` from their parameters.
LINEAR_METHODS = {"task_arithmetic": _task_arithmetic, "linear": _linear}


def linear_coefficients(method, count: int) -> list[float]:
    """The ``c_i`` of a method whose merge is ``theta_0 + sum_i c_i tau_i`` (for :func:`stack_loras`).

    Args:
        method: A :class:`~hubmerge.method.MergeMethod` instance (``task_arithmetic`` or ``linear``).
        count: Number of experts.

    Returns:
        One coefficient per expert, in recipe order.

    Raises:
        AdapterError: If the method is not a fixed linear combination of task vectors.
    """
    rule = LINEAR_METHODS.get(method.name)
    if rule is None:
        raise AdapterError(
            f"method {method.name!r} is not a linear combination of task vectors; write a "
            "low-rank adapter (output.rank) instead"
        )
    coefficients = rule(method.params, count)
    if len(coefficients) != count:
        raise AdapterError(f"{len(coefficients)} weights for {count} experts")
    return coefficients
