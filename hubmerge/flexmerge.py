"""FlexMerge: every deployment size, from one merged model to all experts, from one recipe.

Lu et al., "Navigating the Accuracy-Size Trade-Off with Flexible Model Merging"
(reference code: ``sacs-epfl/flexmerge``). The model is cut into **blocks**; in every block each
expert starts as its own group, and FlexMerge repeatedly merges, across all blocks, the pair of
groups with the highest similarity. Each merge saves one copy of a block; stopping after ``m``
merges gives a deployment of known size.

**Blocks** (:func:`auto_block_of`): by default each transformer layer's attention, MLP and every
norm are separate blocks (the paper's setting), recognised from module names (BERT, ViT, CLIP,
GPT-2, Llama-like, T5, BART...); every module outside the layers (embeddings, pooler, final norm,
head...; its weight and bias together) is a block of its own. A recipe may instead give
``flexmerge.blocks: [{name, pattern}]``: a tensor belongs to the first rule whose regex
``re.search``-es its name (capture groups make one block per match, ``name.<groups>``); unmatched
tensors are one block each. Non-floating tensors are not merged: stored once, from the base.

**Similarity**: one streaming pre-pass sums, per block, the T x T Gram matrix of the experts'
task vectors (``observe`` returns per-tensor Gram matrices keyed by block; the engine adds them up,
so it also runs as a map-reduce). Cosines follow: ``G_ij / sqrt(G_ii G_jj)``; two all-zero task
vectors have cosine 1 (merging them loses nothing), a zero and a non-zero one 0.

**Order**: the similarity of two groups is the *minimum* pairwise cosine over their members
(complete linkage: the paper's Eq. 1, although its text calls it single linkage). Merges never
interact across blocks and complete linkage is monotone, so the global greedy sequence is the
per-block agglomerations (disjoint-set union, numpy argmax) merged by decreasing similarity. Ties
go to the earlier block (storage order of its first tensor), then to the pair whose smallest
members are smallest. One pass yields the whole sequence; the deployment after ``m`` merges has a
known set of groups per block.

**Size** is measured, as in the paper, in *model-equivalents of storage*: the bytes of the
distinct tensors a deployment stores divided by the bytes of one model (the base's tensors in the
output dtype). Size 1 is one merged model (every block one group); size T keeps every expert.
A requested size ``s`` (an int, ``"1.5"`` or ``"1.5x"``, within ``[1, T]``; ``sizes: all`` means
1, 2, ..., T) is a budget of ``s`` models: the deployment applies the *shortest prefix* of the
merge sequence whose storage is within the budget -- the paper's Algorithm 1, which merges
``while S > S_target`` -- i.e. the largest deployment that fits. How storage is counted per
block is a :class:`StorageModel` (default: one tensor per group, Table 1's TA/TIES rows;
:class:`MaskedStorage` is the CONSENSUS/EMR row, the hook for mask methods).

**Inside a group** any registered single-output method merges the members' task vectors
(``flexmerge.inner`` with ``inner_params``, through :func:`hubmerge.plugins.get_method`). A group
of one keeps its expert unchanged (``theta_0 + tau_t`` exactly: the expert's own tensor).
``task_arithmetic`` is applied as in the paper, ``tau = lambda * mean(tau_k)`` (its footnote 1),
with the paper's default ``lambda = 1.5``: its ``scale`` is lambda and is divided by the group's
size (see :data:`MEAN_SCALED`). A method with pre-passes (``ties`` with ``scope: global``...)
gets **per-group statistics**: one instance per (block, group) observes that block's tensors
restricted to the group's members, so its "global" statistics are block-level, as the paper
applies every method block-wise. This costs ``inner prepasses`` more passes over the inputs.

**Output** (:func:`run_flexmerge`): ``<output.path>/`` holds ``flexmerge.json`` (tasks, blocks,
cosines, the merge order with storage after each merge, the deployments),
``hubmerge_recipe.yaml``, and one deployment per requested size in ``size-<s>/`` (``size-1``,
``size-1.5``, ``size-8``): see :mod:`hubmerge.deployment`. Each ``size-*`` directory is
self-contained (its recipe asks for that size only and rebuilds it exactly), ready to be pushed
as its own repo or branch. The whole output directory appears at once or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from .engine import (
    MergeInputs,
    MergeResult,
    Progress,
    ProgressCallback,
    build_group,
    compute_threads,
    copy_model_files,
    open_inputs,
    output_specs,
    plan_items,
    prefetched,
    resolve_device,
    run_prepasses,
    usable_cores,
)
from .errors import HubmergeError, MethodInputError, MethodParamError, RecipeError, UnknownMethodError
from .method import MergeMethod, TensorGroup
from .recipe import BlockRule, FlexMergeSpec, Recipe, check_recipe, raise_validation_error
from .writer import OWNER_MARKER, BackgroundWriter, FileRange, ShardedWriter, TensorSpec, check_output_path

logger = logging.getLogger(__name__)

#: Inner methods whose parameter multiplies a *sum* of task vectors: FlexMerge applies them as
#: ``lambda * mean`` (the paper's footnote 1) by dividing the parameter by the group's size, and
#: uses the paper's ``lambda`` when the recipe does not set it. ``{method: (param, default)}``.
#: A plugin may declare the same with a class attribute ``flexmerge_mean_scaled = (param, default)``.
MEAN_SCALED: dict[str, tuple[str, float]] = {"task_arithmetic": ("scale", 1.5)}

ROOT_SUMMARY = "flexmerge.json"
SIZE_DIR_PREFIX = "size-"


# -- blocks ----------------------------------------------------------------------------------------------
_LAYER = re.compile(
    r"^(?P<layer>(?:.*?\.)?(?:layer|layers|h|block|blocks|resblocks)\.\d+)\.(?P<rest>.+)$"
)
_NORM = re.compile(r"norm|^ln(_?\d+)?$|^ln_", re.IGNORECASE)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_MODULE = re.compile(r"^(mlp|ffn|feed_?forward|DenseReluDense|block_sparse_moe|moe)$", re.IGNORECASE)
_MLP_PART = re.compile(
    r"^(intermediate|output|fc\d*|c_fc|c_proj|wi(_\d+)?|wo|dense_h_to_4h|dense_4h_to_h|"
    r"gate_proj|up_proj|down_proj|gate_up_proj|experts|w\d)$",
    re.IGNORECASE,
)


def auto_block_of(name: str) -> str:
    """The default block of a tensor, from its module path.

    Inside a transformer layer (``...layer.N.``, ``layers.N``, ``h.N``, ``block.N``,
    ``resblocks.N``): each norm module is a block (``encoder.layer.0.attention.output.LayerNorm``,
    ``transformer.h.0.ln_1``), then the attention module (``encoder.layer.0.attention``,
    ``model.layers.0.self_attn``), then the MLP (its module, ``model.layers.0.mlp``, or
    ``<layer>.mlp`` when it is spread over several modules as BERT's ``intermediate`` and
    ``output``); any other sub-module of the layer is a block of its own. Outside the layers, the
    block is the tensor's module (``pooler.dense``, ``embeddings.word_embeddings``, ``lm_head``).

    Args:
        name: A tensor name of the checkpoint.

    Returns:
        The block's name.
    """
    match = _LAYER.match(name)
    if not match:
        return name.rsplit(".", 1)[0] if "." in name else name
    layer, rest = match.group("layer"), match.group("rest")
    parts = rest.split(".")
    modules = parts[:-1]
    if not modules:  # a parameter held directly by the layer (layer scale...)
        return f"{layer}.{parts[0]}"
    for pattern in (_NORM, _ATTENTION, _MLP_MODULE):
        for i, part in enumerate(modules):
            if pattern.search(part):
                return ".".join([layer, *modules[: i + 1]])
    if any(_MLP_PART.match(part) for part in modules):
        return f"{layer}.mlp"
    return f"{layer}.{modules[0]}"


@dataclass(frozen=True)
class Block:
    """A group of tensors merged together.

    Attributes:
        name: Block name.
        tensors: Its tensor names, in storage order.
        numel: Number of entries.
        nbytes: Bytes of one copy in the output dtype.
    """

    name: str
    tensors: tuple[str, ...]
    numel: int
    nbytes: int


def compile_block_rules(blocks: str | list[BlockRule], *, file: str | None = None) -> list[tuple[str, re.Pattern]] | None:
    """Compile ``flexmerge.blocks`` rules (``None`` for ``auto``).

    Args:
        blocks: ``"auto"`` or the recipe's rules.
        file: Recipe file name for errors.

    Returns:
        ``(name, compiled pattern)`` pairs, or ``None``.

    Raises:
        RecipeError: Naming ``flexmerge.blocks[i].pattern`` for an invalid regex.
    """
    if blocks == "auto":
        return None
    compiled = []
    for i, rule in enumerate(blocks):
        try:
            compiled.append((rule.name, re.compile(rule.pattern)))
        except re.error as exc:
            raise RecipeError(f"invalid regular expression {rule.pattern!r}: {exc}",
                              field=f"flexmerge.blocks[{i}].pattern", file=file) from None
        if not rule.name:
            raise RecipeError("a block needs a name", field=f"flexmerge.blocks[{i}].name", file=file)
    return compiled


def block_of_rules(name: str, rules: list[tuple[str, re.Pattern]]) -> str:
    """The block of ``name`` under regex rules: the first match (with its groups), else ``name``."""
    for block, pattern in rules:
        match = pattern.search(name)
        if match:
            groups = [g for g in match.groups() if g is not None]
            return ".".join([block, *groups])
    return name


def assign_blocks(specs: Iterable[TensorSpec], rules: list[tuple[str, re.Pattern]] | None = None) -> list[Block]:
    """Split floating tensors into blocks, in storage order of each block's first tensor.

    Args:
        specs: The floating tensors (name, shape, output dtype), in storage order.
        rules: Compiled ``flexmerge.blocks`` rules, or ``None`` for :func:`auto_block_of`.

    Returns:
        The blocks.
    """
    members: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        block = auto_block_of(spec.name) if rules is None else block_of_rules(spec.name, rules)
        members.setdefault(block, []).append(spec)
    return [Block(name, tuple(s.name for s in group), sum(math.prod(s.shape) for s in group),
                  sum(s.nbytes for s in group)) for name, group in members.items()]


# -- similarity ------------------------------------------------------------------------------------------
#: Columns per product when the Gram matrix of a large tensor is computed as a batch on CPU.
GRAM_CHUNK = 16384


def tensor_gram(deltas: torch.Tensor) -> torch.Tensor:
    """The T x T Gram matrix ``<tau_i, tau_j>`` of one tensor's task vectors, in float64.

    Products are taken in the compute dtype (at least float32) and summed in float64. On CPU a
    large tensor is cut into ``GRAM_CHUNK``-column slices multiplied as one batch: BLAS handles a
    batch of ``(T x L)(L x T)`` products 2-3 times faster than one GEMM whose inner dimension is
    millions long.

    Args:
        deltas: Shape ``(T, *shape)``.

    Returns:
        Shape ``(T, T)``, float64, on the deltas' device.
    """
    count = deltas.shape[0]
    flat = deltas.reshape(count, -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    n = flat.shape[1]
    if flat.device.type != "cpu" or n < 4 * GRAM_CHUNK:
        return torch.mm(flat, flat.t()).double()
    chunks = n // GRAM_CHUNK
    main = flat[:, : chunks * GRAM_CHUNK].reshape(count, chunks, GRAM_CHUNK).transpose(0, 1)
    gram = torch.bmm(main, main.transpose(1, 2)).sum(0, dtype=torch.float64)
    if chunks * GRAM_CHUNK < n:
        rest = flat[:, chunks * GRAM_CHUNK:]
        gram += torch.mm(rest, rest.t()).double()
    return gram


class BlockGram:
    """The similarity pre-pass, in the engine's pre-pass protocol (``observe`` / ``finish_pass``).

    :meth:`observe` returns ``{"gram:<block>": (T, T) float64}`` for one tensor (or block of its
    rows: the statistic is a sum over entries, so the engine may stream large tensors in row
    blocks); the engine (or any map-reduce) sums them, and :meth:`finish_pass` keeps the
    per-block totals.

    Args:
        block_of: Tensor name to block name, for every floating tensor.
    """

    prepasses = 1
    elementwise = True

    def __init__(self, block_of: dict[str, str]):
        self.block_of = block_of
        self.grams: dict[str, torch.Tensor] = {}

    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """This tensor's Gram matrix under its block's key."""
        return {f"gram:{self.block_of[group.name]}": tensor_gram(group.deltas)}

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Keep the summed Gram matrices by block."""
        self.grams = {key[len("gram:"):]: value.cpu() for key, value in totals.items()}


def cosines(gram: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarities from a Gram matrix (zero vectors: 1 with each other, 0 with others).

    Args:
        gram: ``(T, T)`` dot products.

    Returns:
        ``(T, T)`` float64 cosines in ``[-1, 1]``.
    """
    g = np.asarray(gram.cpu().numpy() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    zero = norms == 0
    denom = np.outer(norms, norms)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 0.0)
    cos[np.ix_(zero, zero)] = 1.0
    np.fill_diagonal(cos, 1.0)
    return np.clip(np.nan_to_num(cos, nan=0.0), -1.0, 1.0)


# -- ordering --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeStep:
    """One merge of the sequence: in ``block``, groups ``left`` and ``right`` (task indices) join.

    Attributes:
        block: Block name.
        left: The group holding the smaller task index.
        right: The other group.
        similarity: Complete-linkage similarity of the pair (min pairwise cosine).
    """

    block: str
    left: tuple[int, ...]
    right: tuple[int, ...]
    similarity: float

    @property
    def merged(self) -> tuple[int, ...]:
        """The new group's members, sorted."""
        return tuple(sorted(self.left + self.right))


def block_linkage(cos: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...], float]]:
    """Complete-linkage agglomeration of one block (highest similarity first).

    A pair's similarity is the minimum cosine over its members; ties go to the pair whose
    groups' smallest members are smallest.

    Args:
        cos: ``(T, T)`` cosines.

    Returns:
        ``T - 1`` merges ``(left, right, similarity)``, similarities non-increasing.
    """
    count = cos.shape[0]
    sim = np.array(cos, dtype=np.float64, copy=True)
    np.fill_diagonal(sim, -np.inf)
    members = {i: (i,) for i in range(count)}
    active = list(range(count))  # group representatives (smallest member), ascending
    steps = []
    for _ in range(count - 1):
        sub = sim[np.ix_(active, active)]
        flat = int(np.argmax(sub))  # first maximum in row-major order: smallest (i, j), i < j
        i, j = divmod(flat, len(active))
        a, b = active[i], active[j]
        steps.append((members[a], members[b], float(sub[i, j])))
        row = np.minimum(sim[a], sim[b])
        sim[a, :] = row
        sim[:, a] = row
        sim[a, a] = -np.inf
        sim[b, :] = -np.inf
        sim[:, b] = -np.inf
        members[a] = tuple(sorted(members[a] + members[b]))
        del members[b]
        active.remove(b)
    return steps


def merge_order(block_cosines: dict[str, np.ndarray], blocks: list[str]) -> list[MergeStep]:
    """The global FlexMerge sequence: all blocks' merges by decreasing similarity.

    Equal to the paper's greedy loop (at each step, merge the most similar pair of groups over
    all blocks): a block's merges do not change another block's similarities and complete
    linkage never increases within a block, so the per-block sequences are merged like sorted
    lists. Ties across blocks go to the earlier block.

    Args:
        block_cosines: Block name to ``(T, T)`` cosines.
        blocks: Block names in order (the tie-break).

    Returns:
        ``B * (T - 1)`` merge steps.
    """
    entries = []
    for b_index, block in enumerate(blocks):
        for s_index, (left, right, similarity) in enumerate(block_linkage(block_cosines[block])):
            entries.append((-similarity, b_index, s_index, MergeStep(block, left, right, similarity)))
    entries.sort(key=lambda e: e[:3])
    return [e[3] for e in entries]


def groups_after(order: list[MergeStep], merges: int, blocks: list[str], tasks: int) -> dict[str, list[tuple[int, ...]]]:
    """The groups of every block after the first ``merges`` steps (sorted by smallest member).

    Args:
        order: The merge sequence.
        merges: How many steps are applied.
        blocks: Block names.
        tasks: Number of tasks T.

    Returns:
        Block name to its groups (tuples of task indices).
    """
    parent = {b: list(range(tasks)) for b in blocks}

    def find(p: list[int], x: int) -> int:
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    for step in order[:merges]:
        p = parent[step.block]
        ra, rb = find(p, step.left[0]), find(p, step.right[0])
        p[max(ra, rb)] = min(ra, rb)
    result = {}
    for b in blocks:
        p = parent[b]
        groups: dict[int, list[int]] = {}
        for t in range(tasks):
            groups.setdefault(find(p, t), []).append(t)
        result[b] = sorted(tuple(g) for g in groups.values())
    return result


# -- storage ---------------------------------------------------------------------------------------------
class StorageModel:
    """How many bytes a block's groups cost in a deployment (the paper's Table 1).

    Subclass and override :meth:`block_bytes` for methods that store more than one tensor per
    group (masks, rescalers, the pre-trained weights).
    """

    #: A short description for summaries.
    name = "one tensor per group"

    def block_bytes(self, block: Block, group_sizes: list[int]) -> int:
        """Bytes stored for ``block`` when its tasks form groups of ``group_sizes``.

        Args:
            block: The block (bytes and entries of one copy).
            group_sizes: Sizes of its groups (they sum to T).

        Returns:
            Bytes.
        """
        return len(group_sizes) * block.nbytes


class MaskedStorage(StorageModel):
    """Table 1's CONSENSUS / EMR row: ``theta_pre``, ``tau_uni`` and a bit mask per task.

    A group of more than ``min_masked`` tasks stores its unified task vector, one bit per entry
    and member (and ``scalar_bytes`` per member: EMR's rescaler), plus the block's pre-trained
    weights once; smaller groups keep their experts' weights (the reference implementation's
    rule: masking pays off only beyond two tasks).

    Args:
        scalar_bytes: Bytes of the per-task scalar (4 for EMR, 0 for TALL / CONSENSUS masks).
        min_masked: Largest group kept as plain experts.
    """

    name = "masked (pre-trained + unified + per-task bit masks)"

    def __init__(self, scalar_bytes: int = 0, min_masked: int = 2):
        self.scalar_bytes = scalar_bytes
        self.min_masked = min_masked

    def block_bytes(self, block: Block, group_sizes: list[int]) -> int:
        """Plain groups: one copy per member; masked groups: unified + masks; pre-trained once."""
        mask = -(-block.numel // 8)
        total = 0
        masked = False
        for size in group_sizes:
            if size <= self.min_masked:
                total += size * block.nbytes
            else:
                masked = True
                total += block.nbytes + size * (mask + self.scalar_bytes)
        return total + (block.nbytes if masked else 0)


def storage_curve(order: list[MergeStep], blocks: list[Block], tasks: int, fixed_bytes: int,
                  model: StorageModel | None = None) -> list[int]:
    """Storage in bytes after each prefix of the merge sequence.

    Args:
        order: The merge sequence.
        blocks: The blocks.
        tasks: T.
        fixed_bytes: Bytes stored once whatever the size (non-floating tensors).
        model: Storage model (default: one tensor per group).

    Returns:
        ``len(order) + 1`` values: before any merge, after one, ...
    """
    model = model or StorageModel()
    by_name = {b.name: b for b in blocks}
    sizes = {b.name: [1] * tasks for b in blocks}
    cost = {b.name: model.block_bytes(b, sizes[b.name]) for b in blocks}
    total = fixed_bytes + sum(cost.values())
    curve = [total]
    for step in order:
        group_sizes = sizes[step.block]
        group_sizes.remove(len(step.left))
        group_sizes.remove(len(step.right))
        group_sizes.append(len(step.left) + len(step.right))
        new = model.block_bytes(by_name[step.block], group_sizes)
        total += new - cost[step.block]
        cost[step.block] = new
        curve.append(total)
    return curve


# -- sizes -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestedSize:
    """A requested deployment size, in model-equivalents."""

    value: Fraction
    label: str
    raw: int | str

    @property
    def directory(self) -> str:
        """The deployment's directory name (``size-1.5``)."""
        return SIZE_DIR_PREFIX + self.label


def size_label(value: Fraction) -> str:
    """``2`` for 2, ``1.5`` for 3/2, 6 significant digits for the rest."""
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".6g")


def parse_sizes(sizes: str | list[int | str], tasks: int, *, file: str | None = None) -> list[RequestedSize]:
    """Parse ``flexmerge.sizes``: ``all`` (1, 2, ..., T) or ints, ``"1.5"``, ``"1.5x"``, ``"3/2"``.

    Args:
        sizes: The recipe's value.
        tasks: T, the largest size.
        file: Recipe file name for errors.

    Returns:
        The sizes in the recipe's order.

    Raises:
        RecipeError: Naming ``flexmerge.sizes[i]`` for a malformed, out-of-range or repeated size.
    """
    if sizes == "all":
        return [RequestedSize(Fraction(n), str(n), n) for n in range(1, tasks + 1)]
    if not sizes:
        raise RecipeError("give at least one size (or `all`)", field="flexmerge.sizes", file=file)
    result: list[RequestedSize] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(sizes):
        where = f"flexmerge.sizes[{i}]"
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = Fraction(raw) if isinstance(raw, int) else Fraction(str(raw).strip().rstrip("xX").strip())
        except (ValueError, ZeroDivisionError):
            raise RecipeError(f"not a size: {raw!r} (use a number of model-equivalents such as 2, "
                              "\"1.5\" or \"1.5x\")", field=where, file=file) from None
        if not 1 <= value <= tasks:
            raise RecipeError(f"size {raw!r} is outside [1, {tasks}] (1 = one merged model, {tasks} = every "
                              "expert kept)", field=where, file=file)
        label = size_label(value)
        if label in seen:
            raise RecipeError(f"size {raw!r} repeats sizes[{seen[label]}]", field=where, file=file)
        seen[label] = i
        result.append(RequestedSize(value, label, raw))
    return result


def merges_for_budget(curve: list[int], budget: Fraction, model_bytes: int) -> int | None:
    """The fewest merges whose storage is within ``budget`` model-equivalents (``None``: never).

    Args:
        curve: :func:`storage_curve`.
        budget: Size in model-equivalents.
        model_bytes: Bytes of one model.

    Returns:
        The number of merges to apply, or ``None`` if even the full sequence exceeds the budget.
    """
    for merges, stored in enumerate(curve):
        if stored * budget.denominator <= budget.numerator * model_bytes:
            return merges
    return None


# -- the inner method ------------------------------------------------------------------------------------
@dataclass
class InnerMethod:
    """The method merging each group, with its resolved parameters.

    Attributes:
        cls: The method class.
        params: Validated parameters (JSON-able, defaults filled in; for a mean-scaled method the
            parameter is the paper's lambda).
        mean_param: The parameter divided by the group size (``scale`` for task arithmetic), or
            ``None``.
    """

    cls: type[MergeMethod]
    params: dict[str, Any]
    mean_param: str | None = None

    @property
    def name(self) -> str:
        """The method's registered name."""
        return self.cls.name

    def make(self, group_size: int) -> MergeMethod:
        """A fresh instance for a group of ``group_size`` tasks."""
        params = dict(self.params)
        if self.mean_param is not None:
            params[self.mean_param] = params[self.mean_param] / group_size
        return self.cls(params)


def resolve_inner(spec: FlexMergeSpec, tasks: int, dtype: torch.dtype, *, file: str | None = None) -> InnerMethod:
    """Look up and check ``flexmerge.inner`` / ``inner_params`` before any work.

    Args:
        spec: The recipe's ``flexmerge`` section.
        tasks: T (groups hold 2 to T tasks).
        dtype: Compute dtype.
        file: Recipe file name for errors.

    Returns:
        The :class:`InnerMethod`.

    Raises:
        RecipeError: Unknown method, a per-task (deployment) method, bad parameters
            (``flexmerge.inner_params.<field>``), or a method that cannot merge groups of 2..T.
    """
    from .plugins import get_method

    try:
        cls = get_method(spec.inner)
    except UnknownMethodError as exc:
        raise RecipeError(str(exc), field="flexmerge.inner", file=file) from None
    if cls.output != "model":
        raise RecipeError(f"method {cls.name!r} produces per-task outputs; FlexMerge merges its groups with a "
                          "single-output method", field="flexmerge.inner", file=file)
    if cls.needs_data:
        raise RecipeError(f"method {cls.name!r} learns from samples over the whole model; FlexMerge merges its "
                          "groups with a data-free method", field="flexmerge.inner", file=file)
    mean = getattr(cls, "flexmerge_mean_scaled", None) or MEAN_SCALED.get(cls.name)
    if mean is not None and mean[0] not in cls.Params.model_fields:
        raise RecipeError(f"method {cls.name!r} has no parameter {mean[0]!r} to scale by the group size",
                          field="flexmerge.inner", file=file)
    params = dict(spec.inner_params)
    if mean is not None and mean[0] not in params:
        params[mean[0]] = mean[1]
    try:
        validated = cls.Params.model_validate(params)
    except ValidationError as exc:
        raise_validation_error(exc, file=file, prefix=("flexmerge", "inner_params"))
    inner = InnerMethod(cls, validated.model_dump(mode="json"), mean[0] if mean is not None else None)
    try:
        for size in range(2, tasks + 1):
            method = inner.make(size)
            method.check_experts(size)
            method.check_dtype(dtype)
    except MethodParamError as exc:
        raise RecipeError(str(exc), field=f"flexmerge.inner_params.{exc.field}", file=file) from None
    except (MethodInputError, ValidationError) as exc:
        raise RecipeError(f"FlexMerge groups hold 2 to {tasks} experts: {exc}", field="flexmerge.inner",
                          file=file) from None
    return inner


def check_flexmerge(recipe: Recipe, *, file: str | None = None
                    ) -> tuple[InnerMethod, list[RequestedSize], list[tuple[str, re.Pattern]] | None]:
    """Check a recipe's ``flexmerge`` section without reading any model (for ``validate`` too).

    Args:
        recipe: A schema-valid recipe.
        file: Recipe file name for errors.

    Returns:
        ``(inner method, requested sizes, compiled block rules or None)``.

    Raises:
        RecipeError: Naming the field at fault (``flexmerge.sizes[1]``, ``flexmerge.blocks[0].pattern``...).
    """
    if recipe.flexmerge is None:
        raise RecipeError("the recipe has no `flexmerge` section", field="flexmerge", file=file)
    if recipe.output.format != "model":
        raise RecipeError("FlexMerge writes deployments of full tensors; `output.format: adapter` is not supported",
                          field="output.format", file=file)
    spec = recipe.flexmerge
    tasks = len(recipe.experts)
    inner = resolve_inner(spec, tasks, getattr(torch, recipe.dtype), file=file)
    return inner, parse_sizes(spec.sizes, tasks, file=file), compile_block_rules(spec.blocks, file=file)


# -- planning --------------------------------------------------------------------------------------------
@dataclass
class DeploymentPlan:
    """One requested size, resolved.

    Attributes:
        size: The request.
        merges: Merges applied (a prefix of the sequence).
        groups: Block name to its groups.
        storage_bytes: Bytes the deployment stores.
        model_bytes: Bytes of one model.
        path: Where the deployment was written (after the run).
    """

    size: RequestedSize
    merges: int
    groups: dict[str, list[tuple[int, ...]]]
    storage_bytes: int
    model_bytes: int
    path: Path | None = None

    @property
    def model_equivalents(self) -> float:
        """Storage in model-equivalents."""
        return self.storage_bytes / self.model_bytes if self.model_bytes else 0.0


def plan_sizes(sizes: list[RequestedSize], order: list[MergeStep], blocks: list[Block], tasks: int,
               fixed_bytes: int, model_bytes: int, storage: StorageModel | None = None,
               *, file: str | None = None) -> tuple[list[int], list[DeploymentPlan]]:
    """Map each requested size to a prefix of the merge sequence.

    Args:
        sizes: Requested sizes.
        order: The merge sequence.
        blocks: The blocks.
        tasks: T.
        fixed_bytes: Bytes stored once in every deployment (non-floating tensors).
        model_bytes: Bytes of one model.
        storage: Storage model (default: one tensor per group).
        file: Recipe file name for errors.

    Returns:
        ``(curve, plans)``: storage after each prefix, and one plan per size.

    Raises:
        RecipeError: If a size is below the smallest deployment the storage model allows.
    """
    curve = storage_curve(order, blocks, tasks, fixed_bytes, storage)
    names = [b.name for b in blocks]
    plans = []
    for i, size in enumerate(sizes):
        merges = merges_for_budget(curve, size.value, model_bytes)
        if merges is None:
            smallest = min(curve) / model_bytes
            raise RecipeError(f"size {size.raw!r} is below the smallest deployment ({smallest:.3f} models)",
                              field=f"flexmerge.sizes[{i}]", file=file)
        plans.append(DeploymentPlan(size, merges, groups_after(order, merges, names, tasks), curve[merges],
                                    model_bytes))
    return curve, plans


def tensor_key(name: str, members: tuple[int, ...]) -> str:
    """The stored key of a group's merged tensor: ``<name>@<task indices joined by '.'>``."""
    return f"{name}@{'.'.join(str(m) for m in members)}"


def deployment_layout(plan: DeploymentPlan, specs: list[TensorSpec], block_of: dict[str, str],
                      tasks: list[str]) -> tuple[list[TensorSpec], dict[str, dict[str, str]]]:
    """The stored tensors of a deployment and each task's view of them.

    Every tensor is stored once per group of its block under :func:`tensor_key` (groups in order
    of their smallest member); a tensor in no block (non-floating) once, under its own name.

    Args:
        plan: The size's plan (its groups per block).
        specs: The checkpoint's tensors in storage order (output dtype).
        block_of: Tensor name to block, for the merged tensors.
        tasks: Task names.

    Returns:
        ``(stored specs in write order, task -> weight name -> stored key)``.
    """
    stored: list[TensorSpec] = []
    views: dict[str, dict[str, str]] = {t: {} for t in tasks}
    for spec in specs:
        if spec.name not in block_of:
            stored.append(spec)
            for t in tasks:
                views[t][spec.name] = spec.name
            continue
        for members in plan.groups[block_of[spec.name]]:
            key = tensor_key(spec.name, members)
            stored.append(TensorSpec(key, spec.shape, spec.dtype))
            for m in members:
                views[tasks[m]][spec.name] = key
    return stored, views


def deployment_sources(plan: DeploymentPlan, specs: list[TensorSpec], block_of: dict[str, str]
                       ) -> list[tuple[str, str, tuple[int, ...]]]:
    """What each stored tensor of :func:`deployment_layout` is made of, in the same order.

    Returns:
        Per stored tensor ``(weight name, block, members)``; a tensor in no block (stored as is,
        from the base) has block ``""`` and no members.
    """
    sources: list[tuple[str, str, tuple[int, ...]]] = []
    for spec in specs:
        if spec.name not in block_of:
            sources.append((spec.name, "", ()))
            continue
        block = block_of[spec.name]
        sources += [(spec.name, block, members) for members in plan.groups[block]]
    return sources


# -- running ---------------------------------------------------------------------------------------------
@dataclass
class FlexMergeResult:
    """What :func:`run_flexmerge` wrote.

    Attributes:
        output_dir: The output directory (holding ``size-*`` deployments).
        recipe: The recipe.
        inner: The method used inside groups.
        tasks: Task names (the experts' labels), in recipe order.
        blocks: The blocks.
        order: The full merge sequence.
        storage_curve: Bytes stored after each prefix of ``order``.
        deployments: One plan per requested size, with its path.
        model_bytes: Bytes of one model (the unit of size).
        cosines: Block name to its ``(T, T)`` cosines.
        device: Compute device.
        seconds: Wall time.
        bytes_read: Bytes read from the inputs over all passes.
        timings: Seconds per stage: ``similarity``, ``order``, ``prepasses``, ``write`` (the write
            pass, of which ``write_merge`` computing the groups and ``write_io`` writing them).
        base: The base as resolved (:class:`~hubmerge.sources.ResolvedModel`, for cards).
        experts: The experts as resolved, in recipe order.
        executor: With a unit runner (``--executor ray``): the runner, the units, each deployment
            shard's sha256 and seconds, the hosts, dead attempts removed (empty for a local run).
    """

    output_dir: Path
    recipe: Recipe
    inner: InnerMethod
    tasks: list[str]
    blocks: list[Block]
    order: list[MergeStep]
    storage_curve: list[int]
    deployments: list[DeploymentPlan]
    model_bytes: int
    cosines: dict[str, np.ndarray]
    device: str
    seconds: float = 0.0
    bytes_read: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    storage_model: str = StorageModel.name
    base: Any = None
    experts: list[Any] = field(default_factory=list)
    executor: dict[str, Any] = field(default_factory=dict)

    def storage_table(self) -> list[dict[str, Any]]:
        """Per size: label, merges, bytes and model-equivalents (for printing)."""
        return [{"size": p.size.label, "merges": p.merges, "bytes": p.storage_bytes,
                 "model_equivalents": round(p.model_equivalents, 6), "path": str(p.path)} for p in self.deployments]


def _stage(progress: ProgressCallback | None, name: str) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda event: progress(Progress(name, event.tensors_done, event.tensors_total, event.bytes_done,
                                           event.bytes_total))


def _run_group_prepasses(instances: dict[tuple[str, tuple[int, ...]], MergeMethod], inputs: MergeInputs,
                         floating: list[str], block_of: dict[str, str], device: torch.device, dtype: torch.dtype,
                         progress: ProgressCallback | None) -> int:
    """Stream the inner method's pre-passes with per-group statistics; return the passes run.

    A group's statistics come from its block's tensors restricted to its members; they are
    finished (and their sums dropped) as soon as the block's last tensor went by.
    """
    passes = max((m.prepasses for m in instances.values()), default=0)
    by_block: dict[str, list[tuple[tuple[int, ...], MergeMethod]]] = {}
    for (block, members), method in instances.items():
        by_block.setdefault(block, []).append((members, method))
    elementwise = all(m.elementwise for m in instances.values())
    for pass_index in range(passes):
        wanted = {b for b, groups in by_block.items() if any(m.prepasses > pass_index for _, m in groups)}
        names = [n for n in floating if block_of[n] in wanted]
        last = {block_of[n]: n for n in names}
        totals: dict[tuple[str, tuple[int, ...]], dict[str, torch.Tensor]] = {}
        done_bytes = done_tensors = 0
        stage = f"inner prepass {pass_index + 1}/{passes}"
        items = plan_items(inputs, names, elementwise=elementwise, dtype=dtype)
        for fetched in prefetched(inputs, items, pooled_dtype=dtype if device.type == "cpu" else None):
            group = build_group(inputs, fetched, device, dtype)
            block = block_of[fetched.name]
            for members, method in by_block[block]:
                if method.prepasses <= pass_index:
                    continue
                sub = TensorGroup(group.name, group.base, group.deltas[list(members)],
                                  [group.experts[i] for i in members], rows=group.rows)
                sums = totals.setdefault((block, members), {})
                for key, value in method.observe(pass_index, sub).items():
                    sums[key] = sums[key] + value if key in sums else value.clone()
            if fetched.item.last and last[block] == fetched.name:
                for members, method in by_block[block]:
                    if method.prepasses > pass_index:
                        method.finish_pass(pass_index, totals.pop((block, members), {}))
            del group
            done_bytes += fetched.nbytes
            done_tensors += fetched.item.last
            if progress:
                progress(Progress(stage, done_tensors, len(names), done_bytes, inputs.bytes_per_pass))
    return passes


class GroupStatistics:
    """The inner method's per-group pre-passes as one object of the engine's pre-pass protocol.

    The map-reduce form of :func:`_run_group_prepasses` (for a distributed run, whose pre-passes
    are sums over units reduced on the driver): :meth:`observe` returns every group's statistics
    for one tensor (or block of rows) under ``g<i>:<key>`` (``i`` numbers the (block, group)
    instances), and :meth:`finish_pass` hands each instance its own totals. Every group's sums
    get the same additions in the same order as in :func:`_run_group_prepasses`, so the
    finished statistics are bit-identical.

    Args:
        instances: ``(block, members)`` to the group's method instance.
        block_of: Tensor name to block.
    """

    name = "flexmerge inner pre-passes"

    def __init__(self, instances: dict[tuple[str, tuple[int, ...]], MergeMethod], block_of: dict[str, str]):
        self.block_of = block_of
        self.groups = [(block, members, method) for (block, members), method in instances.items()
                       if method.prepasses > 0]
        self.by_block: dict[str, list[int]] = {}
        for index, (block, _, _) in enumerate(self.groups):
            self.by_block.setdefault(block, []).append(index)
        self.prepasses = max((m.prepasses for _, _, m in self.groups), default=0)
        self.elementwise = all(m.elementwise for m in instances.values())

    def observe(self, pass_index: int, group: TensorGroup) -> dict[str, torch.Tensor]:
        """Each group's statistics of this tensor, restricted to the group's members."""
        out: dict[str, torch.Tensor] = {}
        for index in self.by_block.get(self.block_of.get(group.name, ""), ()):
            _, members, method = self.groups[index]
            if method.prepasses <= pass_index:
                continue
            sub = TensorGroup(group.name, group.base, group.deltas[list(members)],
                              [group.experts[i] for i in members], rows=group.rows)
            for key, value in method.observe(pass_index, sub).items():
                out[f"g{index}:{key}"] = value
        return out

    def finish_pass(self, pass_index: int, totals: dict[str, torch.Tensor]) -> None:
        """Finish pass ``pass_index`` of every group that has it, with its own totals."""
        split: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in totals.items():
            index, _, own = key[1:].partition(":")
            split.setdefault(int(index), {})[own] = value
        for index, (_, _, method) in enumerate(self.groups):
            if method.prepasses > pass_index:
                method.finish_pass(pass_index, split.get(index, {}))


#: Bytes of one block of a group's task vectors (and its base) in :meth:`_GroupMerger._merge_blocks`:
#: small enough to stay in a core's cache between building the task vectors and merging them.
GROUP_BLOCK_BYTES = 2 * 1024 * 1024


class _GroupMerger:
    """The write pass's maths for one tensor: each needed group's output, each computed once.

    A group of one full fine-tune is the expert's own tensor (exact); other groups get their
    members' task vectors, built in a reused buffer, merged by the group's method instance.
    """

    def __init__(self, inputs: MergeInputs, instances: dict[tuple[str, tuple[int, ...]], MergeMethod],
                 method_name: str, device: torch.device, dtype: torch.dtype, *, copy_ranges: bool = False):
        from .sources import FullExpert

        self.inputs = inputs
        self.instances = instances
        self.method_name = method_name
        self.device = device
        self.dtype = dtype
        self.tasks = [e.label for e in inputs.experts]
        self.full = [isinstance(e, FullExpert) for e in inputs.experts]
        self.copy_ranges = copy_ranges  # the writer copies file ranges (:meth:`stored_range`)
        self.scratch, self.base_copy = _Scratch(), _Scratch()
        self._block_scratch = threading.local()  # each thread's buffers for _merge_blocks

    def stored_range(self, name: str, i: int, spec: TensorSpec) -> FileRange | None:
        """Expert ``i``'s stored bytes of ``name`` when a group of it alone can keep them as they
        are (a full fine-tune stored in the output's dtype) and the writer copies file ranges,
        else ``None``."""
        if not (self.copy_ranges and self.full[i]):
            return None
        meta = self.inputs.experts[i].checkpoint.meta.get(name)
        if meta is None or meta.dtype != spec.dtype or tuple(meta.shape) != spec.shape:
            return None
        return FileRange(meta.file, meta.offset, meta.nbytes, tuple(meta.shape), meta.dtype)

    def reads(self, name: str, needed: list[tuple[int, ...]], spec: TensorSpec) -> set[int]:
        """The experts whose tensor ``name`` must be read: members of the needed groups, except
        experts alone in their group whose stored bytes are copied (:meth:`stored_range`)."""
        return {i for members in needed for i in members
                if len(members) > 1 or self.stored_range(name, i, spec) is None}

    def _each_group(self, fn: Callable[[tuple[int, ...]], torch.Tensor],
                    groups: list[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
        """``{g: fn(g)}``, the groups spread over the usable cores (each group has its own method
        instance and buffers, so the results are those of a sequential loop)."""
        if len(groups) <= 1 or self.device.type != "cpu" or usable_cores() <= 1:
            return {g: fn(g) for g in groups}
        pool = _group_pool()
        futures = {g: pool.submit(fn, g) for g in groups[1:]}
        first = fn(groups[0])  # the calling thread works too
        return {groups[0]: first, **{g: f.result() for g, f in futures.items()}}

    def outputs(self, fetched: Any, block: str, needed: list[tuple[int, ...]],
                spec: TensorSpec) -> dict[tuple[int, ...], torch.Tensor | FileRange]:
        """Group members to the CPU tensor (output dtype) to store, or to the stored bytes of an
        expert alone in its group (:meth:`stored_range`; such experts were not read)."""
        name = fetched.name
        users = [m for m in needed if len(m) > 1 or not self.full[m[0]]]
        base = fetched.base.to(device=self.device, dtype=self.dtype) if users else None
        outputs: dict[tuple[int, ...], torch.Tensor] = {}
        blocked = [m for m in users if len(m) > 1 and self._in_blocks(fetched, block, m, base)]
        merged_in_blocks = self._each_group(lambda m: self._merge_blocks(fetched, block, m, base), blocked)
        for members in needed:
            if members not in users:  # the expert's own tensor, bit for bit
                i = members[0]
                stored = self.stored_range(name, i, spec)
                if stored is not None:
                    outputs[members] = stored
                    continue
                merged = fetched.payload(i)
            elif members in merged_in_blocks:
                merged = merged_in_blocks[members]
            else:
                deltas = _member_deltas(self.inputs, fetched, base, members, self.scratch)
                if len(members) == 1:
                    merged = base + deltas[0]
                else:  # a method may work in place: only the last user gets the shared base
                    own = base if members == users[-1] else \
                        self.base_copy.take(base.shape, base.dtype, base.device).copy_(base)
                    group = TensorGroup(name, own, deltas, [self.tasks[i] for i in members])
                    merged = self.instances[(block, members)].merge_tensor(group)
                    if tuple(merged.shape) != spec.shape:
                        raise HubmergeError(f"method {self.method_name!r} returned shape {list(merged.shape)} "
                                            f"for {name!r}, expected {list(spec.shape)}")
                    if self.scratch.owns(merged) or self.base_copy.owns(merged):
                        merged = merged.clone()  # a view of our reused buffers
                del deltas
            out = merged.to(device="cpu", dtype=spec.dtype)
            if fetched.pool is not None and fetched.pool.owns(out):
                out = out.clone()  # a view of a reused read buffer: the writer thread may still hold it
            outputs[members] = out
        return outputs

    def _in_blocks(self, fetched: Any, block: str, members: tuple[int, ...], base: torch.Tensor) -> bool:
        """Whether a group merges block by block of rows (:meth:`_merge_blocks`): an element-wise
        method, a tensor larger than one block, and members that are full fine-tunes whose weights
        are already in the compute dtype and device."""
        if not self.instances[(block, members)].elementwise or base.dim() == 0 or base.shape[0] < 2:
            return False
        if base.numel() * base.element_size() * (len(members) + 1) <= GROUP_BLOCK_BYTES:
            return False
        for i in members:
            weight = fetched.payload(i)
            if not (self.full[i] and isinstance(weight, torch.Tensor) and weight.dtype == base.dtype
                    and weight.device == base.device and weight.shape == base.shape):
                return False
        return True

    def _merge_blocks(self, fetched: Any, block: str, members: tuple[int, ...], base: torch.Tensor) -> torch.Tensor:
        """An element-wise group's merge, computed over blocks of rows small enough to stay in cache.

        The members' task vectors of one block are built in a small scratch and merged at once,
        instead of writing every task vector of the tensor to memory and reading it back; the
        method sees each block as a :class:`TensorGroup` with ``rows`` (as the engine streams
        large tensors), so the values are those of merging the whole tensor.
        """
        method = self.instances[(block, members)]
        rows = base.shape[0]
        row_bytes = max(1, base[0].numel() * base.element_size())
        step = max(1, min(rows, GROUP_BLOCK_BYTES // (row_bytes * (len(members) + 1))))
        weights = [fetched.payload(i) for i in members]
        buffers = self._block_scratch
        if not hasattr(buffers, "deltas"):
            buffers.deltas, buffers.base = _Scratch(), _Scratch()
        deltas = buffers.deltas.take((len(members), step, *base.shape[1:]), base.dtype, base.device)
        own = buffers.base.take((step, *base.shape[1:]), base.dtype, base.device)
        merged = torch.empty_like(base)
        labels = [self.tasks[i] for i in members]
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            width = stop - start
            block_base = own[:width].copy_(base[start:stop])  # a method may change its base in place
            block_deltas = deltas[:, :width]
            for row, weight in enumerate(weights):
                torch.sub(weight[start:stop], base[start:stop], out=block_deltas[row])
            result = method.merge_tensor(TensorGroup(fetched.name, block_base, block_deltas, labels,
                                                     rows=(start, stop)))
            if tuple(result.shape) != tuple(block_base.shape):
                raise HubmergeError(f"method {self.method_name!r} returned shape {list(result.shape)} for rows "
                                    f"{start}:{stop} of {fetched.name!r}, expected {list(block_base.shape)}")
            merged[start:stop].copy_(result)
        return merged


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _group_pool() -> ThreadPoolExecutor:
    """The worker threads of :meth:`_GroupMerger._each_group`, started once per process (a pool
    of its own: the methods it runs may use the sparsifying methods' pool inside)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, usable_cores() - 1), thread_name_prefix="hubmerge-groups")
        return _pool


class _Scratch:
    """A grow-only buffer reused from tensor to tensor.

    Large fresh CPU allocations are fresh pages that the kernel must fault in and zero, which
    costs more than the arithmetic on them; the write pass builds each group's task vectors in
    here instead.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffer
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.buffer = buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the buffer (a method returned a view of its inputs)."""
        return self.buffer is not None and tensor.untyped_storage().data_ptr() == \
            self.buffer.untyped_storage().data_ptr()


def _member_deltas(inputs: MergeInputs, fetched: Any, base: torch.Tensor, members: tuple[int, ...],
                   scratch: _Scratch | None = None) -> torch.Tensor:
    """The task vectors of ``members`` only (like :func:`~hubmerge.engine.build_group` for a subset)."""
    from .sources import FullExpert

    shape = (len(members), *base.shape)
    if scratch is not None:
        deltas = scratch.take(shape, base.dtype, base.device)
    else:
        deltas = torch.empty(shape, device=base.device, dtype=base.dtype)
    for row, i in enumerate(members):
        payload = fetched.payload(i)
        if (isinstance(payload, torch.Tensor) and isinstance(inputs.experts[i], FullExpert)
                and payload.dtype == base.dtype and payload.device == base.device):
            torch.sub(payload, base, out=deltas[row])  # one sweep instead of copy then subtract
        elif payload is None or not inputs.experts[i].task_vector_into(fetched.name, payload, base, deltas[row]):
            deltas[row].zero_()
    return deltas


def _resolved_recipe(recipe: Recipe, inner: InnerMethod, sizes: Any) -> Recipe:
    spec = recipe.flexmerge.model_copy(update={"sizes": sizes, "inner_params": dict(inner.params)})
    return recipe.model_copy(update={"flexmerge": spec})


def _model_class(base_dir: Path) -> str | None:
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        architectures = config.get("architectures") or []
        return architectures[0] if architectures else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_pass(inputs: MergeInputs, names: list[str], plans: list[DeploymentPlan], writers: list[Any],
                merger: _GroupMerger, spec_of: dict[str, TensorSpec], block_of: dict[str, str],
                device: torch.device, dtype: torch.dtype, progress: ProgressCallback | None) -> tuple[float, float]:
    """Stream every tensor once and hand each deployment its stored tensors, in plan order.

    Writing runs on a :class:`~hubmerge.writer.BackgroundWriter` thread (one for all sizes), so
    it overlaps reading and merging the next tensors.

    Returns:
        Seconds spent merging, and seconds the merge loop waited for the writer.
    """
    pooled = dtype if device.type == "cpu" else None  # experts read into reused buffers
    t_compute = t_io = 0.0
    done_bytes = 0
    # every size's groups of each block, each computed once per tensor
    needed = {block: sorted({m for plan in plans for m in plan.groups[block]}) for block in set(block_of.values())}

    def experts_for(name: str) -> set[int]:
        block = block_of.get(name)
        return set() if block is None else merger.reads(name, needed[block], spec_of[name])

    background = BackgroundWriter([w.sharded for w in writers])
    try:
        with compute_threads(device):
            for count, fetched in enumerate(prefetched(inputs, names, pooled_dtype=pooled,
                                                       experts_for=experts_for), 1):
                name = fetched.name
                s = spec_of[name]
                t1 = time.perf_counter()
                if name not in block_of:
                    outputs = {(): fetched.base.to(s.dtype)}
                    keys = [[(name, ())] for _ in plans]
                else:
                    block = block_of[name]
                    outputs = merger.outputs(fetched, block, needed[block], s)
                    keys = [[(tensor_key(name, m), m) for m in plan.groups[block]] for plan in plans]
                t2 = time.perf_counter()
                for index, plan_keys in enumerate(keys):
                    for key, members in plan_keys:
                        background.write(key, outputs[members], to=index)
                t_compute += t2 - t1
                t_io += time.perf_counter() - t2
                del outputs
                done_bytes += fetched.nbytes
                if progress:
                    progress(Progress("write", count, len(names), done_bytes, inputs.bytes_per_pass))
                del fetched  # its buffers are free before the next item is read
    except BaseException:
        background.cancel()
        raise
    t2 = time.perf_counter()
    background.close()
    return t_compute, t_io + time.perf_counter() - t2


def run_flexmerge(recipe: Recipe, *, output: str | Path | None = None, device: str | None = None,
                  overwrite: bool = False, token: str | None = None, progress: ProgressCallback | None = None,
                  file: str | None = None, storage: StorageModel | None = None,
                  runner: Any = None) -> FlexMergeResult:
    """Run a recipe with a ``flexmerge`` section: one deployment per requested size.

    Passes over the inputs: one for the similarities, the inner method's pre-passes (if any,
    with per-group statistics), and one that writes every size at once (a group shared by
    several sizes is merged once).

    With a ``runner`` (:class:`~hubmerge.distributed.RayRunner`, or
    :class:`~hubmerge.distributed.LocalRunner`) the passes run as units on it (see
    :mod:`hubmerge.distributed`): the similarity and inner pre-passes as map-reduces over
    output-shard-sized units, the ordering and planning here, and the write pass as one unit per
    shard of each deployment (a worker merges its shard's groups and writes the shard); the
    driver assembles manifests, indexes and recipes and commits the output atomically. The
    files are byte-identical to a local run's. A group shared by several sizes is then merged
    once per size that stores it in another shard.

    Args:
        recipe: A schema-valid recipe with ``flexmerge``.
        output: Output directory (overrides ``output.path``); deployments go to ``size-<s>/``.
        device: Compute device (overrides ``recipe.device``).
        overwrite: Replace an existing output directory that hubmerge did not write.
        token: Hub token for private inputs.
        progress: Called with :class:`~hubmerge.engine.Progress` per tensor and stage.
        file: Recipe file name for errors.
        storage: Storage model (default: one tensor per group).
        runner: Where the passes run (default: here, streaming; see above).

    Returns:
        A :class:`FlexMergeResult` with the merge order and per-size storage.

    Raises:
        RecipeError: Bad recipe (``flexmerge`` fields with their paths, method, output), before
            any input is read.
        HubmergeError: Input or output problems; on failure nothing is left at the output path.
    """
    from .deployment import DeploymentWriter, StagedDirectory
    from .lineage import resolved_recipe_yaml

    started = time.perf_counter()
    inner, sizes, rules = check_flexmerge(recipe, file=file)
    spec = recipe.flexmerge
    top_method = check_recipe(recipe, file=file)
    tasks_count = len(recipe.experts)
    compute_dtype = getattr(torch, recipe.dtype)
    out_dtype = getattr(torch, recipe.output.dtype) if recipe.output.dtype else None
    target = Path(output or recipe.output.path or "")
    if not str(target) or str(target) == ".":
        raise RecipeError("no output directory (set output.path or pass --output)", field="output.path", file=file)
    check_output_path(target.absolute(), overwrite=overwrite)
    prepass: Any = run_prepasses
    if runner is None:
        compute_device = resolve_device(device or recipe.device)
    else:  # workers compute: the driver does not need the device itself
        from .distributed import make_prepass_runner

        run_device = getattr(runner, "device", "") or device or recipe.device
        compute_device = torch.device(run_device) if getattr(runner, "device", "") else resolve_device(run_device)
        prepass = make_prepass_runner(runner, unit_bytes=recipe.output.shard_size)
    timings: dict[str, float] = {}

    inputs = open_inputs(recipe, token=token)
    staged = None
    writers: list[DeploymentWriter] = []
    try:
        tasks = [e.label for e in inputs.experts]
        names = inputs.base_checkpoint.names()
        meta = inputs.base_checkpoint.meta
        all_specs = output_specs(inputs.base_checkpoint, out_dtype)
        spec_of = {s.name: s for s in all_specs}
        floating = [n for n in names if meta[n].dtype.is_floating_point]
        blocks = assign_blocks([spec_of[n] for n in floating], rules)
        block_of = {t: b.name for b in blocks for t in b.tensors}
        model_bytes = sum(s.nbytes for s in all_specs)
        fixed_bytes = model_bytes - sum(b.nbytes for b in blocks)

        # 1. similarities (one streaming pass)
        t0 = time.perf_counter()
        gram = BlockGram(block_of)
        prepass(gram, inputs, names, compute_device, compute_dtype, _stage(progress, "similarity"))
        block_cos = {b.name: cosines(gram.grams[b.name]) for b in blocks}
        timings["similarity"] = time.perf_counter() - t0

        # 2. order and sizes
        t0 = time.perf_counter()
        order = merge_order(block_cos, [b.name for b in blocks])
        curve, plans = plan_sizes(sizes, order, blocks, tasks_count, fixed_bytes, model_bytes, storage, file=file)
        timings["order"] = time.perf_counter() - t0

        # 3. one instance per (block, group) that some size uses; per-group pre-passes
        t0 = time.perf_counter()
        instances: dict[tuple[str, tuple[int, ...]], MergeMethod] = {}
        for plan in plans:
            for block, groups in plan.groups.items():
                for members in groups:
                    if len(members) > 1 and (block, members) not in instances:
                        instances[(block, members)] = inner.make(len(members))
        if runner is None:
            passes = _run_group_prepasses(instances, inputs, floating, block_of, compute_device, compute_dtype,
                                          progress)
        else:  # a map-reduce over units, bit-identical to the streaming pass
            group_stats = GroupStatistics(instances, block_of)
            passes = group_stats.prepasses
            if passes:
                wanted = [n for n in floating if block_of[n] in group_stats.by_block]
                make_prepass_runner(runner, unit_bytes=recipe.output.shard_size, stage="inner prepass")(
                    group_stats, inputs, wanted, compute_device, compute_dtype, progress)
        timings["prepasses"] = time.perf_counter() - t0

        # 4. write every size in one pass
        t0 = time.perf_counter()
        staged = StagedDirectory(target, overwrite=overwrite)
        model_class = _model_class(inputs.base.directory)
        weights = list(all_specs)
        writer_class: Any = ShardedWriter
        if runner is not None:
            from .distributed import UnitsWriter, write_deployment_units

            writer_class = UnitsWriter  # shards written by the units, adopted once verified
        for plan in plans:
            stored, views = deployment_layout(plan, all_specs, block_of, tasks)
            writers.append(DeploymentWriter(staged.path / plan.size.directory, tasks=tasks, weights=weights,
                                            stored=stored, views=views, kind="flexmerge",
                                            shard_size=recipe.output.shard_size, model_class=model_class,
                                            writer_class=writer_class))
        executor: dict[str, Any] = {}
        if runner is not None:
            executor = write_deployment_units(
                runner, inputs,
                [(plan.size.directory, writer.sharded, deployment_sources(plan, all_specs, block_of))
                 for plan, writer in zip(plans, writers)],
                instances, root=staged.path, device=run_device, dtype=recipe.dtype, method_name=inner.name,
                progress=progress)
            timings.update(executor.get("timings", {}))
        merger = _GroupMerger(inputs, instances, inner.name, compute_device, compute_dtype, copy_ranges=True)
        if runner is None:
            timings["write_merge"], timings["write_io"] = _write_pass(
                inputs, names, plans, writers, merger, spec_of, block_of, compute_device, compute_dtype, progress)

        experts = [e.resolved for e in inputs.experts]
        for plan, writer in zip(plans, writers):
            copy_model_files(inputs.base.directory, writer)
            single = _resolved_recipe(recipe, inner, [plan.size.raw])
            lineage = MergeResult(output_dir=target / plan.size.directory, recipe=single, method=top_method,
                                  base=inputs.base, experts=experts, device=str(compute_device), seconds=0.0,
                                  bytes_read=0, bytes_written=0, tensors=len(names),
                                  extra={"provenance": {"flexmerge_size": plan.size.label}})
            writer.add_file(OWNER_MARKER, resolved_recipe_yaml(lineage))
            if writer.storage_bytes != plan.storage_bytes:  # the plan's accounting must be the stored bytes
                raise HubmergeError(f"{plan.size.directory}: planned {plan.storage_bytes} bytes, "
                                    f"stored {writer.storage_bytes}")
            plan.path = target.absolute() / plan.size.directory
            writer.finish({
                "size": plan.size.label,
                "requested_model_equivalents": float(plan.size.value),
                "merges": plan.merges,
                "total_merges": len(order),
                "inner": inner.name,
                "inner_params": inner.params,
                "blocks": [{"name": b.name, "tensors": list(b.tensors),
                            "groups": [[tasks[i] for i in g] for g in plan.groups[b.name]]} for b in blocks],
            })
        timings["write"] = time.perf_counter() - t0

        result = FlexMergeResult(
            output_dir=target.absolute(), recipe=recipe, inner=inner, tasks=tasks, blocks=blocks, order=order,
            storage_curve=curve, deployments=plans, model_bytes=model_bytes, cosines=block_cos,
            device=str(compute_device), bytes_read=inputs.bytes_per_pass * (2 + passes), timings=timings,
            storage_model=(storage or StorageModel()).name, base=inputs.base, experts=experts, executor=executor,
        )
        if runner is not None:  # the write units read what their shards need, per size
            result.bytes_read = inputs.bytes_per_pass * (1 + passes) + executor.get("bytes_read", 0)
        (staged.path / ROOT_SUMMARY).write_text(json.dumps(_summary(result), indent=1) + "\n", encoding="utf-8")
        root = MergeResult(output_dir=target, recipe=_resolved_recipe(recipe, inner, spec.sizes), method=top_method,
                           base=inputs.base, experts=experts, device=str(compute_device), seconds=0.0, bytes_read=0,
                           bytes_written=0, tensors=len(names))
        (staged.path / OWNER_MARKER).write_text(resolved_recipe_yaml(root), encoding="utf-8")
        result.output_dir = staged.commit()
        result.seconds = time.perf_counter() - started
        logger.info("flexmerge: %d merges over %d blocks, %d deployments in %.2fs", len(order), len(blocks),
                    len(plans), result.seconds)
        return result
    except BaseException:
        for writer in writers:
            writer.abort()
        if staged is not None:
            staged.abort()
        raise
    finally:
        inputs.close()


def _summary(result: FlexMergeResult) -> dict[str, Any]:
    """The content of ``flexmerge.json``."""
    tasks = result.tasks
    return {
        "tasks": tasks,
        "inner": result.inner.name,
        "inner_params": result.inner.params,
        "model_bytes": result.model_bytes,
        "size_unit": "model-equivalents: stored bytes / bytes of one model",
        "storage_model": result.storage_model,
        "blocks": [{"name": b.name, "tensors": list(b.tensors), "numel": b.numel, "bytes": b.nbytes,
                    "cosines": np.round(result.cosines[b.name], 6).tolist()} for b in result.blocks],
        "merge_order": [{"step": i + 1, "block": s.block, "left": [tasks[t] for t in s.left],
                         "right": [tasks[t] for t in s.right], "similarity": s.similarity,
                         "storage_bytes": result.storage_curve[i + 1],
                         "model_equivalents": result.storage_curve[i + 1] / result.model_bytes}
                        for i, s in enumerate(result.order)],
        "deployments": [{"size": p.size.label, "directory": p.size.directory, "merges": p.merges,
                         "storage_bytes": p.storage_bytes, "model_equivalents": p.model_equivalents}
                        for p in result.deployments],
    }
