"""The classic built-in methods (linear, task_arithmetic, ties, dare, slerp) against hand computations.

The expected values are computed here independently of the plugins' helpers: explicit loops,
numpy in float64 and sorted Python lists.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from hubmerge.errors import MethodInputError, MethodParamError, MethodStateError
from hubmerge.method import TensorGroup
from hubmerge.plugins import get_method

CLASSIC = ["linear", "task_arithmetic", "ties", "dare", "slerp"]


# -- helpers -----------------------------------------------------------------------------

def group(name, base, deltas, dtype=torch.float32):
    base = torch.as_tensor(np.asarray(base, dtype=np.float64)).to(dtype)
    deltas = torch.as_tensor(np.asarray(deltas, dtype=np.float64)).to(dtype)
    return TensorGroup(name, base, deltas, [f"e{i}" for i in range(deltas.shape[0])])


def method(name, **params):
    return get_method(name)(params)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def run_prepasses(m, groups, *, reverse_second=True):
    """Feed groups through observe/finish_pass the way the engine does (sums of the returned dicts)."""
    for pass_index in range(m.prepasses):
        order = list(reversed(groups)) if (reverse_second and pass_index % 2) else list(groups)
        totals = {}
        for g in order:
            for key, value in m.observe(pass_index, g).items():
                totals[key] = totals[key] + value if key in totals else value.clone()
        m.finish_pass(pass_index, totals)


def hand_keep_count(k, n):
    # k*n rounded half up, at least one, at most n
    m = int(math.floor(k * n + 0.5))
    return min(n, max(1, m))


def hand_threshold(magnitudes, k):
    ordered = sorted(magnitudes, reverse=True)
    return ordered[hand_keep_count(k, len(ordered)) - 1]


def hand_ties(deltas: np.ndarray, thresholds) -> np.ndarray:
    """TIES merged task vector with explicit loops; ``deltas`` is (T, n) float64."""
    count, size = deltas.shape
    out = np.zeros(size)
    for i in range(size):
        trimmed = [deltas[t, i] if abs(deltas[t, i]) >= thresholds[t] else 0.0 for t in range(count)]
        total = sum(trimmed)
        gamma = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)
        agreeing = [v for v in trimmed if v != 0.0 and (v > 0) == (gamma > 0) and gamma != 0.0]
        out[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def hand_ties_numpy(deltas: np.ndarray, thresholds) -> np.ndarray:
    """Vectorised numpy twin of :func:`hand_ties` for model-sized checks."""
    trimmed = np.where(np.abs(deltas) >= np.asarray(thresholds)[:, None], deltas, 0.0)
    gamma = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    count = agree.sum(0)
    return np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)


def test_hand_implementations_agree():
    rng = np.random.default_rng(1)
    deltas = quarter_grid(rng, (4, 300))
    thresholds = [0.5, 1.0, 0.25, 1.75]
    np.testing.assert_array_equal(hand_ties(deltas, thresholds), hand_ties_numpy(deltas, thresholds))


def assert_untouched(g, fn):
    base, deltas = g.base.clone(), g.deltas.clone()
    result = fn(g)
    assert torch.equal(g.base, base) and torch.equal(g.deltas, deltas), "method modified its inputs"
    return result


# -- plugin manager, metadata, parameter errors --------------------------------------------

@pytest.mark.parametrize("name", CLASSIC)
def test_loads_through_plugin_manager(name):
    cls = get_method(name)
    assert cls.name == name
    info = cls.describe()
    assert info["paper"] and info["summary"]
    props = info["params_schema"]["properties"]
    assert props and all(p.get("description") for p in props.values())
    cls()  # defaults validate


def test_defaults_follow_design_table():
    assert method("linear").params.normalize is True
    assert method("task_arithmetic").params.scale == 0.3
    ties = method("ties").params
    assert (ties.k, ties.scale, ties.scope) == (0.2, 1.0, "global")
    dare = method("dare").params
    assert (dare.density, dare.seed, dare.combine, dare.scale) == (0.9, 0, "task_arithmetic", 0.3)
    assert method("dare", combine="ties").params.scale == 1.0
    assert method("slerp").params.t == 0.5


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("ties", {"k": 1.5}, "k"),
        ("ties", {"k": 0}, "k"),
        ("ties", {"scope": "layer"}, "scope"),
        ("dare", {"density": 0}, "density"),
        ("dare", {"density": 1.2}, "density"),
        ("dare", {"seed": -1}, "seed"),
        ("slerp", {"t": 1.5}, "t"),
        ("linear", {"weights": []}, "weights"),
        ("task_arithmetic", {"scale": float("nan")}, "scale"),
        ("ties", {"unknown": 1}, "unknown"),
    ],
)
def test_bad_params_name_the_field(name, params, field):
    with pytest.raises(ValidationError) as info:
        method(name, **params)
    assert any(field in err["loc"] for err in info.value.errors()), info.value.errors()


def test_cross_field_errors_name_the_field():
    with pytest.raises(ValidationError, match="weights"):
        method("linear", weights=[1.0, -1.0])
    assert method("linear", weights=[1.0, -1.0], normalize=False)
    with pytest.raises(ValidationError, match="k"):
        method("dare", combine="task_arithmetic", k=0.5)
    # a dumped params dict validates again (cards and re-runs store the resolved params)
    for name in CLASSIC:
        m = method(name)
        type(m)(m.params.model_dump())


def test_slerp_needs_exactly_two_experts():
    m = method("slerp")
    m.check_experts(2)
    for count in (1, 3):
        with pytest.raises(MethodInputError, match="experts"):
            m.check_experts(count)
    with pytest.raises(MethodInputError, match="experts"):
        m.merge_tensor(group("w", [0.0], [[1.0], [2.0], [3.0]]))


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_wrong_number_of_weights(name):
    m = method(name, weights=[1.0, 2.0])
    m.check_experts(2)
    with pytest.raises(MethodParamError, match="weights") as info:
        m.check_experts(3)
    assert info.value.field == "weights"
    with pytest.raises(MethodParamError, match="weights"):
        m.merge_tensor(group("w", [0.0], [[1.0], [2.0], [3.0]]))


# -- linear and task arithmetic -----------------------------------------------------------

RNG = np.random.default_rng(1234)
BASE = RNG.normal(size=(3, 4))
DELTAS = RNG.normal(scale=0.1, size=(3, 3, 4))


def _thetas():
    return [BASE + DELTAS[k] for k in range(DELTAS.shape[0])]


def test_linear_unweighted_is_the_mean():
    out = assert_untouched(group("w", BASE, DELTAS), method("linear").merge_tensor)
    expected = sum(_thetas()) / 3
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)
    # default weights are equal: normalize false gives the mean too
    out = method("linear", normalize=False).merge_tensor(group("w", BASE, DELTAS))
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)


def test_linear_weighted_and_normalize_false():
    weights = [0.5, 2.0, 1.5]
    thetas = _thetas()
    expected_sum = np.zeros_like(BASE)
    for w, theta in zip(weights, thetas):
        expected_sum += w * theta
    out = method("linear", weights=weights).merge_tensor(group("w", BASE, DELTAS))
    np.testing.assert_allclose(as_np(out), expected_sum / sum(weights), rtol=1e-6, atol=1e-6)
    out = method("linear", weights=weights, normalize=False).merge_tensor(group("w", BASE, DELTAS))
    np.testing.assert_allclose(as_np(out), expected_sum, rtol=1e-6, atol=1e-6)


def test_task_arithmetic():
    out = assert_untouched(group("w", BASE, DELTAS), method("task_arithmetic").merge_tensor)
    expected = BASE + 0.3 * (DELTAS[0] + DELTAS[1] + DELTAS[2])
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)
    negate = method("task_arithmetic", scale=-1.0, weights=[1.0, 0.0, 2.0])
    out = negate.merge_tensor(group("w", BASE, DELTAS))
    np.testing.assert_allclose(as_np(out), BASE - (DELTAS[0] + 2.0 * DELTAS[2]), rtol=1e-6, atol=1e-6)


# -- ties ----------------------------------------------------------------------------------

def quarter_grid(rng, shape):
    """Values in {-2, -1.75, ..., 2}: many exact ties in magnitude, zeros and negatives."""
    return rng.integers(-8, 9, size=shape) * 0.25


@pytest.mark.parametrize("histogram", [False, True])
@pytest.mark.parametrize("k", [0.1, 0.25, 0.5, 0.7, 1.0])
def test_ties_tensor_scope(k, histogram, monkeypatch):
    import hubmerge_plugins._sparsify as sparsify

    if histogram:  # force the large-tensor path (two histogram passes) on a small tensor
        monkeypatch.setattr(sparsify, "_SMALL", 0)
    rng = np.random.default_rng(7)
    deltas = quarter_grid(rng, (3, 5, 8))
    base = rng.normal(size=(5, 8))
    m = method("ties", k=k, scope="tensor", scale=0.7)
    assert m.prepasses == 0
    out = assert_untouched(group("layer.weight", base, deltas), m.merge_tensor)
    flat = deltas.reshape(3, -1)
    thresholds = [hand_threshold([abs(v) for v in flat[t]], k) for t in range(3)]
    expected = base.reshape(-1) + 0.7 * hand_ties(flat, thresholds)
    np.testing.assert_allclose(as_np(out).reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_ties_small_example_by_hand():
    # one tensor, three tasks, k = 1 (no trim): sign election and disjoint mean only
    deltas = [[1.0, -2.0, 3.0, 1.0], [2.0, 1.0, -1.0, -1.0], [-0.5, -1.0, 0.0, 0.0]]
    out = method("ties", k=1.0, scope="tensor").merge_tensor(group("w", [0.0] * 4, deltas))
    # col0: sum 2.5 -> +, mean(1, 2) = 1.5; col1: sum -2 -> -, mean(-2, -1) = -1.5
    # col2: sum 2 -> +, mean(3) = 3;        col3: sum 0 -> no sign elected -> 0
    assert as_np(out).tolist() == [1.5, -1.5, 3.0, 0.0]


def _global_case(rng, in_dtype, compute_dtype):
    """Tensors of different sizes/ranks with ties, zeros, negatives; values exact in ``in_dtype``."""
    shapes = [(40, 30), (7,), (3, 5, 2), (), (1, 1), (257,)]
    groups, raw = [], []
    for index, shape in enumerate(shapes):
        scale = 10.0 ** rng.integers(-4, 2)
        values = rng.normal(scale=scale, size=(3, *shape))
        if len(shape) and values[0].size > 4:
            flat = values.reshape(3, -1)
            flat[:, : flat.shape[1] // 5] = 0.0  # zeros
            flat[1, -4:] = -flat[0, -4:]  # equal magnitudes across tasks, opposite signs
            flat[2, 1::3] = quarter_grid(rng, flat[2, 1::3].shape)  # many ties in magnitude
        exact = torch.as_tensor(values).to(in_dtype)  # round to the checkpoint dtype ...
        base = torch.as_tensor(rng.normal(size=shape)).to(in_dtype)
        groups.append(TensorGroup(f"t{index}", base.to(compute_dtype), exact.to(compute_dtype)))
        raw.append((as_np(base), as_np(exact)))  # ... the values the method sees, exactly
    # a tensor whose magnitudes all equal one of another tensor's: cross-tensor ties
    some = float(abs(raw[0][1][0].reshape(-1)[-1]))
    tied = torch.full((3, 6), some, dtype=torch.float64).to(in_dtype)
    tied[1] = -tied[1]
    groups.append(TensorGroup("tied", torch.zeros(6, dtype=compute_dtype), tied.to(compute_dtype)))
    raw.append((np.zeros(6), as_np(tied)))
    return groups, raw


@pytest.mark.parametrize(
    "in_dtype, compute_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("k", [0.2, 0.05, 0.9])
def test_ties_global_threshold_is_exact(in_dtype, compute_dtype, k):
    rng = np.random.default_rng(99)
    groups, raw = _global_case(rng, in_dtype, compute_dtype)
    m = method("ties", k=k, scale=0.5)
    assert m.prepasses == 2
    run_prepasses(m, groups)

    expected_thresholds = []
    for t in range(3):
        magnitudes = [abs(float(v)) for _, d in raw for v in d[t].reshape(-1)]
        expected_thresholds.append(hand_threshold(magnitudes, k))
    assert m.thresholds.dtype == torch.float32
    assert m.thresholds.tolist() == expected_thresholds

    # kept counts: at least m per task, more only through ties at the threshold
    total = sum(d[0].size for _, d in raw)
    for t in range(3):
        kept = sum(int((np.abs(d[t]) >= expected_thresholds[t]).sum()) for _, d in raw)
        strictly = sum(int((np.abs(d[t]) > expected_thresholds[t]).sum()) for _, d in raw)
        assert strictly < hand_keep_count(k, total) <= kept

    tol = 1e-5 if compute_dtype == torch.float32 else 2e-2
    for g, (base, d) in zip(groups, raw):
        out = assert_untouched(g, m.merge_tensor)
        assert out.dtype == compute_dtype and out.shape == g.base.shape
        expected = base.reshape(-1) + 0.5 * hand_ties(d.reshape(3, -1), expected_thresholds)
        np.testing.assert_allclose(as_np(out).reshape(-1), expected, rtol=tol, atol=tol)


def test_ties_global_distinct_magnitudes_keep_exactly_m(monkeypatch):
    import hubmerge_plugins._sparsify as sparsify

    monkeypatch.setattr(sparsify, "_CHUNK", 37)  # exercise the chunked histograms
    rng = np.random.default_rng(5)
    sizes = [100, 1, 333, 64]
    values = rng.permutation(np.arange(1, 2 * sum(sizes) + 1, dtype=np.float64))[: 2 * sum(sizes)]
    values = values * rng.choice([-1.0, 1.0], size=values.size) * 1e-3
    groups, start = [], 0
    for i, size in enumerate(sizes):
        chunk = values[start:start + 2 * size].reshape(2, size)
        start += 2 * size
        groups.append(TensorGroup(f"g{i}", torch.zeros(size), torch.as_tensor(chunk, dtype=torch.float32)))
    m = method("ties", k=0.3)
    run_prepasses(m, groups)
    for t in range(2):
        all_mags = np.concatenate([np.abs(g.deltas[t].numpy()) for g in groups])
        kept = int((all_mags >= m.thresholds[t].item()).sum())
        assert kept == hand_keep_count(0.3, sum(sizes))


def test_ties_global_needs_its_prepasses():
    m = method("ties")
    with pytest.raises(MethodStateError):
        m.merge_tensor(group("w", [0.0, 0.0], [[1.0, 2.0]]))
    assert method("ties", scope="tensor").prepasses == 0
    assert method("ties", k=1.0).prepasses == 0  # nothing to trim, nothing to rank


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_float64_rounds_magnitudes_to_float32(scope):
    deltas = torch.tensor([[1.0, -1.0 - 2.0 ** -40, 0.5, 0.25]], dtype=torch.float64)
    m = method("ties", k=0.25, scope=scope)
    g = TensorGroup("w", torch.zeros(4, dtype=torch.float64), deltas)
    run_prepasses(m, [g])
    if scope == "global":
        assert m.thresholds.tolist() == [1.0]
    out = m.merge_tensor(g)  # both entries round to 1.0 in float32 and tie at the threshold
    assert out.dtype == torch.float64 and out.tolist() == [1.0, -1.0 - 2.0 ** -40, 0.0, 0.0]


# -- dare --------------------------------------------------------------------------------

def extract_masks(name, shape, count, density, seed):
    """Each expert's keep-mask, read back through the public API with one-hot task vectors."""
    masks = []
    for j in range(count):
        deltas = np.zeros((count, *shape))
        deltas[j] = 1.0
        dare = method("dare", density=density, seed=seed, scale=1.0)
        out = dare.merge_tensor(group(name, np.zeros(shape), deltas))
        masks.append(as_np(out) != 0)
        np.testing.assert_allclose(as_np(out)[masks[-1]], 1.0 / density, rtol=1e-6)  # rescaled by 1/density
    return np.stack(masks)


def test_dare_is_deterministic_and_order_independent():
    rng = np.random.default_rng(3)
    groups = [group(f"layer.{i}", rng.normal(size=(16, 8)), rng.normal(size=(2, 16, 8))) for i in range(3)]
    m1 = method("dare", density=0.6, seed=11)
    first = [m1.merge_tensor(g) for g in groups]
    m2 = method("dare", density=0.6, seed=11)
    second = [m2.merge_tensor(g) for g in reversed(groups)][::-1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    again = [m1.merge_tensor(g) for g in reversed(groups)][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other_seed = method("dare", density=0.6, seed=12).merge_tensor(groups[0])
    assert not torch.equal(first[0], other_seed)
    # different tensors get different masks
    masks = [extract_masks(f"layer.{i}", (16, 8), 2, 0.6, 11) for i in range(2)]
    assert not np.array_equal(masks[0], masks[1])


def test_dare_kept_fraction_and_rescaling():
    density = 0.75
    masks = extract_masks("big.weight", (200, 250), 2, density, 0)
    for mask in masks:
        assert abs(mask.mean() - density) < 0.01
    assert not np.array_equal(masks[0], masks[1])  # independent draws per expert


def test_dare_task_arithmetic_matches_hand():
    rng = np.random.default_rng(4)
    base, deltas = rng.normal(size=(6, 5)), rng.normal(size=(3, 6, 5))
    density = 0.5
    masks = extract_masks("w", (6, 5), 3, density, 9)
    out = assert_untouched(group("w", base, deltas), method("dare", density=density, seed=9).merge_tensor)
    expected = base.copy()
    for k in range(3):
        expected += 0.3 * np.where(masks[k], deltas[k] / density, 0.0)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-6, atol=1e-6)
    # density 1 is plain task arithmetic
    full = method("dare", density=1.0).merge_tensor(group("w", base, deltas))
    np.testing.assert_allclose(as_np(full), base + 0.3 * deltas.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1.0, 0.4])
def test_dare_ties_tensor_scope_matches_hand(k):
    rng = np.random.default_rng(8)
    base, deltas = rng.normal(size=(7, 9)), quarter_grid(rng, (3, 7, 9))
    density = 0.5  # a power of two: the rescaled values are exact
    masks = extract_masks("w", (7, 9), 3, density, 2)
    m = method("dare", density=density, seed=2, combine="ties", k=k, scope="tensor")
    assert m.prepasses == 0
    out = assert_untouched(group("w", base, deltas), m.merge_tensor)
    dropped = np.where(masks, deltas / density, 0.0).reshape(3, -1)
    thresholds = [hand_threshold([abs(v) for v in dropped[t]], k) for t in range(3)]
    expected = base.reshape(-1) + hand_ties(dropped, thresholds)
    np.testing.assert_allclose(as_np(out).reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_dare_ties_global_sees_the_dropped_values():
    rng = np.random.default_rng(10)
    shapes = [(12, 10), (5,), (3, 3, 3)]
    density, seed, k = 0.5, 4, 0.15
    groups, raw = [], []
    for i, shape in enumerate(shapes):
        base = rng.normal(size=shape)
        deltas = rng.normal(size=(2, *shape)).astype(np.float32).astype(np.float64)  # exact in float32
        g = group(f"g{i}", base, deltas)
        masks = extract_masks(f"g{i}", shape, 2, density, seed)
        groups.append(g)
        raw.append((base, np.where(masks, deltas / density, 0.0)))
    m = method("dare", density=density, seed=seed, combine="ties", k=k, scale=0.8)
    assert m.prepasses == 2
    run_prepasses(m, groups)
    expected_thresholds = [
        hand_threshold([abs(v) for _, d in raw for v in d[t].reshape(-1)], k) for t in range(2)
    ]
    assert m.thresholds.tolist() == expected_thresholds
    for g, (base, dropped) in zip(groups, raw):
        out = m.merge_tensor(g)
        expected = base.reshape(-1) + 0.8 * hand_ties(dropped.reshape(2, -1), expected_thresholds)
        np.testing.assert_allclose(as_np(out).reshape(-1), expected, rtol=1e-6, atol=1e-6)


# -- slerp -------------------------------------------------------------------------------

def test_slerp_endpoints():
    rng = np.random.default_rng(6)
    base, deltas = rng.normal(size=(4, 3)), rng.normal(size=(2, 4, 3))
    g = group("w", base, deltas)
    thetas = g.weights
    assert torch.equal(assert_untouched(g, method("slerp", t=0.0).merge_tensor), thetas[0])
    assert torch.equal(method("slerp", t=1.0).merge_tensor(g), thetas[1])


@pytest.mark.parametrize(
    "a, b, t, expected",
    [
        ([1.0, 0.0], [0.0, 1.0], 0.5, [math.sqrt(0.5), math.sqrt(0.5)]),
        # 90 degrees, t = 1/3: angles 30 and 60 degrees -> (sin 60, sin 30)
        ([1.0, 0.0], [0.0, 1.0], 1 / 3, [math.sqrt(3) / 2, 0.5]),
        # unnormalised inputs keep their lengths in the combination
        ([2.0, 0.0], [0.0, 3.0], 0.5, [2 * math.sqrt(0.5), 3 * math.sqrt(0.5)]),
        # 120 degrees: rho = 2pi/3, t = 1/2 -> sin(pi/3)/sin(2pi/3) = 1 for both
        ([1.0, 0.0], [-0.5, math.sqrt(3) / 2], 0.5, [0.5, math.sqrt(3) / 2]),
    ],
)
def test_slerp_two_dimensional_by_hand(a, b, t, expected):
    base = np.array([0.25, -0.5])
    deltas = np.array([np.array(a) - base, np.array(b) - base])
    out = method("slerp", t=t).merge_tensor(group("w", base, deltas, dtype=torch.float64))
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-12, atol=1e-12)


def test_slerp_matrix_against_numpy():
    rng = np.random.default_rng(12)
    base, deltas = rng.normal(size=(8, 6)), rng.normal(size=(2, 8, 6))
    a, b = (base + deltas[0]).ravel(), (base + deltas[1]).ravel()
    rho = math.acos(float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    t = 0.3
    expected = (math.sin((1 - t) * rho) * a + math.sin(t * rho) * b) / math.sin(rho)
    out = method("slerp", t=t).merge_tensor(group("w", base, deltas))
    np.testing.assert_allclose(as_np(out).ravel(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "a, b",
    [
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]),  # parallel
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.001]),  # nearly parallel: |cos| > 1 - 5e-4
        ([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]),  # anti-parallel
        ([0.0, 0.0, 0.0], [1.0, -2.0, 0.5]),  # zero-norm tensor
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
    ],
)
def test_slerp_colinear_and_zero_fall_back_to_lerp(a, b):
    a, b = np.array(a), np.array(b)
    base = np.zeros(3)
    t = 0.3
    out = method("slerp", t=t).merge_tensor(group("w", base, [a - base, b - base]))
    np.testing.assert_allclose(as_np(out), (1 - t) * a + t * b, rtol=1e-6, atol=1e-6)


def test_slerp_half_precision_compute():
    base = np.zeros(2)
    out = method("slerp").merge_tensor(group("w", base, [[1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    np.testing.assert_allclose(as_np(out), [math.sqrt(0.5)] * 2, rtol=1e-2)


# -- all methods ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_dtype_and_inputs_untouched(name, dtype):
    rng = np.random.default_rng(0)
    for shape in [(), (5,), (4, 3)]:
        g = group("w", rng.normal(size=shape), rng.normal(size=(2, *shape)), dtype=dtype)
        m = method(name) if name != "ties" else method(name, scope="tensor")
        out = assert_untouched(g, m.merge_tensor)
        assert out.shape == g.base.shape and out.dtype == dtype
        assert torch.isfinite(out).all()


# -- through the engine ------------------------------------------------------------------------

def test_ties_global_through_the_engine(tiny_models, tmp_path):
    """The engine's pre-pass (summing observe() over every floating tensor) gives the model-wide top-k."""
    from safetensors.torch import load_file

    from helpers import write_recipe
    from hubmerge.engine import merge
    from hubmerge.recipe import load_recipe

    names = ["e0", "e1", "e2"]
    out_dir = tmp_path / "ties"
    recipe = write_recipe(tmp_path / "r.yaml", base=str(tiny_models["base"]),
                          experts=[str(tiny_models[n]) for n in names],
                          method="ties", params={"k": 0.1, "scale": 0.9}, output={"path": str(out_dir)})
    result = merge(load_recipe(recipe))

    base = load_file(tiny_models["base"] / "model.safetensors")
    experts = [load_file(tiny_models[n] / "model.safetensors") for n in names]
    floating = [key for key, value in base.items() if value.dtype.is_floating_point]
    taus = {key: np.stack([as_np(e[key].float() - base[key].float()) for e in experts]) for key in floating}
    thresholds = []
    for t in range(3):
        ordered = np.sort(np.concatenate([np.abs(taus[key][t].ravel()) for key in floating]))[::-1]
        thresholds.append(float(ordered[hand_keep_count(0.1, ordered.size) - 1]))
    assert result.method.thresholds.tolist() == thresholds
    merged = load_file(out_dir / "model.safetensors")
    for key in floating:
        tau = taus[key].reshape(3, -1)
        expected = as_np(base[key]).ravel() + 0.9 * hand_ties_numpy(tau, thresholds)
        np.testing.assert_allclose(as_np(merged[key]).ravel(), expected, rtol=1e-5, atol=1e-6)
