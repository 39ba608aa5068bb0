"""AdaMerging (layer-wise): learn the merging coefficients by minimising prediction entropy on unlabeled data.

Paper: E. Yang, Z. Wang, L. Shen, S. Liu, G. Guo, X. Wang and D. Tao, "AdaMerging: Adaptive Model
Merging for Multi-Task Learning", ICLR 2024. https://arxiv.org/abs/2310.02575
(reference code: ``EnnengYang/AdaMerging``; also ``tanganke/fusion_bench``).

The merge is task arithmetic with one coefficient per task and per block::

    theta^l = theta_0^l + sum_k lambda_k^l tau_k^l

The coefficients start at ``init`` (0.3) and are learned by Adam (``lr``, ``steps``) to minimise the
Shannon entropy of each task's predictions on unlabeled samples of that task (the recipe's ``data:``):
every step takes one batch per task, runs it through the merge and the task's own classifier head,
and back-propagates the mean entropy into the coefficients only — ``theta_0`` and the task vectors are
constants, the merged parameters are computed functionally from them at every step
(:class:`hubmerge.functional.TaskVectorModel`), no model is copied. As in the reference code the
coefficients are clamped to ``[0, 1]`` in the forward pass (``clamp``). Seeds fix the batches.

``granularity`` says what a *block* is: ``block`` (default) — each element of the model's stack of
layers (``encoder.layer.3``), and every other top-level module (``embeddings``, ``pooler``...);
``tensor`` — every checkpoint tensor (the reference code's "layer-wise": one coefficient per
parameter tensor); ``task`` — one coefficient per task (task-wise AdaMerging).

Needs, besides the recipe's ``data:``, a classifier head per expert to compute the entropy: a
``task_head.safetensors`` beside the expert (hubmerge's suite convention; ``pooling`` in ``task.json``),
or the expert's own head when the experts are ``*ForSequenceClassification`` /
``*ForImageClassification`` checkpoints (see :func:`hubmerge.functional.load_heads`). The whole model
(base plus one task vector per expert) is held in memory while learning.

The output is an ordinary merged model; the learned coefficients become the ``coefficients``
parameter (rounded to 6 decimals, the values merged with), so they appear in the card's parameter
table and in ``hubmerge_recipe.yaml``: re-running that recipe merges with them without data.
Learning runs in :meth:`AdaMerging.prepare`, which ``hubmerge run`` (:func:`hubmerge.engine.merge`)
calls; the distributed executor and FlexMerge's inner methods do not, and refuse to merge without
given ``coefficients`` (``MethodStateError``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from hubmerge import method
from hubmerge.errors import MethodInputError, MethodStateError
from hubmerge.hookspecs import hookimpl
from hubmerge.method import MergeContext, MergeMethod, TensorGroup

logger = logging.getLogger(__name__)

#: A block of a stack of layers in a checkpoint tensor name: ``encoder.layer.3.`` -> ``encoder.layer.3``.
BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks)\.\d+)\.")
ALL = "all"


class AdaParams(method.Params):
    """Parameters of AdaMerging."""

    granularity: Literal["block", "tensor", "task"] = Field(
        "block", description="One coefficient per task and: block (each layer of the stack, each other top-level "
                             "module), tensor (each checkpoint tensor) or task (task-wise AdaMerging)")
    init: float = Field(0.3, allow_inf_nan=False, description="Starting value of every coefficient (lambda)")
    steps: int = Field(500, ge=0, le=1_000_000, description="Adam steps (one batch per task each)")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="Samples per task per step")
    clamp: tuple[float, float] | None = Field((0.0, 1.0), description="Clamp the coefficients to [low, high] in "
                                                                      "the forward pass (null: no clamp)")
    seed: int = Field(0, description="Seed of the batch order")
    coefficients: dict[str, list[float]] | None = Field(
        None, description="Block -> one coefficient per expert (recipe order). Learned and filled in by the run; "
                          "given, no learning (and no data) is needed")


@dataclass
class FitReport:
    """How the coefficients were learned.

    Attributes:
        entropy_before, entropy_after: Mean prediction entropy over every sample of every task, at the
            initial and at the learned coefficients.
        history: Mean entropy of each step's batches.
        seconds: Time spent learning.
    """

    entropy_before: float = float("nan")
    entropy_after: float = float("nan")
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` (``(batch, classes)``)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def group_of(name: str, granularity: str) -> str:
    """The block a checkpoint tensor belongs to (see the module docstring)."""
    if granularity == "task":
        return ALL
    if granularity == "tensor":
        return name
    match = BLOCK.match(name)
    return match.group(1) if match else name.split(".", 1)[0]


def effective(lambdas: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """The coefficients used in the forward pass (clamped when ``clamp`` is set)."""
    return lambdas.clamp(*clamp) if clamp is not None else lambdas


def mean_entropy(model, heads, data, coefficients: torch.Tensor, groups: torch.Tensor, *,
                 batch_size: int = 64) -> float:
    """Mean prediction entropy over every sample of every task, at ``coefficients`` (``(G, T)``)."""
    total, count = 0.0, 0
    with torch.no_grad():
        params = model.merged_by_group(coefficients, groups)
        for head in heads:
            for batch in data[head.task].batches(batch_size):
                size = next(iter(batch.values())).shape[0]
                total += float(entropy(head(model, params, batch))) * size
                count += size
    return total / max(1, count)


def fit(model, heads, data, groups: torch.Tensor, count: int, params: AdaParams) -> tuple[torch.Tensor, FitReport]:
    """Learn ``(count, T)`` coefficients by entropy minimisation (see the module docstring).

    Args:
        model: The :class:`hubmerge.functional.TaskVectorModel`.
        heads: One :class:`hubmerge.functional.TaskHead` per task, in task order.
        data: Task label to :class:`hubmerge.data.TaskData`.
        groups: The group of each of the model's parameters.
        count: Number of groups.
        params: The method's parameters.

    Returns:
        ``(coefficients, report)``: the learned coefficients, clamped as used, and the :class:`FitReport`.
    """
    started = time.perf_counter()
    tasks = len(heads)
    lambdas = torch.full((count, tasks), float(params.init), dtype=torch.float32, device=model.device,
                         requires_grad=True)
    report = FitReport()
    report.entropy_before = mean_entropy(model, heads, data, effective(lambdas.detach(), params.clamp), groups)
    optimizer = torch.optim.Adam([lambdas], lr=params.lr)
    streams = [_batches(data[h.task], params.batch_size, params.seed + i) for i, h in enumerate(heads)]
    for _ in range(params.steps):
        optimizer.zero_grad(set_to_none=True)
        merged = model.merged_by_group(effective(lambdas, params.clamp), groups)
        step = 0.0
        for i, head in enumerate(heads):
            loss = entropy(head(model, merged, next(streams[i])))
            loss.backward(retain_graph=i < tasks - 1)  # the merged parameters' graph serves every task
            step += float(loss.detach())
        optimizer.step()
        report.history.append(step / tasks)
    learned = effective(lambdas.detach(), params.clamp)
    report.entropy_after = mean_entropy(model, heads, data, learned, groups)
    report.seconds = time.perf_counter() - started
    return learned, report


def _batches(task_data, batch_size: int, seed: int):
    """Endless batches of one task, reshuffled every epoch by a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from task_data.batches(batch_size, generator=generator)


class AdaMerging(MergeMethod):
    """Layer-wise AdaMerging: task arithmetic with coefficients learned by entropy minimisation."""

    name = "adamerging"
    summary = ("AdaMerging: task arithmetic with one coefficient per task and block, learned by minimising "
               "prediction entropy on unlabeled samples (recipe `data:`)")
    paper = ("Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024, "
             "https://arxiv.org/abs/2310.02575")
    Params = AdaParams
    min_experts = 1
    elementwise = True  # one coefficient per tensor: rows merge on their own
    needs_data = True  # unless the coefficients are given (see __init__)

    def __init__(self, params: method.Params | dict[str, Any] | None = None):
        """Create the method; without ``coefficients`` it learns them, and needs ``data:``.

        Args:
            params: An ``AdaParams`` or a mapping validated against it.
        """
        super().__init__(params)
        self.needs_data = self.params.coefficients is None
        self.report: FitReport | None = None

    def check_experts(self, count: int) -> None:
        """Refuse given coefficients whose lists do not have one value per expert."""
        super().check_experts(count)
        from hubmerge.errors import MethodParamError

        for block, values in (self.params.coefficients or {}).items():
            if len(values) != count:
                raise MethodParamError(f"block {block!r} has {len(values)} values for {count} experts",
                                       field="coefficients")

    def prepare(self, context: MergeContext) -> None:
        """Learn the coefficients (unless given): data, the functional model and the heads, then :func:`fit`."""
        if self.params.coefficients is not None:
            return
        from hubmerge.data import load_task_data
        from hubmerge.engine import compute_threads
        from hubmerge.functional import TaskVectorModel, load_heads

        inputs = context.inputs
        labels = [e.label for e in inputs.experts]
        data = load_task_data(context.recipe.data, labels, base_dir=inputs.base.directory, token=context.token)
        model = TaskVectorModel.from_inputs(inputs, device=context.device, dtype=context.dtype)
        heads = load_heads(model, [e.resolved.directory for e in inputs.experts])
        floating = [n for n, m in inputs.base_checkpoint.meta.items() if m.dtype.is_floating_point]
        blocks = list(dict.fromkeys(group_of(n, self.params.granularity) for n in floating))
        index = {b: i for i, b in enumerate(blocks)}
        if len(blocks) == 1:  # task-wise: no mapping of checkpoint names needed
            groups = torch.zeros(len(model.names), dtype=torch.long)
        else:
            groups = model.groups_of({n: index[group_of(n, self.params.granularity)] for n in floating})
        logger.info("adamerging: learning %d x %d coefficients (%s) on %s samples", len(blocks), len(labels),
                    self.params.granularity, {t: len(d) for t, d in data.items()})
        with compute_threads(context.device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            learned, self.report = fit(model, heads, data, groups.to(model.device), len(blocks), self.params)
        table = {b: [round(float(v), 6) for v in learned[i].tolist()] for b, i in index.items()}
        self.params = self.params.model_copy(update={"coefficients": table})
        logger.info("adamerging: entropy %.4f -> %.4f in %d steps (%.1fs)", self.report.entropy_before,
                    self.report.entropy_after, self.params.steps, self.report.seconds)

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """``theta_0 + sum_k lambda_k^{block} tau_k`` with the learned (or given) coefficients."""
        table = self.params.coefficients
        if table is None:
            raise MethodStateError("adamerging: the coefficients are learned in prepare(), which did not run "
                                   "(run with `hubmerge run` / hubmerge.engine.merge, not a distributed executor)")
        block = group_of(group.name, self.params.granularity)
        if block not in table:
            raise MethodInputError(f"adamerging: no coefficients for block {block!r} (tensor {group.name!r})")
        coefficients = torch.tensor(table[block], dtype=group.deltas.dtype, device=group.deltas.device)
        return group.base + torch.tensordot(coefficients, group.deltas, dims=1)


@hookimpl
def hubmerge_register_methods(register):
    """Register AdaMerging."""
    register(AdaMerging)
