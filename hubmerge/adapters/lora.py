"""LoRA and DoRA adapters expanded into task vectors, exactly as PEFT's ``merge_and_unload``.

For a linear layer with ``lora_A`` (``r x in``) and ``lora_B`` (``out x r``), PEFT adds
``ΔW = transpose(B @ A, fan_in_fan_out) * scaling`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` taken per module
from ``rank_pattern``/``alpha_pattern``. Embedding layers store ``lora_embedding_A``
(``r x num_embeddings``) and ``lora_embedding_B`` (``dim x r``) and add ``(B @ A).T * scaling``.
With ``lora_bias`` the bias gains ``lora_B.bias * scaling``. DoRA rescales the merged weight
per output feature: ``W' = m / ||W + ΔW||_row * (W + ΔW)``, the norm taken over the input
dimension of the ``(out, in)`` view. Saved copies (``modules_to_save``, ``bias="all"``)
replace the base tensor first; :class:`~hubmerge.adapters.expert.AdapterExpert` handles those.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from ..checkpoint import Checkpoint
from ..errors import AdapterError, AdapterMismatchError
from .config import PatternMatcher
from .expert import AdapterExpert, Update, transpose
from .modules import LORA_SUFFIXES, NameMap

logger = logging.getLogger(__name__)


def lora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """PEFT's ``Linear.get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * scaling``."""
    return transpose(lora_B @ lora_A, fan_in_fan_out) * scaling


def lora_embedding_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's ``Embedding.get_delta_weight``: ``(B @ A).T * scaling``, shaped like the embedding."""
    return (lora_B @ lora_A).T * scaling


def dora_merged(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool
) -> torch.Tensor:
    """PEFT's DoRA merge of ``delta`` into ``weight`` (``DoraLinearVariant.merge_safe``).

    The weight norm is taken row-wise over the ``(out, in)`` view of ``weight + delta``
    (``transpose`` by ``fan_in_fan_out``) and the magnitude divided by it scales each
    output feature. Embeddings use ``fan_in_fan_out=True`` (PEFT's ``DoraEmbeddingLayer``):
    one factor per embedding dimension.

    Args:
        weight: The weight before the merge, as stored by the layer.
        delta: The LoRA delta in the same layout (scaling included).
        magnitude: ``lora_magnitude_vector``, one entry per output feature.
        fan_in_fan_out: Whether ``weight`` is stored ``(in, out)``.

    Returns:
        The merged weight.
    """
    norm = torch.linalg.norm(transpose(weight, fan_in_fan_out) + transpose(delta, fan_in_fan_out), dim=1)
    factor = transpose((magnitude / norm.to(weight.dtype)).view(-1, 1), fan_in_fan_out)
    return factor * (weight + delta)


def lora_scaling(config, module: str, matcher: PatternMatcher | None = None) -> tuple[int, float, float]:
    """Rank, alpha and scaling of one module, with PEFT's ``rank_pattern``/``alpha_pattern`` rules.

    A pattern key matches when ``re.match(rf"(.*\\.)?({key})$", module)`` does (PEFT's
    ``get_pattern_key``; the first matching key wins), ``module`` being the module name in the
    model the adapter was trained on.

    Args:
        config: The ``peft.LoraConfig``.
        module: Module name without ``base_model.model.``.
        matcher: Matches the patterns within a time budget (shared by one adapter's modules).

    Returns:
        ``(r, lora_alpha, scaling)``.

    Raises:
        AdapterError: If a pattern is invalid or pathologically slow.
    """
    matcher = matcher or PatternMatcher("LoRA config")
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    r = rank_pattern.get(matcher.pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(matcher.pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return r, alpha, scaling


class LoraUpdate(Update):
    """A LoRA (or DoRA) change to a linear or embedding weight.

    Args:
        lora_A, lora_B: Keys of the factors in the adapter file.
        scaling: The module's scaling.
        fan_in_fan_out: Whether the base weight is stored ``(in, out)`` (ignored for embeddings).
        embedding: Whether this is an embedding LoRA.
        magnitude: Key of DoRA's ``lora_magnitude_vector``, or ``None`` for plain LoRA.
    """

    def __init__(
        self,
        lora_A: str,
        lora_B: str,
        scaling: float,
        *,
        fan_in_fan_out: bool = False,
        embedding: bool = False,
        magnitude: str | None = None,
    ):
        self.keys = {"lora_A": lora_A, "lora_B": lora_B}
        if magnitude is not None:
            self.keys["magnitude"] = magnitude
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        self.embedding = embedding

    def delta(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.embedding:
            delta = lora_embedding_delta(tensors["lora_A"], tensors["lora_B"], self.scaling)
        else:
            delta = lora_delta(tensors["lora_A"], tensors["lora_B"], self.scaling, self.fan_in_fan_out)
        if "magnitude" not in tensors:
            return delta
        layout = True if self.embedding else self.fan_in_fan_out
        return dora_merged(start, delta, tensors["magnitude"], layout) - start

    def delta_into(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        if self.embedding or "magnitude" in tensors:
            return super().delta_into(start, tensors, out)
        lora_A, lora_B = tensors["lora_A"], tensors["lora_B"]
        if self.fan_in_fan_out:  # (B @ A).T as A.T @ B.T: the same products and sums, stored (in, out)
            torch.matmul(lora_A.T, lora_B.T, out=out)
        else:
            torch.matmul(lora_B, lora_A, out=out)
        out.mul_(self.scaling)


class LoraBiasUpdate(Update):
    """``lora_bias``: the bias gains ``lora_B.bias * scaling`` (PEFT refuses ``lora_bias`` with DoRA)."""

    def __init__(self, bias: str, scaling: float):
        self.keys = {"bias": bias}
        self.scaling = scaling

    def delta(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return tensors["bias"] * self.scaling


class LoraExpert(AdapterExpert):
    """A PEFT LoRA or DoRA adapter as an expert (see the module docstring for the maths)."""

    suffixes = LORA_SUFFIXES
    kind_name = "LoRA"

    def __init__(self, resolved, config, base: Checkpoint):
        super().__init__(resolved, config, base)
        ignored = {"lora_magnitude_vector": not config.use_dora, "lora_B_bias": not config.lora_bias}
        for tensor in [t for t in self.tensors if ignored.get(t.role)]:
            # PEFT's layers have no such parameter, so loading skips it; so do we
            logger.warning(
                "adapter %r: ignoring %s (not used by its config, nor by PEFT)", self.label, tensor.key
            )
        self.tensors = [t for t in self.tensors if not ignored.get(t.role)]
        self.use_dora = bool(config.use_dora)
        self.kind = "dora" if self.use_dora else "lora"

    def describe_target(self, tensor) -> str:
        if tensor.role == "lora_B_bias":
            return f"bias of LoRA target module {tensor.module!r} (lora_bias)"
        return super().describe_target(tensor)

    def plan_updates(self, base: Checkpoint, name_map: NameMap) -> dict[str, Update]:
        updates: dict[str, Update] = {}
        matcher = PatternMatcher(f"adapter {self.label!r}: rank_pattern/alpha_pattern")
        for module, roles in self.modules().items():
            r, _, scaling = lora_scaling(self.config, module, matcher)
            weight = name_map(f"{module}.weight")
            if weight not in base.meta:
                raise AdapterMismatchError(
                    f"adapter {self.label!r}: LoRA target module {module!r} has no weight "
                    f"{weight!r} in the base"
                )
            shape = base.meta[weight].shape
            where = f"adapter {self.label!r}: LoRA target module {module!r}"
            if len(shape) != 2:
                raise AdapterError(
                    f"not supported yet: LoRA on the {len(shape)}-D weight {weight!r} (convolutions)"
                )
            magnitude = roles.get("lora_magnitude_vector")
            if self.use_dora and magnitude is None:
                raise AdapterError(f"{where}: DoRA adapter without lora_magnitude_vector (incomplete file)")
            if "lora_A" in roles or "lora_B" in roles:
                if "lora_A" not in roles or "lora_B" not in roles:
                    raise AdapterError(f"{where}: has only one of lora_A/lora_B (incomplete file)")
                a, b = self.shape(roles["lora_A"]), self.shape(roles["lora_B"])
                self._check_rank(where, r, a, b)
                fits = f"lora_A {list(a)}, lora_B {list(b)} do not fit base weight {weight!r} {list(shape)}"
                fifo = self.fan_in_fan_out(
                    base,
                    weight,
                    plain=shape == (b[0], a[1]),
                    transposed=shape == (a[1], b[0]),
                    what=f"{where}: {fits}",
                )
                out_features = b[0]
                update = LoraUpdate(
                    roles["lora_A"].key,
                    roles["lora_B"].key,
                    scaling,
                    fan_in_fan_out=fifo,
                    magnitude=magnitude.key if magnitude else None,
                )
            elif "lora_embedding_A" in roles and "lora_embedding_B" in roles:
                a, b = self.shape(roles["lora_embedding_A"]), self.shape(roles["lora_embedding_B"])
                self._check_rank(where, r, a, b)
                if shape != (a[1], b[0]):
                    raise AdapterMismatchError(
                        f"{where}: lora_embedding_A {list(a)} and lora_embedding_B {list(b)} "
                        "do not fit the base "
                        f"embedding {weight!r} {list(shape)}"
                    )
                out_features = b[0]
                update = LoraUpdate(
                    roles["lora_embedding_A"].key,
                    roles["lora_embedding_B"].key,
                    scaling,
                    embedding=True,
                    magnitude=magnitude.key if magnitude else None,
                )
            else:
                raise AdapterError(
                    f"{where}: has {', '.join(sorted(roles))} but no LoRA factors (incomplete file)"
                )
            if magnitude is not None and self.shape(magnitude) != (out_features,):
                raise AdapterMismatchError(
                    f"{where}: lora_magnitude_vector has shape {list(self.shape(magnitude))}, "
                    f"expected [{out_features}]"
                )
            updates[weight] = update
            if "lora_B_bias" in roles:
                bias = name_map(f"{module}.bias")
                if bias not in base.meta:
                    raise AdapterMismatchError(
                        f"{where}: lora_bias is set but the base layer has no bias {bias!r}"
                    )
                if base.meta[bias].shape != (out_features,) or self.shape(roles["lora_B_bias"]) != (
                    out_features,
                ):
                    raise AdapterMismatchError(
                        f"{where}: lora_B.bias {list(self.shape(roles['lora_B_bias']))} "
                        "does not fit the base "
                        f"bias {bias!r} {list(base.meta[bias].shape)}"
                    )
                updates[bias] = LoraBiasUpdate(roles["lora_B_bias"].key, scaling)
            elif self.config.lora_bias and "lora_A" in roles:
                raise AdapterError(f"{where}: lora_bias is set but lora_B.bias is missing (incomplete file)")
        return updates

    def _check_rank(self, where: str, r: int, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"{where}: factors of shapes {list(a)} and {list(b)} do not multiply")
        if a[0] != r:
            raise AdapterError(
                f"{where}: the config gives rank {r} (r / rank_pattern), the factors have rank {a[0]}"
            )
