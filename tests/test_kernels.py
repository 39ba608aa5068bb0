"""The compiled TIES kernels give bit-identical results to the torch path, and exact thresholds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import hubmerge_plugins._kernels as kernels
import hubmerge_plugins._sparsify as sparsify

# CI builds the extension: a build that silently failed must fail here, not skip.
pytestmark = pytest.mark.skipif(os.environ.get("HUBMERGE_KERNELS", "").lower() == "torch",
                                reason="kernels disabled by HUBMERGE_KERNELS=torch")


def test_extension_is_built():
    assert kernels.available(), "hubmerge_plugins._ckernels was not built (setup.py needs a C compiler)"


def task_vectors(kind: str, tasks: int, n: int) -> torch.Tensor:
    """float32 task vectors: normal magnitudes per task, or a coarse grid full of magnitude ties."""
    gen = torch.Generator().manual_seed(11)
    if kind == "grid":
        values = torch.randint(-8, 9, (tasks, n), generator=gen).float() * 0.25
    else:
        values = torch.randn(tasks, n, generator=gen) * torch.rand(tasks, 1, generator=gen)
        values[:, :999] = 0.0  # exact zeros, and a run of them
    return values


def torch_path(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setenv("HUBMERGE_KERNELS", "torch")
        assert not kernels.available()
        return fn()


@pytest.mark.parametrize("kind", ["normal", "grid"])
@pytest.mark.parametrize("k", [0.05, 0.3, 1.0])
def test_trim_and_merge_matches_torch_bit_for_bit(kind, k, monkeypatch):
    n = (1 << 21) + 7  # large enough for the histogram search and the worker threads; a ragged tail
    deltas = task_vectors(kind, 5, n)
    base = torch.randn(n, generator=torch.Generator().manual_seed(3))

    def run():
        return sparsify.trim_and_merge(deltas, k, None, scale=0.3, base=base)

    expected = torch_path(monkeypatch, run)
    got = run()
    assert torch.equal(got, expected)
    if k < 1.0:  # the thresholds are the m-th largest magnitudes, as sorting finds them
        m = sparsify.keep_count(k, n)
        by_sorting = deltas.abs().sort(dim=1, descending=True).values[:, m - 1]
        assert torch.equal(sparsify.tensor_thresholds(deltas, k), by_sorting)
        assert torch.equal(torch_path(monkeypatch, lambda: sparsify.tensor_thresholds(deltas, k)), by_sorting)


def test_merge_without_base_or_trim_matches_torch(monkeypatch):
    deltas = task_vectors("normal", 3, 70_001)
    thresholds = torch.tensor([0.5, 0.0, 2.0])

    def run():
        return sparsify.trim_and_merge(deltas, 0.5, thresholds, scale=1.0)

    expected = torch_path(monkeypatch, run)
    assert torch.equal(run(), expected)
    # a block of the same numbers by hand: trim, elect, disjoint mean
    block = deltas[:, :64].double()
    kept = block * (block.abs() >= thresholds.double().unsqueeze(1))
    sign = kept.sum(0).sign()
    agree = (kept * sign > 0)
    hand = (kept * agree).sum(0) / agree.sum(0).clamp(min=1)
    np.testing.assert_allclose(run()[:64].double().numpy(), hand.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["normal", "grid"])
def test_global_histograms_match_torch(kind, monkeypatch):
    deltas = task_vectors(kind, 4, (1 << 20) + 3)
    tensors = [deltas[:, :1000].contiguous(), deltas[:, 1000:].contiguous()]

    def thresholds():
        finder = sparsify.GlobalThreshold(0.2, key="ties")
        for pass_index in range(2):
            totals = {}
            for part in tensors:
                for key, value in finder.observe(pass_index, part).items():
                    totals[key] = totals.get(key, 0) + value
            finder.finish_pass(pass_index, totals)
        return finder.require(4)

    expected = torch_path(monkeypatch, thresholds)
    m = sparsify.keep_count(0.2, deltas.shape[1])
    assert torch.equal(expected, deltas.abs().sort(dim=1, descending=True).values[:, m - 1])
    assert torch.equal(thresholds(), expected)


def test_kernels_only_for_contiguous_float32_on_cpu(monkeypatch):
    values = torch.ones(2, 8)
    assert sparsify._use_kernels(values)
    assert not sparsify._use_kernels(values.double())
    assert not sparsify._use_kernels(values.bfloat16())
    assert not sparsify._use_kernels(values.t())
    monkeypatch.setenv("HUBMERGE_KERNELS", "torch")
    assert not sparsify._use_kernels(values)
