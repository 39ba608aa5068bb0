"""The data-free methods from the papers (tsv, consensus, pcb, wudi) against independent computations.

Every reference below is written here, in numpy or plain Python, from the papers' formulas;
nothing is imported from the plugins except the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hubmerge_plugins.consensus import Consensus
from hubmerge_plugins.pcb import PCB
from hubmerge_plugins.tsv import TSV
from hubmerge_plugins.wudi import WUDI, GramObjective, task_weights
from pydantic import ValidationError
from safetensors.torch import load_file

from hubmerge.errors import MethodInputError, RecipeError
from hubmerge.method import TensorGroup
from hubmerge.plugins import get_method, registered_methods
from hubmerge.recipe import check_recipe, recipe_from_dict

DATAFREE = {"tsv": TSV, "consensus": Consensus, "pcb": PCB, "wudi": WUDI}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors only: one thread is fastest, and immune to a busy machine's thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _group(name, deltas, base=None, seed=0):
    deltas = torch.as_tensor(deltas)
    if base is None:
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(deltas.shape[1:], generator=gen, dtype=deltas.dtype)
    return TensorGroup(name, base, deltas, [f"e{i}" for i in range(deltas.shape[0])])


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run_prepasses(method, groups):
    """What the engine does: sum each pre-pass's statistics over all groups, then finish it."""
    for index in range(method.prepasses):
        totals = {}
        for group in groups:
            for key, value in method.observe(index, group).items():
                totals[key] = totals[key] + value if key in totals else value.clone()
        method.finish_pass(index, totals)


# -- registration -----------------------------------------------------------------------------------

def test_methods_are_registered_with_documented_params():
    methods = registered_methods()
    for name, cls in DATAFREE.items():
        assert methods[name].method is cls
        assert get_method(name) is cls
        info = cls.describe()
        assert info["paper"] and "http" in info["paper"]
        assert info["summary"]
        properties = info["params_schema"]["properties"]
        assert properties, name
        for field, schema in properties.items():
            assert schema.get("description"), f"{name}.{field} has no description"


# -- TSV-M ------------------------------------------------------------------------------------------

def _polar(a):
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def _tsv_reference(deltas: np.ndarray) -> np.ndarray:
    tasks, m, n = deltas.shape
    k = max(1, min(m, n) // tasks)
    us, ss, vs = [], [], []
    for t in range(tasks):
        u, s, vh = np.linalg.svd(deltas[t], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_cat, s_cat, v_cat = np.concatenate(us, axis=1), np.concatenate(ss), np.concatenate(vs, axis=1)
    return _polar(u_cat) @ np.diag(s_cat) @ _polar(v_cat).T


@pytest.mark.parametrize("shape", [(12, 9), (7, 16)])
def test_tsv_matches_numpy_reference(shape):
    deltas = _randn(3, *shape, seed=1)
    group = _group("layer.weight", deltas)
    merged = TSV({"scale": 0.7}).merge_tensor(group)
    expected = group.base.numpy() + 0.7 * _tsv_reference(deltas.numpy())
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_tsv_other_tensors_get_scaled_mean():
    deltas = _randn(4, 10, seed=2)
    group = _group("layer.bias", deltas)
    merged = TSV({"scale": 0.5}).merge_tensor(group)
    torch.testing.assert_close(merged, group.base + 0.5 * deltas.mean(0))


def test_tsv_orthogonal_singular_spaces_give_the_sum():
    m, n, tasks = 10, 8, 3
    k = min(m, n) // tasks  # 2 directions per task
    q, _ = torch.linalg.qr(_randn(m, m, seed=3))
    r, _ = torch.linalg.qr(_randn(n, n, seed=4))
    sigmas = 0.5 + torch.rand(tasks, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    blocks = [slice(t * k, (t + 1) * k) for t in range(tasks)]
    deltas = torch.stack([q[:, b] @ torch.diag(sigmas[t]) @ r[:, b].T for t, b in enumerate(blocks)])
    group = _group("w", deltas)
    merged = TSV().merge_tensor(group)
    torch.testing.assert_close(merged, group.base + deltas.sum(0), rtol=1e-10, atol=1e-12)


def test_tsv_zero_task_adds_no_directions():
    a = _randn(9, 6, seed=5)
    deltas = torch.stack([a, torch.zeros_like(a)])
    merged = TSV().merge_tensor(_group("w", deltas, base=torch.zeros(9, 6, dtype=torch.float64)))
    u, s, vh = np.linalg.svd(a.numpy(), full_matrices=False)
    k = 6 // 2
    np.testing.assert_allclose(merged.numpy(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-12)


def test_tsv_more_tasks_than_rank_and_low_precision():
    deltas = _randn(5, 3, 4, seed=6, dtype=torch.float32).to(torch.bfloat16)
    group = _group("w", deltas)
    merged = TSV().merge_tensor(group)
    assert merged.dtype == torch.bfloat16 and merged.shape == (3, 4) and torch.isfinite(merged).all()


# -- consensus (TALL masks) -------------------------------------------------------------------------

def _tall(deltas, mtl, lam):
    return np.abs(deltas) >= lam * np.abs(mtl[None] - deltas)


def _ties_reference(deltas: np.ndarray, k: float, global_thresholds=None) -> np.ndarray:
    """TIES as documented: keep |tau| >= m-th largest magnitude, elect sign of the sum, disjoint mean.

    Global thresholds are float32 and compared with float32 magnitudes, as ``ties`` documents.
    """
    tasks = deltas.shape[0]
    flat = deltas.reshape(tasks, -1)
    thresholds = global_thresholds
    if thresholds is None:
        count = min(flat.shape[1], max(1, math.floor(k * flat.shape[1] + 0.5)))
        thresholds = [np.sort(np.abs(flat[t]))[::-1][count - 1] for t in range(tasks)]
    magnitudes = np.abs(flat) if global_thresholds is None else np.abs(flat).astype(np.float32)
    trimmed = np.where(magnitudes >= np.asarray(thresholds)[:, None], flat, 0.0)
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign[None]) & (trimmed != 0)
    count = agree.sum(0)
    merged = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
    return merged.reshape(deltas.shape[1:])


def test_consensus_task_arithmetic_matches_hand_formula():
    deltas = _randn(4, 6, 5, seed=7)
    group = _group("w", deltas)
    method = Consensus({"k": 2, "tall_lambda": 0.5, "inner": "task_arithmetic",
                        "inner_params": {"scale": 0.3}})
    d = deltas.numpy()
    mtl = d.sum(0)
    keep = _tall(d, mtl, 0.5).sum(0) >= 2
    expected = group.base.numpy() + 0.3 * np.where(keep, mtl, 0.0)
    np.testing.assert_allclose(method.merge_tensor(group).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert 0 < keep.mean() < 1  # the example exercises both outcomes


def test_consensus_k1_keeps_what_some_mask_selects_and_k_above_t_keeps_nothing():
    deltas = _randn(3, 8, 4, seed=8)
    group = _group("w", deltas)
    d = deltas.numpy()
    mtl = d.sum(0)
    selected = _tall(d, mtl, 1.5).any(0)
    method = Consensus({"k": 1, "tall_lambda": 1.5, "inner_params": {"scale": 1.0}})
    added = method.merge_tensor(group) - group.base
    np.testing.assert_allclose(added.numpy(), np.where(selected, mtl, 0.0), atol=1e-12)
    assert 0 < selected.mean() < 1
    nothing = Consensus({"k": 4}).merge_tensor(group)
    torch.testing.assert_close(nothing, group.base, rtol=0, atol=0)
    everything = Consensus({"k": 0, "inner_params": {"scale": 1.0}}).merge_tensor(group)
    torch.testing.assert_close(everything, group.base + deltas.sum(0))


@pytest.mark.parametrize("params,elementwise", [
    ({}, True),
    ({"inner": "ties", "inner_params": {"scope": "tensor"}}, False),
    ({"inner": "ties", "inner_params": {"scope": "global"}}, True),
])
def test_consensus_is_elementwise_when_the_inner_method_is(params, elementwise):
    method = Consensus(params)
    assert method.elementwise is elementwise
    assert all(not cls.elementwise for cls in (TSV, PCB, WUDI))
    if elementwise and not method.prepasses:  # a block of rows merges to the same rows
        group = _group("w", _randn(3, 8, 5, seed=30))
        whole = method.merge_tensor(group)
        block = TensorGroup("w", group.base[2:5], group.deltas[:, 2:5], group.experts, rows=(2, 5))
        torch.testing.assert_close(method.merge_tensor(block), whole[2:5], rtol=0, atol=0)


def test_consensus_with_ties_per_tensor():
    deltas = _randn(3, 10, 6, seed=9)
    group = _group("w", deltas)
    method = Consensus({"k": 2, "tall_lambda": 0.3, "inner": "ties",
                        "inner_params": {"k": 0.3, "scale": 0.8, "scope": "tensor"}})
    assert method.prepasses == 0
    d = deltas.numpy()
    mtl = _ties_reference(d, 0.3)
    keep = _tall(d, mtl, 0.3).sum(0) >= 2
    expected = group.base.numpy() + 0.8 * np.where(keep, mtl, 0.0)
    np.testing.assert_allclose(method.merge_tensor(group).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_consensus_forwards_ties_global_prepasses():
    groups = [_group("a", _randn(3, 7, 5, seed=10), seed=1), _group("b", _randn(3, 11, seed=11), seed=2)]
    method = Consensus({"k": 1, "tall_lambda": 0.5, "inner": "ties",
                        "inner_params": {"k": 0.25, "scope": "global"}})
    assert method.prepasses > 0
    _run_prepasses(method, groups)
    # reference: each task's threshold over the whole "model" (both tensors concatenated)
    flat = np.concatenate([g.deltas.numpy().reshape(3, -1) for g in groups], axis=1)
    count = max(1, math.floor(0.25 * flat.shape[1] + 0.5))
    thresholds = [np.sort(np.abs(flat[t]).astype(np.float32))[::-1][count - 1] for t in range(3)]
    for group in groups:
        d = group.deltas.numpy()
        mtl = _ties_reference(d, 0.25, thresholds)
        keep = _tall(d, mtl, 0.5).sum(0) >= 1
        expected = group.base.numpy() + 1.0 * np.where(keep, mtl, 0.0)
        np.testing.assert_allclose(method.merge_tensor(group).numpy(), expected, rtol=1e-6, atol=1e-7)


# -- PCB ----------------------------------------------------------------------------------------------

def _pcb_loop(tvs: list[list[float]], ratio: float) -> list[float]:
    """PCB-Merging written entry by entry from the paper's equations."""
    tasks, size = len(tvs), len(tvs[0])

    def norm(values):
        lo, hi = min(values), max(values)
        return [0.0] * len(values) if hi == lo else [(v - lo) / (hi - lo) for v in values]

    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        return [e / total for e in exps]

    beta = []
    for i in range(tasks):
        intra = softmax([tasks * v for v in norm([tvs[i][e] * tvs[i][e] for e in range(size)])])
        inter = [0.0] * size
        for j in range(tasks):
            similarity = softmax(norm([tvs[i][e] * tvs[j][e] for e in range(size)]))
            inter = [a + b for a, b in zip(inter, similarity)]
        beta.append([a * b for a, b in zip(intra, inter)])
    keep = max(1, math.ceil(ratio * size - 1e-9))
    kept = []
    for i in range(tasks):
        threshold = sorted(beta[i], reverse=True)[keep - 1]
        kept.append([beta[i][e] >= threshold and tvs[i][e] != 0 for e in range(size)])
    merged = []
    for e in range(size):
        num = sum(beta[i][e] * tvs[i][e] for i in range(tasks) if kept[i][e])
        den = sum(beta[i][e] for i in range(tasks) if kept[i][e])
        merged.append(num / den if den > 0 else 0.0)
    return merged


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_pcb_matches_loop_implementation(ratio):
    deltas = _randn(3, 3, 4, seed=12, scale=0.01)
    group = _group("w", deltas)
    merged = PCB({"ratio": ratio, "scale": 0.8}).merge_tensor(group)
    tvs = deltas.reshape(3, -1).tolist()
    expected = group.base.numpy() + 0.8 * np.array(_pcb_loop(tvs, ratio)).reshape(3, 4)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_pcb_zero_task_does_not_dilute():
    a = _randn(20, seed=13)
    deltas = torch.stack([a, torch.zeros_like(a)])
    merged = PCB({"ratio": 0.2}).merge_tensor(_group("b", deltas, base=torch.zeros(20, dtype=torch.float64)))
    kept = merged != 0
    assert int(kept.sum()) == 4  # the top 20 % of the one non-zero task
    torch.testing.assert_close(merged[kept], a[kept])


def test_pcb_low_precision_is_computed_in_float32():
    deltas = _randn(4, 64, 32, seed=14, scale=1e-3, dtype=torch.float32).to(torch.float16)
    merged = PCB().merge_tensor(_group("w", deltas))
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()


# -- WUDI ---------------------------------------------------------------------------------------------

def _t_term_loss(tau_m, deltas, weights):
    terms = (w * ((tau_m - delta) @ delta.T).square().sum() for w, delta in zip(weights, deltas, strict=True))
    return sum(terms)


@pytest.mark.parametrize("shape,factored", [((12, 7), False), ((5, 40), True), ((5, 40), False)])
def test_wudi_gram_gradient_equals_autograd(shape, factored):
    deltas = _randn(3, *shape, seed=15, scale=0.01)
    weights = task_weights(deltas)
    np.testing.assert_allclose(weights.numpy(), 1 / deltas.reshape(3, -1).square().sum(1).numpy())
    tau_m = _randn(*shape, seed=16, scale=0.01).requires_grad_(True)
    _t_term_loss(tau_m, deltas, weights).backward()
    objective = GramObjective(deltas, weights, factored=factored)
    assert (objective.X is not None) == factored
    torch.testing.assert_close(objective.gradient(tau_m.detach()), tau_m.grad, rtol=1e-10, atol=1e-16)


def test_wudi_gradient_path_is_chosen_by_cost():
    deltas = _randn(2, 3, 64, seed=17)
    assert GramObjective(deltas, task_weights(deltas)).X is not None  # 2*T*m = 12 < n = 64
    deltas = _randn(2, 64, 3, seed=17)
    assert GramObjective(deltas, task_weights(deltas)).X is None


def test_wudi_adam_matches_torch_adam_on_the_t_term_loss():
    deltas = _randn(4, 9, 6, seed=18, scale=0.01)
    weights = 1 / deltas.reshape(4, -1).square().sum(1)
    param = torch.nn.Parameter(deltas.sum(0).clone())
    optimizer = torch.optim.Adam([param], lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        _t_term_loss(param, deltas, weights).backward()
        optimizer.step()
    group = _group("layer.weight", deltas)
    merged = WUDI({"steps": 40, "lr": 1e-3}).merge_tensor(group)
    torch.testing.assert_close(merged - group.base, param.detach(), rtol=1e-9, atol=1e-12)
    start_loss = _t_term_loss(deltas.sum(0), deltas, weights)
    assert _t_term_loss(merged - group.base, deltas, weights) < start_loss


@pytest.mark.parametrize("params", [{}, {"lr": 1e-2, "steps": 50}, {"closed_form": True}])
def test_wudi_single_task_returns_it(params):
    deltas = _randn(1, 8, 5, seed=19, scale=0.01)
    group = _group("layer.weight", deltas)
    merged = WUDI(params).merge_tensor(group)
    torch.testing.assert_close(merged, group.base + deltas[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("params", [
    {"omega": 0.05},
    {"omega": 0.3, "balance": False},
    {"omega": 0.01, "weights": [1.0, 2.0, 0.5]},
])
def test_wudi_closed_form_equals_least_squares(params):
    """CFS against lstsq of the stacked system: rows √w_t τ_t and √(w_t ω) I, targets likewise."""
    tasks, m, n = 3, 7, 5
    deltas = _randn(tasks, m, n, seed=20, scale=0.01)
    d = deltas.numpy()
    sq = (d.reshape(tasks, -1) ** 2).sum(1)
    w = np.asarray(params.get("weights", [1.0] * tasks)) / (sq if params.get("balance", True) else 1.0)
    omega = params["omega"] * sq.mean() / min(m, n)
    rows, targets = [], []
    for t in range(tasks):  # ||(x - τ_t) τ_tᵀ||² as || τ_t xᵀ - τ_t τ_tᵀ ||² over the rows x of τ_m
        rows += [math.sqrt(w[t]) * d[t], math.sqrt(w[t] * omega) * np.eye(n)]
        targets += [math.sqrt(w[t]) * d[t] @ d[t].T, math.sqrt(w[t] * omega) * d[t].T]
    system, rhs = torch.from_numpy(np.vstack(rows)), torch.from_numpy(np.vstack(targets))
    solution = torch.linalg.lstsq(system, rhs).solution
    group = _group("layer.weight", deltas)
    merged = WUDI({"closed_form": True, **params}).merge_tensor(group)
    np.testing.assert_allclose((merged - group.base).numpy(), solution.numpy().T, rtol=1e-8, atol=1e-12)


def test_wudi_closed_form_singular_system_is_reported():
    deltas = _randn(2, 6, 4, seed=21)
    deltas[:, :, 1] = 0  # no task moves input 1: A has a zero row and column when ω = 0
    with pytest.raises(MethodInputError, match="omega"):
        WUDI({"closed_form": True, "omega": 0.0}).merge_tensor(_group("layer.weight", deltas))
    merged = WUDI({"closed_form": True}).merge_tensor(_group("layer.weight", deltas))
    assert torch.isfinite(merged).all()


def test_wudi_zero_task_is_left_out():
    a = _randn(6, 4, seed=22, scale=0.01)
    deltas = torch.stack([a, torch.zeros_like(a)])
    group = _group("layer.weight", deltas)
    torch.testing.assert_close(WUDI({"lr": 1e-3}).merge_tensor(group), group.base + a, rtol=1e-10, atol=1e-14)
    zero = _group("layer.weight", torch.zeros(2, 6, 4, dtype=torch.float64))
    torch.testing.assert_close(WUDI().merge_tensor(zero), zero.base)


def test_wudi_nonlinear_tensors_and_embeddings():
    deltas = _randn(3, 10, seed=23)
    bias = _group("encoder.layer.0.output.dense.bias", deltas)
    torch.testing.assert_close(WUDI().merge_tensor(bias), bias.base)
    torch.testing.assert_close(WUDI({"nonlinear": "mean"}).merge_tensor(bias), bias.base + deltas.mean(0))
    torch.testing.assert_close(WUDI({"nonlinear": "sum", "scale": 0.5}).merge_tensor(bias),
                               bias.base + 0.5 * deltas.sum(0))
    embeddings = _group("embeddings.word_embeddings.weight", _randn(3, 12, 4, seed=24))
    torch.testing.assert_close(WUDI().merge_tensor(embeddings), embeddings.base)
    method = WUDI({"exclude": [], "steps": 3})
    assert method.is_linear("embeddings.word_embeddings.weight", (12, 4))
    assert not torch.equal(method.merge_tensor(embeddings), embeddings.base)


def test_wudi_fan_in_fan_out_transposes():
    deltas = _randn(3, 5, 9, seed=25, scale=0.01)
    stored = _group("h.0.mlp.c_fc.weight", deltas.transpose(1, 2).contiguous())
    linear = _group("h.0.mlp.c_fc.weight", deltas, base=stored.base.T.contiguous())
    params = {"steps": 20, "lr": 1e-3}
    merged = WUDI({**params, "fan_in_fan_out": True}).merge_tensor(stored)
    torch.testing.assert_close(merged.T, WUDI(params).merge_tensor(linear))


def test_wudi_weights_must_match_the_experts():
    method = WUDI({"weights": [1.0, 2.0]})
    method.check_experts(2)
    with pytest.raises(MethodInputError, match="weights"):
        method.check_experts(3)
    with pytest.raises(MethodInputError, match="weights"):
        method.merge_tensor(_group("layer.weight", _randn(3, 4, 4, seed=26)))


def test_wudi_runs_in_low_precision():
    deltas = _randn(3, 16, 8, seed=27, scale=1e-3, dtype=torch.float32).to(torch.bfloat16)
    merged = WUDI({"steps": 5}).merge_tensor(_group("layer.weight", deltas))
    assert merged.dtype == torch.bfloat16 and torch.isfinite(merged).all()


# -- parameters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params,field", [
    ("tsv", {"scale": float("nan")}, "scale"),
    ("tsv", {"rank": 3}, "rank"),
    ("pcb", {"ratio": 0}, "ratio"),
    ("pcb", {"ratio": 1.5}, "ratio"),
    ("wudi", {"steps": -1}, "steps"),
    ("wudi", {"lr": 0}, "lr"),
    ("wudi", {"omega": -1}, "omega"),
    ("wudi", {"nonlinear": "median"}, "nonlinear"),
    ("wudi", {"weights": [1.0, -2.0]}, "weights"),
    ("wudi", {"weights": [0.0, 0.0]}, "weights"),
    ("consensus", {"k": -1}, "k"),
    ("consensus", {"tall_lambda": -0.1}, "tall_lambda"),
    ("consensus", {"inner": "linear"}, "inner"),
    ("consensus", {"inner": "ties", "inner_params": {"k": 5}}, "inner_params"),
    ("consensus", {"inner_params": {"density": 0.5}}, "inner_params"),
])
def test_bad_params_name_the_field(method, params, field):
    with pytest.raises(ValidationError) as info:
        DATAFREE[method](params)
    assert info.value.errors()[0]["loc"][0] == field
    recipe = recipe_from_dict({"hubmerge": 1, "name": "r", "base": "org/base", "experts": ["org/a", "org/b"],
                               "method": method, "params": params})
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe)
    assert info.value.field == f"params.{field}"


def test_inner_param_errors_name_the_inner_field():
    with pytest.raises(ValidationError, match=r"ties parameter k: .*less than or equal to 1"):
        Consensus({"inner": "ties", "inner_params": {"k": 5}})


def test_consensus_forwards_the_inner_expert_checks():
    method = Consensus({"inner_params": {"weights": [1.0, 1.0]}})
    method.check_experts(2)
    with pytest.raises(MethodInputError):
        method.check_experts(3)


# -- end to end through the engine ---------------------------------------------------------------------

@pytest.mark.parametrize("method,params", [
    ("tsv", {}),
    ("consensus", {"inner": "ties", "inner_params": {"k": 0.5}}),
    ("pcb", {"ratio": 0.2}),
    ("wudi", {"steps": 5}),
    ("wudi", {"closed_form": True}),
])
def test_merge_through_the_engine(tiny_models, tmp_path, method, params):
    from hubmerge.engine import merge

    out = tmp_path / "merged"
    recipe = recipe_from_dict({
        "hubmerge": 1, "name": "datafree", "base": str(tiny_models["base"]),
        "experts": [str(tiny_models["e0"]), str(tiny_models["e1"]), str(tiny_models["e2"])],
        "method": method, "params": params, "output": {"path": str(out)},
    })
    merge(recipe)
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_models["base"] / "model.safetensors")
    linear = "encoder.layer.0.attention.self.query.weight"
    assert all(torch.isfinite(v).all() for v in merged.values() if v.dtype.is_floating_point)
    assert not torch.equal(merged[linear], base[linear])
    if method == "wudi":  # non-linear tensors and embeddings stay at the base (the paper's choice)
        for name in ("encoder.layer.0.attention.self.query.bias", "embeddings.word_embeddings.weight"):
            torch.testing.assert_close(merged[name], base[name], rtol=0, atol=0)
