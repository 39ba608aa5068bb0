"""A transformers model run functionally over a base and the experts' stacked task vectors.

Methods that need forward passes through merges — SE-Merging's per-sample merge, AdaMerging's
learned coefficients — hold ``theta_0`` and the task vectors ``tau_1..tau_T`` once, in two flat
buffers (``P`` and ``T x P`` numbers), and run the model with :func:`torch.func.functional_call`
on parameters computed from them: ``theta_0 + sum_k lambda_k tau_k``. No model is ever copied; a
merge is one ``P``-vector (``addmv``) whose slices are the parameters, or, with coefficients per
block, one small product per tensor (differentiable in the coefficients).

Tensors are read in checkpoint names (what the engine streams); transformers may rename them when
it builds a model (ViT's ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``
in transformers 5). :class:`TaskVectorModel` finds the mapping by loading marker values through
``from_pretrained`` (each checkpoint tensor filled with its own index) and works in the module's
names; for conversions that are not renames it converts each expert through ``from_pretrained``.

Heads (:class:`TaskHead`) turn the model's output into one task's logits: a linear head stored beside
an expert (``task_head.safetensors``, with ``pooling`` in ``task.json``: hubmerge's suite convention),
or the expert's own classification head when it is a ``*ForSequenceClassification`` /
``*ForImageClassification`` checkpoint (its ``classifier.*``/``score.*`` tensors).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from .errors import IncompatibleModelError, MethodInputError

logger = logging.getLogger(__name__)

__all__ = ["TaskHead", "TaskVectorModel", "load_heads"]

HEAD_FILE = "task_head.safetensors"
TASK_FILE = "task.json"
#: Module names of the classification heads of transformers' ``*For*Classification`` classes.
HEAD_PREFIXES = ("classifier.", "score.")
#: Architectures whose checkpoints carry a classification head of their own.
CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


class _ReachedProbe(Exception):
    """Raised by the probe hook to stop a forward pass at the probe layer."""

    def __init__(self, value: torch.Tensor):
        super().__init__("probe reached")
        self.value = value


def _quiet():
    from transformers.utils import logging as hf_logging

    class _Ctx:
        def __enter__(self):
            self.level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()

        def __exit__(self, *exc):
            hf_logging.set_verbosity(self.level)

    return _Ctx()


def model_class(config_dir: str | Path, name_or_class: Any = None):
    """The transformers class to build: ``name_or_class``, else the config's ``architectures[0]``, else AutoModel.

    Returns:
        ``(class, config)`` with ``Auto*`` classes resolved to the concrete class for the config.
    """
    from transformers import AutoConfig

    from .deployment import _model_class, concrete_model_class

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    cls = concrete_model_class(_model_class(name_or_class, architectures[0] if architectures else None), config)
    return cls, config


def _load(cls, config, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """Build ``cls`` from a checkpoint-named state dict (transformers converts names as for a file)."""
    with _quiet():
        module, info = cls.from_pretrained(None, config=config, state_dict=dict(state), dtype=dtype,
                                           output_loading_info=True)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise IncompatibleModelError(f"{cls.__name__} needs weights the checkpoint does not hold "
                                     f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    return module


def _marker_map(cls, config, state: Mapping[str, torch.Tensor], values: Mapping[str, float],
                dtype: torch.dtype) -> dict[str, float] | None:
    """Load ``state`` with each floating checkpoint tensor filled with ``values[name]``; read back per parameter.

    Returns:
        Module parameter name to the one value it holds, or ``None`` when a parameter mixes values
        (a conversion that is not a rename: fused, scaled...).
    """
    markers = {n: (torch.full(t.shape, float(values[n]), dtype=dtype) if t.dtype.is_floating_point else t)
               for n, t in state.items()}
    module = _load(cls, config, markers, dtype)
    out = {}
    for name, param in module.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        values = param.detach()
        lo, hi = (float(values.min()), float(values.max())) if values.numel() else (0.0, 0.0)
        if lo != hi:
            return None
        out[name] = lo
    return out


@dataclass
class TaskVectorModel:
    """A model whose parameters are ``theta_0 + sum_k lambda_k tau_k``, for any coefficients, without copies.

    Build it with :meth:`from_tensors` (checkpoint-named tensors) or :meth:`from_inputs` (a recipe's
    opened inputs, streamed by the engine).

    Attributes:
        module: The transformers model in eval mode; its floating parameters are views of ``flat_base``
            and never receive gradients.
        tasks: The experts' labels, in the order of the task vectors.
        names: Floating parameter names (module names), in the order of the flat buffers.
        flat_base: ``theta_0`` of every floating parameter, ``(P,)``.
        flat_taus: The task vectors, ``(T, P)``.
        checkpoint_names: Module name to the checkpoint tensor it is (when the conversion is a rename).
    """

    module: torch.nn.Module
    tasks: list[str]
    names: list[str]
    flat_base: torch.Tensor
    flat_taus: torch.Tensor
    checkpoint_names: dict[str, str] | None = None
    _slices: dict[str, tuple[int, int, torch.Size]] = field(default_factory=dict, repr=False)
    _prefix: dict[int, list[str]] = field(default_factory=dict, repr=False)

    # -- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_tensors(cls, config_dir: str | Path, base: Mapping[str, torch.Tensor], taus: Mapping[str, torch.Tensor],
                     tasks: list[str], *, model_class_name: Any = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> TaskVectorModel:
        """Build from checkpoint-named tensors.

        Args:
            config_dir: Directory holding the base's ``config.json``.
            base: Every tensor of the base checkpoint (``theta_0``).
            taus: Floating tensor name to the stacked task vectors, ``(T, *shape)``.
            tasks: The experts' labels.
            model_class_name: transformers class (or name) to build; default: the config's architecture.
            device: Where the buffers and the model live.
            dtype: Compute dtype of the floating parameters.

        Returns:
            The model.

        Raises:
            IncompatibleModelError: The class needs weights the base does not hold.
        """
        cls_, config = model_class(config_dir, model_class_name)
        state = {n: (t.to(dtype) if t.dtype.is_floating_point else t) for n, t in base.items()}
        floating = [n for n, t in state.items() if t.dtype.is_floating_point]
        module = _load(cls_, config, state, dtype)
        names = [n for n, p in module.named_parameters() if p.dtype.is_floating_point]
        index = _marker_map(cls_, config, state, {n: i for i, n in enumerate(floating)}, dtype)
        params = dict(module.named_parameters())
        rename: dict[str, str] | None = None
        if index is not None and all(float(v).is_integer() and 0 <= v < len(floating) for v in index.values()):
            rename = {m: floating[int(v)] for m, v in index.items()}
            if any(tuple(params[m].shape) != tuple(state[c].shape) for m, c in rename.items()):
                rename = None
        count = len(tasks)
        sizes = [params[n].numel() for n in names]
        flat_taus = torch.empty(count, sum(sizes), dtype=dtype)
        if rename is not None:
            offset = 0
            for name, size in zip(names, sizes):
                tau = taus.get(rename[name])
                flat_taus[:, offset:offset + size] = 0 if tau is None else tau.reshape(count, -1).to(dtype)
                offset += size
        else:  # not a plain rename: convert every expert as transformers converts a checkpoint
            logger.info("functional: %s converts checkpoint tensors; converting each expert", cls_.__name__)
            for k in range(count):
                expert = dict(state)
                for n, tau in taus.items():
                    expert[n] = state[n] + tau[k].to(dtype)
                converted = dict(_load(cls_, config, expert, dtype).named_parameters())
                flat_taus[k] = torch.cat([(converted[n] - params[n]).detach().reshape(-1) for n in names])
        flat_base = torch.cat([params[n].detach().reshape(-1) for n in names]).to(device)
        flat_taus = flat_taus.to(device)
        module.to(device)
        model = cls(module.eval().requires_grad_(False), list(tasks), names, flat_base, flat_taus, rename)
        model._bind()
        return model

    @classmethod
    def from_inputs(cls, inputs, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    model_class_name: Any = None) -> TaskVectorModel:
        """Build from a recipe's opened inputs (full fine-tunes or adapters), streamed by the engine.

        Args:
            inputs: :class:`hubmerge.engine.MergeInputs`.
            device: Where the model lives.
            dtype: Compute dtype.
            model_class_name: transformers class (or name); default: the base config's architecture.

        Returns:
            The model (memory: the base plus one copy per expert, as the method needs them all at once).
        """
        from .engine import build_group, prefetched

        base: dict[str, torch.Tensor] = {}
        taus: dict[str, torch.Tensor] = {}
        for fetched in prefetched(inputs, inputs.base_checkpoint.names()):
            if not fetched.base.dtype.is_floating_point:
                base[fetched.name] = fetched.base
                continue
            group = build_group(inputs, fetched, torch.device("cpu"), dtype)
            base[fetched.name] = group.base.clone()
            taus[fetched.name] = group.deltas.clone()
            del group
        return cls.from_tensors(inputs.base.directory, base, taus, [e.label for e in inputs.experts],
                                model_class_name=model_class_name, device=device, dtype=dtype)

    def _bind(self) -> None:
        """Make the module's parameters views of ``flat_base`` (one copy of ``theta_0``)."""
        params = dict(self.module.named_parameters())
        offset = 0
        for name in self.names:
            param = params[name]
            size = param.numel()
            self._slices[name] = (offset, offset + size, param.shape)
            param.data = self.flat_base[offset:offset + size].view(param.shape)
            offset += size

    # -- parameters ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the buffers live."""
        return self.flat_base.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return self.flat_base.dtype

    def tau(self, name: str) -> torch.Tensor:
        """The task vectors of parameter ``name``, ``(T, *shape)`` (a view)."""
        start, stop, shape = self._slices[name]
        return self.flat_taus[:, start:stop].view(len(self.tasks), *shape)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a ``(P,)`` vector into parameters (views, no copy)."""
        return {n: flat[a:b].view(shape) for n, (a, b, shape) in self._slices.items()}

    def base_params(self) -> dict[str, torch.Tensor]:
        """``theta_0`` as parameters (views)."""
        return self.views(self.flat_base)

    def merge_flat(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``theta_0 + sum_k c_k tau_k`` as one ``(P,)`` vector.

        Args:
            coefficients: ``(T,)``.

        Returns:
            The merged parameters, flat.
        """
        return torch.addmv(self.flat_base, self.flat_taus.t(), coefficients.to(self.dtype))

    def merged(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters of ``theta_0 + sum_k c_k tau_k`` (task-wise coefficients, ``(T,)``)."""
        return self.views(self.merge_flat(coefficients))

    def merged_by_group(self, coefficients: torch.Tensor, groups: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters with one coefficient per task and group: ``theta_0 + sum_k c[g, k] tau_k``.

        Differentiable in ``coefficients``; ``theta_0`` and the task vectors get no gradient.

        Args:
            coefficients: ``(G, T)``.
            groups: The group of each parameter, ``(len(names),)`` (see :meth:`groups_of`).

        Returns:
            Parameter name to tensor.
        """
        out = {}
        for i, (name, (start, stop, shape)) in enumerate(self._slices.items()):
            update = coefficients[groups[i]].to(self.dtype) @ self.flat_taus[:, start:stop]
            out[name] = (self.flat_base[start:stop] + update).view(shape)
        return out

    def groups_of(self, group_of_checkpoint_name: Mapping[str, int]) -> torch.Tensor:
        """The group of every parameter, from groups given per checkpoint tensor name.

        Args:
            group_of_checkpoint_name: Checkpoint tensor name to group index.

        Returns:
            ``(len(names),)`` long tensor.

        Raises:
            MethodInputError: A parameter comes from tensors of several groups (a fused conversion).
        """
        if self.checkpoint_names is None:
            raise MethodInputError("this architecture's checkpoint tensors are not plain renames of its parameters; "
                                   "groups per checkpoint tensor cannot be mapped (use granularity: task)")
        return torch.tensor([group_of_checkpoint_name[self.checkpoint_names[n]] for n in self.names],
                            dtype=torch.long)

    # -- running -------------------------------------------------------------------------------------------
    def __call__(self, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Run the model with ``params`` in place of its floating parameters (its own buffers are kept)."""
        return functional_call(self.module, dict(params), args, kwargs)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The model's stack of blocks: the longest ``ModuleList`` of one module class."""
        best: torch.nn.ModuleList | None = None
        for _, module in self.module.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) and \
                    len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
        if best is None:
            raise MethodInputError(f"{type(self.module).__name__} has no stack of blocks (ModuleList) to probe")
        return best

    def block_index(self, layer: int) -> int:
        """``layer`` as a non-negative block index (negative counts from the last).

        Raises:
            MethodInputError: Out of range.
        """
        count = len(self.blocks)
        index = layer + count if layer < 0 else layer
        if not 0 <= index < count:
            raise MethodInputError(f"probe layer {layer} is out of range: the model has {count} blocks")
        return index

    def run_to(self, layer: int, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the model up to and including block ``layer`` and return that block's output hidden states.

        Args:
            layer: Block index (negative: from the last).
            params: Parameters (only those used before the probe matter, see :meth:`prefix_names`).
            *args, **kwargs: The model's inputs.

        Returns:
            The block's hidden states, ``(batch, seq, hidden)``.
        """
        block = self.blocks[self.block_index(layer)]

        def stop(_module, _inputs, output):
            value = output[0] if isinstance(output, (tuple, list)) else output
            value = getattr(value, "last_hidden_state", value)
            raise _ReachedProbe(value)

        handle = block.register_forward_hook(stop)
        try:
            self(params, *args, **kwargs)
        except _ReachedProbe as reached:
            return reached.value
        finally:
            handle.remove()
        raise MethodInputError(f"the forward pass never reached block {layer}")

    def prefix_names(self, layer: int, *args: Any, **kwargs: Any) -> list[str]:
        """Parameters used up to block ``layer`` (found once by running ``theta_0`` on the given inputs).

        Returns:
            Their names, in the order of :attr:`names`.
        """
        index = self.block_index(layer)
        if index not in self._prefix:
            ran: set[str] = set()
            handles = []
            for name, module in self.module.named_modules():
                handles.append(module.register_forward_pre_hook(lambda m, i, _n=name: ran.add(_n)))
            try:
                with torch.no_grad():
                    self.run_to(index, self.base_params(), *args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
            used = set()
            modules = dict(self.module.named_modules())
            for module_name in ran:
                for param_name, _ in modules[module_name].named_parameters(recurse=False):
                    used.add(f"{module_name}.{param_name}" if module_name else param_name)
            self._prefix[index] = [n for n in self.names if n in used]
        return self._prefix[index]


# -- heads -------------------------------------------------------------------------------------------------

@dataclass
class TaskHead:
    """One task's classifier on top of the (merged) model.

    Attributes:
        task: The expert's label.
        kind: ``"linear"`` (a head stored beside the expert, on pooled features) or ``"model"`` (the
            expert's own ``classifier``/``score`` parameters inside a ``*ForClassification`` model).
        weight, bias: The linear head (``(classes, hidden)``, ``(classes,)``).
        pooling: ``pooler`` (the model's pooler output), ``mean`` (attention-masked mean of the last
            hidden states), ``cls`` (the first token) or ``None`` (pooler output when the model has one,
            else mean).
        overrides: For ``"model"`` heads, parameter name to the expert's own value.
    """

    task: str
    kind: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    pooling: str | None = None
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)

    def params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` with this head's own parameters in place (model heads)."""
        return {**params, **self.overrides} if self.overrides else dict(params)

    def logits(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task's logits from the model's outputs on ``batch``."""
        if self.kind == "model":
            return outputs.logits
        features = pool(outputs, batch.get("attention_mask"), self.pooling)
        return torch.nn.functional.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))

    def __call__(self, model: TaskVectorModel, params: Mapping[str, torch.Tensor],
                 batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run ``model`` with ``params`` on ``batch`` and return this task's logits."""
        return self.logits(model(self.params(params), **batch), batch)


def pool(outputs: Any, attention_mask: torch.Tensor | None, pooling: str | None) -> torch.Tensor:
    """Pooled features of a model output, as a linear head reads them.

    Raises:
        MethodInputError: Unknown pooling, or ``pooler`` on a model without a pooler.
    """
    pooler = getattr(outputs, "pooler_output", None)
    if pooling == "pooler" or (pooling is None and pooler is not None):
        if pooler is None:
            raise MethodInputError("the head reads the pooler output, and the model has no pooler")
        return pooler
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling in (None, "mean"):
        if attention_mask is None:
            return hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    raise MethodInputError(f"unknown pooling {pooling!r} (pooler, mean or cls)")


def load_heads(model: TaskVectorModel, directories: list[Path]) -> list[TaskHead]:
    """The classifier head of every expert, in the order of ``model.tasks``.

    An expert directory holding ``task_head.safetensors`` (``weight``, ``bias``; ``pooling`` read from
    ``task.json`` when present) gives a linear head; otherwise, when ``model`` is a
    ``*ForSequenceClassification`` / ``*ForImageClassification`` class, the expert's own
    ``classifier.*``/``score.*`` parameters (``theta_0 + tau_k``) are its head.

    Args:
        model: The functional model.
        directories: The experts' directories, in task order.

    Returns:
        One :class:`TaskHead` per task.

    Raises:
        MethodInputError: An expert has no head, naming it and what would do.
    """
    from safetensors.torch import load_file

    heads = []
    model_heads = type(model.module).__name__.endswith(CLASSIFIER_SUFFIXES)
    head_names = [n for n in model.names if n.startswith(HEAD_PREFIXES)]
    for k, (task, directory) in enumerate(zip(model.tasks, directories)):
        directory = Path(directory)
        file = directory / HEAD_FILE
        if file.is_file():
            tensors = load_file(str(file))
            if "weight" not in tensors or "bias" not in tensors:
                raise MethodInputError(f"{file}: a task head holds `weight` and `bias`")
            pooling = None
            if (directory / TASK_FILE).is_file():
                try:
                    pooling = json.loads((directory / TASK_FILE).read_text()).get("pooling")
                except (OSError, ValueError):
                    pooling = None
            heads.append(TaskHead(task, "linear", tensors["weight"].to(model.device), tensors["bias"].to(model.device),
                                  pooling))
        elif model_heads and head_names:
            overrides = {n: model.base_params()[n] + model.tau(n)[k] for n in head_names}
            heads.append(TaskHead(task, "model", overrides=overrides))
        else:
            raise MethodInputError(
                f"expert {task!r} ({directory}) has no classifier head: give it a {HEAD_FILE} (a linear layer "
                f"`weight` [classes, hidden], `bias` [classes] on the pooled output; `pooling` in {TASK_FILE}), or "
                f"merge *ForSequenceClassification / *ForImageClassification checkpoints (their classifier is used)")
    return heads

