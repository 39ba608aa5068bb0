"""The :class:`~hubmerge.sources.Expert` shared by every adapter kind.

An adapter is opened in two steps. :class:`AdapterExpert` reads the config and the
weights file's header (never tensor data) and classifies the file's keys; :meth:`check`
maps module names onto the base and builds a :class:`TensorPlan` per base tensor the
adapter changes, checking every shape, before the engine reads anything. Afterwards
:meth:`fetch` reads only the few adapter tensors one base tensor needs, and
:meth:`task_vector` does the maths on the base tensor's device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checkpoint import Checkpoint
from ..errors import AdapterError, AdapterMismatchError, UnsafeCheckpointError
from ..sources import Expert, ResolvedModel
from .config import CONFIG_FILE, WEIGHTS_FILE, peft_type_name
from .modules import (
    FULL,
    AdapterTensor,
    NameAliases,
    NameMap,
    base_aliases,
    base_layer_types,
    map_names,
    parse_adapter_keys,
)

logger = logging.getLogger(__name__)


class Update:
    """How an adapter changes one base tensor.

    Attributes:
        keys: Adapter tensors it needs, role to key in the adapter file.
    """

    keys: dict[str, str]

    def delta(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The change ``merged - start`` that PEFT's merge makes to the tensor ``start``.

        Args:
            start: The tensor before the merge (the base's, or the adapter's saved copy).
            tensors: The adapter tensors of :attr:`keys`, in the compute dtype and device.
        """
        raise NotImplementedError

    def delta_into(self, start: torch.Tensor, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write :meth:`delta` into ``out`` (shaped like ``start``); subclasses may skip the temporary."""
        out.copy_(self.delta(start, tensors))


@dataclass
class TensorPlan:
    """What an adapter does to one base tensor.

    Attributes:
        name: The base tensor's name.
        replace: Key of a saved copy that replaces the base tensor before the merge
            (``modules_to_save``, ``bias="all"``, saved embeddings), or ``None``.
        update: The adapter's change on top, or ``None``.
    """

    name: str
    replace: str | None = None
    update: Update | None = None

    @property
    def reads(self) -> dict[str, str]:
        """Adapter keys to read, by role (``replace`` for the saved copy)."""
        out = dict(self.update.keys) if self.update else {}
        if self.replace:
            out["replace"] = self.replace
        return out


def transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``weight.T`` for layers storing ``(in, out)`` (``Conv1D``), as PEFT's ``transpose``."""
    return weight.T if fan_in_fan_out else weight


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter maths runs in: float64 for float64 bases, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AdapterExpert(Expert):
    """A PEFT adapter as an expert: task vectors expanded from its tensors on demand.

    Subclasses set :attr:`suffixes` and implement :meth:`plan_updates`.

    Args:
        resolved: The adapter directory, made local.
        config: Its PEFT config (``peft.LoraConfig``...).
        base: The base checkpoint (headers only), checked against by :meth:`check`.

    Raises:
        AdapterError: If the weights file is missing or holds unknown adapter tensors.
        UnsafeCheckpointError: If the weights are only a pickle (``adapter_model.bin``).
    """

    suffixes: ClassVar[Mapping[str, str]] = {}
    kind_name: ClassVar[str] = "adapter"
    kind: str = "adapter"

    def __init__(self, resolved: ResolvedModel, config: Any, base: Checkpoint):
        super().__init__(resolved)
        self.config = config
        self.peft_type = peft_type_name(config)
        self.base_model_name_or_path: str | None = getattr(config, "base_model_name_or_path", None)
        self.weights = open_adapter_weights(resolved)
        self.tensors = parse_adapter_keys(self.weights.names(), self.suffixes, str(self.weights.files[0]))
        self._base = base
        self._plan: dict[str, TensorPlan] | None = None
        self._plan_lock = threading.Lock()
        self.name_map: NameMap | None = None
        self._aliases: NameAliases | None = None
        self._aliases_built = False

    @property
    def aliases(self) -> NameAliases | None:
        """The base's in-memory names (:func:`~hubmerge.adapters.modules.base_aliases`), built on
        first use: only adapters of architectures that transformers renames need them."""
        if not self._aliases_built:
            self._aliases = base_aliases(self._base.directory, self._base.meta.keys())
            self._aliases_built = True
        return self._aliases

    # -- the Expert contract -----------------------------------------------------------
    def check(self, base: Checkpoint) -> None:
        """Map the adapter onto ``base`` and check every shape, reading headers only.

        The adapter may name modules as the base checkpoint does or, when transformers
        renames the architecture's modules in memory (ViT in transformers 5), as the model
        in memory does (:func:`~hubmerge.adapters.modules.base_aliases`); either way the
        plan is in the checkpoint's tensor names.

        Raises:
            AdapterMismatchError: A target module is absent from the base, or its tensors'
                shapes do not fit the base weight (naming the module and both shapes).
            AdapterError: The adapter is incomplete or uses something unsupported.
        """
        if not self.tensors:
            raise AdapterError(f"adapter {self.label!r}: {self.weights.files[0]} holds no adapter tensors")
        for tensor in self.tensors:
            dtype = self.weights.meta[tensor.key].dtype
            if not dtype.is_floating_point:
                raise AdapterError(
                    f"adapter {self.label!r}: tensor {tensor.key!r} is {dtype}, not floating point"
                )
        targets = {t.target: self.describe_target(t) for t in self.tensors}
        if self._base is not base:
            self._base, self._aliases_built = base, False
        try:  # the checkpoint's own names first: transformers' renamings are needed only if they fail
            self.name_map = map_names(targets, base.meta.keys(), label=self.label,
                                      fits=lambda m: self._fits(m, base))
        except AdapterMismatchError:
            if self.aliases is None:
                raise
            self.name_map = map_names(targets, base.meta.keys(), label=self.label,
                                      fits=lambda m: self._fits(m, base), aliases=self.aliases)
        plans: dict[str, TensorPlan] = {}
        for tensor in self.tensors:
            if tensor.role == FULL:
                name = self.name_map(tensor.target)
                self._check_full(tensor, name, base)
                plans.setdefault(name, TensorPlan(name)).replace = tensor.key
        for name, update in self.plan_updates(base, self.name_map).items():
            plans.setdefault(name, TensorPlan(name)).update = update
        self._plan = plans
        self._base = base
        logger.debug("adapter %r changes %d base tensors", self.label, len(plans))

    def changes(self, name: str) -> bool:
        return name in self.plan

    def fetch(self, name: str) -> dict[str, torch.Tensor] | None:
        plan = self.plan.get(name)
        if plan is None:
            return None
        return {role: self.weights.get(key) for role, key in plan.reads.items()}

    def task_vector(self, name: str, fetched: Any, base: torch.Tensor) -> torch.Tensor | None:
        if fetched is None:
            return None
        plan = self.plan[name]
        work = work_dtype(base.dtype)
        tensors = {k: v.to(device=base.device, dtype=work) for k, v in fetched.items()}
        base_w = base.to(dtype=work)
        start = tensors.pop("replace", None)
        if plan.update is None:
            tau = start - base_w
        else:
            delta = plan.update.delta(base_w if start is None else start, tensors)
            tau = delta if start is None else (start - base_w) + delta
        return tau.to(dtype=base.dtype)

    def task_vector_into(self, name: str, fetched: Any, base: torch.Tensor, out: torch.Tensor) -> bool:
        plan = self.plan.get(name) if fetched is not None else None
        if plan is None or plan.update is None or plan.replace is not None or work_dtype(base.dtype) != base.dtype:
            return super().task_vector_into(name, fetched, base, out)
        tensors = {k: v.to(device=base.device, dtype=base.dtype) for k, v in fetched.items()}
        plan.update.delta_into(base, tensors, out)  # shapes were checked against the base
        return True

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def close(self) -> None:
        self.weights.close()

    # -- helpers for subclasses --------------------------------------------------------
    @property
    def plan(self) -> dict[str, TensorPlan]:
        """Base tensor name to :class:`TensorPlan` (checks against the base first if needed)."""
        if self._plan is None:
            with self._plan_lock:  # reader threads may ask first
                if self._plan is None:
                    self.check(self._base)
        return self._plan

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for lineage and cards (kind, PEFT type, the base it was trained on)."""
        return {
            "adapter": self.kind,
            "peft_type": self.peft_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "rank": getattr(self.config, "r", None),
            "name_map": None if self.name_map is None else str(self.name_map),
        }

    def describe_target(self, tensor: AdapterTensor) -> str:
        """How a tensor's target is called in messages."""
        if tensor.role != FULL:
            return f"{self.kind_name} target module {tensor.module!r}"
        if any(tensor.module.endswith(m) for m in getattr(self.config, "modules_to_save", None) or ()):
            return f"modules_to_save module {tensor.module!r} (tensor {tensor.target!r})"
        if tensor.target.endswith(".bias") and getattr(self.config, "bias", "none") != "none":
            return f"bias {tensor.target!r} (saved by bias={self.config.bias!r})"
        return f"saved tensor {tensor.target!r}"

    def modules(self) -> dict[str, dict[str, AdapterTensor]]:
        """The adapter's own tensors grouped by module: module name to role to tensor."""
        out: dict[str, dict[str, AdapterTensor]] = {}
        for tensor in self.tensors:
            if tensor.role != FULL:
                out.setdefault(tensor.module, {})[tensor.role] = tensor
        return out

    def shape(self, tensor: AdapterTensor) -> tuple[int, ...]:
        """Shape of an adapter tensor (from the header)."""
        return self.weights.meta[tensor.key].shape

    def plan_updates(self, base: Checkpoint, name_map: NameMap) -> dict[str, Update]:
        """Base tensor name to the :class:`Update` the adapter makes to it, shapes checked."""
        raise NotImplementedError

    def fits(self, base: Checkpoint, name_map: NameMap) -> bool:
        """Whether the adapter's shapes fit the base under ``name_map`` (for ambiguous names)."""
        try:
            self.plan_updates(base, name_map)
        except (AdapterError, KeyError):
            return False
        return True

    def _fits(self, name_map: NameMap, base: Checkpoint) -> bool:
        try:
            for tensor in self.tensors:
                if tensor.role == FULL:
                    self._check_full(tensor, name_map(tensor.target), base)
        except (AdapterError, KeyError):
            return False
        return self.fits(base, name_map)

    def _check_full(self, tensor: AdapterTensor, name: str, base: Checkpoint) -> None:
        ours, theirs = self.weights.meta[tensor.key].shape, base.meta[name].shape
        if ours != theirs:
            raise AdapterMismatchError(
                f"adapter {self.label!r}: saved tensor {tensor.key!r} has shape {list(ours)}, base tensor "
                f"{name!r} has {list(theirs)} (was the vocabulary resized?)"
            )
        if not base.meta[name].dtype.is_floating_point:
            raise AdapterMismatchError(f"adapter {self.label!r}: base tensor {name!r} is not floating point")

    def fan_in_fan_out(self, base: Checkpoint, weight: str, plain: bool, transposed: bool, what: str) -> bool:
        """Whether a layer stores its weight as ``(in, out)``, as PEFT decides it.

        PEFT sets ``fan_in_fan_out`` per layer from its class — ``True`` for ``Conv1D``,
        ``False`` for ``nn.Linear`` — overriding the config. The adapter's shapes tell
        unless the weight is square; then the base's layer class does, if it can be
        built from its ``config.json``, else the config's ``fan_in_fan_out``.

        Args:
            base: The base checkpoint.
            weight: The base weight's name.
            plain: Whether the adapter's shapes fit the weight as ``(out, in)``.
            transposed: Whether they fit it as ``(in, out)``.
            what: Description of the mismatch for the error message.

        Raises:
            AdapterMismatchError: If the shapes fit neither way.
        """
        if plain and not transposed:
            return False
        if transposed and not plain:
            return True
        if not plain:
            raise AdapterMismatchError(f"adapter {self.label!r}: {what}")
        layer = base_layer_types(str(base.directory))
        kind = layer.get(weight.rpartition(".")[0]) if layer else None
        if kind is None and layer and self.aliases is not None and weight in self.aliases.to_memory:
            kind = layer.get(self.aliases.memory_module(weight)[0])  # the layer classes are by in-memory name
        if kind == "Conv1D":
            return True
        if kind is not None and kind != "Conv1D":
            return False
        return bool(getattr(self.config, "fan_in_fan_out", False))


def open_adapter_weights(resolved: ResolvedModel) -> Checkpoint:
    """Open ``adapter_model.safetensors`` (or its sharded index), headers only.

    Raises:
        AdapterError: If the weights file is missing, naming it.
        UnsafeCheckpointError: If only ``adapter_model.bin`` (a pickle) is there.
    """
    directory = resolved.directory
    index = directory / (WEIGHTS_FILE + ".index.json")
    if not (directory / WEIGHTS_FILE).is_file() and not index.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UnsafeCheckpointError(
                f"{directory}: adapter weights only as adapter_model.bin (pickle); hubmerge never unpickles. "
                "Convert them with `PeftModel.from_pretrained(...).save_pretrained(d, "
                "safe_serialization=True)` "
                "on a machine you trust"
            )
        raise AdapterError(
            f"adapter {resolved.label!r}: weights file {directory / WEIGHTS_FILE} is missing "
            f"(found {CONFIG_FILE} but no adapter weights)"
        )
    return Checkpoint(directory, weights=WEIGHTS_FILE)
