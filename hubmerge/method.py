"""The merge-method contract that every plugin implements.

A method is a small class: metadata (``name``, ``summary``, ``paper``), a pydantic
``Params`` model, and the maths on tensors. Nothing about files, devices, the Hub or
the CLI: the engine hands it one tensor group at a time.

The engine calls, for every floating-point tensor of the base model::

    method.merge_tensor(TensorGroup(name, base, deltas, ...)) -> merged weight

where ``deltas`` stacks the experts' task vectors ``tau_k = theta_k - theta_0`` along
dim 0. Methods that need statistics over the whole model (TIES' global top-k, ...)
declare ``prepasses > 0``: before merging, the engine streams every tensor group
through :meth:`MergeMethod.observe` once per pre-pass, sums the returned tensors over
all groups and hands the totals to :meth:`MergeMethod.finish_pass`. Because the
statistics are sums, the pre-pass also runs as a map-reduce over independent units.

Methods that learn from samples (AdaMerging) set ``needs_data``: ``hubmerge validate`` then
refuses a recipe without ``data:``, and the engine calls :meth:`MergeMethod.prepare` once with a
:class:`MergeContext` (the recipe, its opened inputs, device and dtype) before any pre-pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from .errors import MethodInputError


class Params(BaseModel):
    """Base class of a method's parameters: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class MergeContext:
    """What :meth:`MergeMethod.prepare` receives from the engine.

    Attributes:
        recipe: The validated recipe (``recipe.data`` holds the samples' sources).
        inputs: The opened inputs (:class:`hubmerge.engine.MergeInputs`: base and experts).
        device: The compute device.
        dtype: The compute dtype.
        token: Hub token for private inputs and data (never logged).
    """

    recipe: Any
    inputs: Any
    device: torch.device
    dtype: torch.dtype
    token: str | None = None


@dataclass
class TensorGroup:
    """Everything a method sees of one tensor.

    Attributes:
        name: The tensor's name in the base checkpoint.
        base: The base weight ``theta_0`` in the compute dtype, on the compute device.
        deltas: Task vectors stacked on dim 0, shape ``(T, *base.shape)``.
        experts: The experts' names, in the order of ``deltas``.
        rows: ``(start, stop)`` when this is a block of rows of a larger tensor (only for
            ``elementwise`` methods, or methods with ``tensor_passes``), else ``None``.
    """

    name: str
    base: torch.Tensor
    deltas: torch.Tensor
    experts: list[str] = field(default_factory=list)
    rows: tuple[int, int] | None = None

    @property
    def weights(self) -> torch.Tensor:
        """The experts' full weights ``theta_0 + tau_k``, shape ``(T, *base.shape)``."""
        return self.base.unsqueeze(0) + self.deltas

    def generator(self, seed: int) -> torch.Generator:
        """A random generator seeded from ``seed`` and this tensor's name.

        The stream is independent of the order in which tensors are merged, so a
        seeded method gives the same result in any executor.

        Args:
            seed: The recipe's seed.

        Returns:
            A ``torch.Generator`` on the group's device.
        """
        digest = hashlib.sha256(f"{seed}:{self.name}".encode()).digest()
        gen = torch.Generator(device=self.base.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen


class MergeMethod:
    """Base class of merge methods; subclass it in a plugin and register the class.

    Class attributes:
        name: Registered name used in recipes (``ties``).
        summary: One line for listings, cards and the Space.
        paper: Reference (title, venue, URL) or ``None``.
        Params: The pydantic model of the parameters (types, defaults, bounds, descriptions).
        min_experts / max_experts: How many experts the method accepts.
        prepasses: How many streaming pre-passes over all tensors it needs (an instance
            may set its own, e.g. TIES needs none with ``scope: tensor``).
        elementwise: True when :meth:`observe` and :meth:`merge_tensor` may be given a
            block of rows (dim 0) of a tensor and return the same rows of the result as
            for the whole tensor; the engine then streams large tensors in row blocks so
            memory stays bounded by the block, not the tensor. An instance may override it.
        tensor_passes: How many passes over one tensor's row blocks the method needs before
            merging that tensor (per-tensor statistics, e.g. TIES' per-tensor top-k). The engine
            streams a tensor too large to hold whole (see :data:`hubmerge.engine.TENSOR_PASS_BYTES`)
            in row blocks: :meth:`observe_tensor` for every block and :meth:`finish_tensor` after
            each pass, then :meth:`merge_tensor` for every block (with ``rows``). Smaller tensors
            are merged whole, without these calls. An instance may set its own.
        unchanged_when_zero: True when zero task vectors merge to exactly the base's values.
            The engine then writes the base for a tensor that no expert changes (an adapter's
            untouched tensors) without reading experts or building zero task vectors;
            pre-passes still see every tensor. An instance may set its own.
        output: ``"model"`` (one merged model) or ``"deployment"`` (per-task outputs).
        needs_data: The method learns from samples: a recipe must give ``data:`` (an instance
            may override it, e.g. AdaMerging given its coefficients needs none).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    Params: ClassVar[type[Params]] = Params
    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None
    prepasses: int = 0
    elementwise: bool = False
    tensor_passes: int = 0
    unchanged_when_zero: bool = False
    output: ClassVar[str] = "model"
    needs_data: bool = False

    def __init__(self, params: Params | dict[str, Any] | None = None):
        """Create the method with validated parameters.

        Args:
            params: A ``Params`` instance or a mapping validated against ``Params``.

        Raises:
            pydantic.ValidationError: If the parameters do not fit ``Params``.
        """
        if isinstance(params, Params):
            self.params = params
        else:
            self.params = self.Params.model_validate(params or {})

    # -- checks before any work -------------------------------------------------
    def check_experts(self, count: int) -> None:
        """Refuse a number of experts the method cannot merge.

        Args:
            count: Number of experts in the recipe.

        Raises:
            MethodInputError: If ``count`` is out of ``[min_experts, max_experts]``.
        """
        if count < self.min_experts or (self.max_experts is not None and count > self.max_experts):
            bounds = (
                f"exactly {self.min_experts}"
                if self.min_experts == self.max_experts
                else f"at least {self.min_experts}"
                + (f" and at most {self.max_experts}" if self.max_experts else "")
            )
            raise MethodInputError(f"method {self.name!r} needs {bounds} experts, got {count}")

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a compute dtype the method cannot use (default: floating only).

        Args:
            dtype: The recipe's compute dtype.

        Raises:
            MethodInputError: If the method cannot compute in ``dtype``.
        """
        if not dtype.is_floating_point:
            raise MethodInputError(f"method {self.name!r} cannot compute in {dtype}")

    # -- optional whole-model preparation --------------------------------------
    def prepare(self, context: MergeContext) -> None:
        """Called once by the engine, before the pre-passes, with the recipe and its opened inputs.

        Methods that need samples or forward passes through the whole model (AdaMerging) learn
        what they need here; the default does nothing.

        Args:
            context: The :class:`MergeContext`.
        """

    # -- optional global statistics ------------------------------------------
    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Return this group's contribution to pre-pass ``pass_index`` (summed by the engine).

        Args:
            pass_index: 0-based index of the pre-pass.
            group: One tensor group.

        Returns:
            A mapping of statistic name to tensor; the engine adds them up over all groups.
        """
        return {}

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Receive the summed statistics of pre-pass ``pass_index``.

        Args:
            pass_index: 0-based index of the pre-pass.
            totals: Sums of what :meth:`observe` returned over all groups.
        """

    # -- optional per-tensor statistics over row blocks (tensor_passes) -------
    def observe_tensor(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Return one row block's contribution to pass ``pass_index`` over its tensor.

        Args:
            pass_index: 0-based index of the per-tensor pass.
            group: A block of rows of the tensor (``group.rows`` set).

        Returns:
            A mapping of statistic name to tensor; the engine adds them up over the tensor's blocks.
        """
        return {}

    def finish_tensor(self, pass_index: int, name: str, totals: dict[str, torch.Tensor]) -> None:
        """Receive the summed statistics of pass ``pass_index`` over tensor ``name``.

        Args:
            pass_index: 0-based index of the per-tensor pass.
            name: The tensor.
            totals: Sums of what :meth:`observe_tensor` returned over its blocks.
        """

    # -- the maths ------------------------------------------------------------------
    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """Merge one tensor group.

        Args:
            group: The base weight and the experts' task vectors.

        Returns:
            The merged weight, same shape as ``group.base``, in the compute dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement merge_tensor")

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Metadata for listings, cards and generated forms.

        Returns:
            ``name``, ``summary``, ``paper`` and the JSON schema of ``Params``.
        """
        return {
            "name": cls.name,
            "summary": cls.summary,
            "paper": cls.paper,
            "params_schema": cls.Params.model_json_schema(),
            "min_experts": cls.min_experts,
            "max_experts": cls.max_experts,
            "output": cls.output,
            "needs_data": cls.needs_data,
        }
