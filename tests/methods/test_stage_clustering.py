"""Optimal-denoiser clustering against direct (brute-force) computations on small synthetic data."""
import itertools
import math

import numpy as np
import pytest
import torch

from duodiff_fast.methods.stage_clustering import (
    cluster_stages, cluster_three_stages, functional_similarity, optimal_denoiser, partition_boundaries,
    threshold_boundaries,
)
from duodiff_fast.schedules import vp_linear


def _data(n=9, shape=(3, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=torch.float64) * 2 - 1


def _direct_eps(x, t, data, schedule):
    """eps*(x; t) one query at a time: Gaussian log-densities from explicit differences, softmax."""
    ys = data.reshape(data.shape[0], -1).double()
    out = []
    for xi, ti in zip(x.reshape(x.shape[0], -1).double(), t.double()):
        a = float(schedule.alpha(ti.reshape(1)))
        s = float(schedule.sigma(ti.reshape(1)))
        logp = torch.stack([-((xi - a * y) ** 2).sum() / (2 * s * s) for y in ys])
        w = torch.softmax(logp, 0)
        mean = (w[:, None] * ys).sum(0)
        out.append((xi - a * mean) / s)
    return torch.stack(out).reshape(x.shape)


def test_optimal_denoiser_matches_direct_computation_across_chunks():
    sched = vp_linear()
    data = _data()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    x0 = data[torch.randint(0, 9, (7,), generator=g)]
    x = sched.alpha(t)[:, None, None, None] * x0 + sched.sigma(t)[:, None, None, None] * torch.randn(
        x0.shape, generator=g, dtype=torch.float64)
    ref = _direct_eps(x, t, data, sched)
    ref32 = _direct_eps(x.float(), t, data, sched)
    for chunk in (2, 4, 1000):
        got = optimal_denoiser(x.float(), t, data, sched, chunk_size=chunk)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref32, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(optimal_denoiser(x, t, data.numpy(), sched, chunk_size=3), ref, rtol=1e-9, atol=1e-9)


def test_optimal_denoiser_limits():
    sched = vp_linear()
    data = _data()
    g = torch.Generator().manual_seed(2)
    e = torch.randn(9, 3, 2, 2, generator=g, dtype=torch.float64)
    # Near the data the posterior sits on the training point: eps* is the true noise.
    t = torch.full((9,), 1e-3, dtype=torch.float64)
    x = sched.alpha(t)[:, None, None, None] * data + sched.sigma(t)[:, None, None, None] * e
    torch.testing.assert_close(optimal_denoiser(x, t, data, sched), e, rtol=0, atol=1e-6)
    # uint8 pixels are read as x / 127.5 - 1.
    pix = torch.randint(0, 256, (5, 3, 2, 2), generator=g, dtype=torch.uint8)
    tq = torch.full((5,), 0.4, dtype=torch.float64)
    xq = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(optimal_denoiser(xq, tq, pix, sched),
                               _direct_eps(xq, tq, pix.double() / 127.5 - 1, sched), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="values per sample"):
        optimal_denoiser(torch.zeros(2, 5), torch.ones(2), data, sched)


def test_functional_similarity_counts_close_coordinates():
    a = torch.zeros(2, 4, dtype=torch.float64)
    b = torch.tensor([[0.0, 0.005, 0.01, -0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert functional_similarity(a, b, eta=2 / 256).tolist() == [0.5, 1.0]


def _brute_thresholds(t, s0, s1, alpha, steps):
    t1 = t2 = None
    for j in range(steps + 1):
        tau = j / steps
        sel0 = [s for tk, s in zip(t.tolist(), s0.tolist()) if tk <= tau]
        if sel0 and sum(sel0) / len(sel0) >= alpha:
            t1 = tau
        sel1 = [s for tk, s in zip(t.tolist(), s1.tolist()) if tk >= tau]
        if t2 is None and sel1 and sum(sel1) / len(sel1) >= alpha:
            t2 = tau
    return t1, t2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_boundaries_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(80, generator=g, dtype=torch.float64)
    s0 = (1 - t + 0.2 * torch.rand(80, generator=g, dtype=torch.float64)).clamp(0, 1)
    s1 = (t + 0.2 * torch.rand(80, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert threshold_boundaries(t, s0, s1, 0.8, 200) == _brute_thresholds(t, s0, s1, 0.8, 200)
    with pytest.raises(ValueError, match="alpha"):
        threshold_boundaries(t, s0 * 0, s1, 0.8, 200)


def _brute_partition(ta, tb, sim, n, bins):
    ia = np.minimum((ta.numpy() * bins).astype(int), bins - 1)
    ib = np.minimum((tb.numpy() * bins).astype(int), bins - 1)
    best = None
    for cut in itertools.combinations(range(1, bins), n - 1):
        edges = (0,) + cut + (bins,)
        seg = np.searchsorted(np.array(edges[1:]), np.arange(bins), side="right")
        cost = float(((1 - sim.numpy()) * (seg[ia] == seg[ib])).sum())
        if best is None or cost < best[0] - 1e-12:
            best = (cost, tuple(c / bins for c in cut))
    return best[1]


@pytest.mark.parametrize("n,seed", [(2, 0), (3, 1), (4, 2)])
def test_partition_boundaries_match_exhaustive_search(n, seed):
    g = torch.Generator().manual_seed(seed)
    ta = torch.rand(300, generator=g, dtype=torch.float64)
    tb = torch.rand(300, generator=g, dtype=torch.float64)
    sim = torch.exp(-3 * (ta - tb).abs()) * (0.8 + 0.2 * torch.rand(300, generator=g, dtype=torch.float64))
    got = partition_boundaries(ta, tb, sim, n, bins=9)
    assert got == _brute_partition(ta, tb, sim, n, 9)
    assert len(got) == n - 1 and list(got) == sorted(set(got)) and 0 < got[0] and got[-1] < 1


def test_cluster_three_stages_against_direct_similarities():
    sched = vp_linear()
    data = _data(n=12, shape=(3, 4, 4), seed=3)
    res = cluster_three_stages(data, num_samples=48, alpha=0.9, eta=0.05, schedule=sched, grid_steps=500,
                               batch_size=64, chunk_size=5, progress=False, seed=4)
    t1, t2 = res.boundaries
    assert 0 < t1 < t2 < 1
    # Recompute every similarity directly with the same draws (t, then data indices, then noise).
    g = torch.Generator().manual_seed(4)
    t = 1e-3 + (1 - 1e-3) * torch.rand(48, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 12, (48,), generator=g)
    noise = torch.randn(48, 48, generator=g, dtype=torch.float64)
    x0 = data.reshape(12, -1)[idx]

    def eps_at(tt):
        xt = sched.alpha(tt)[:, None] * x0 + sched.sigma(tt)[:, None] * noise
        return _direct_eps(xt, tt, data.reshape(12, -1), sched)

    e_t = eps_at(t)
    s0 = functional_similarity(e_t, eps_at(torch.full_like(t, 1e-3)), 0.05)
    s1 = functional_similarity(e_t, eps_at(torch.ones_like(t)), 0.05)
    torch.testing.assert_close(res.t, t)
    torch.testing.assert_close(res.similarity, torch.stack([s0, s1]))
    assert res.boundaries == threshold_boundaries(t, s0, s1, 0.9, 500)


def test_cluster_stages_n_way():
    data = _data(n=10, shape=(3, 4, 4), seed=5)
    res = cluster_stages(data, 3, num_samples=64, eta=0.05, bins=10, progress=False, seed=0, batch_size=32)
    assert len(res.boundaries) == 2 and 0 < res.boundaries[0] < res.boundaries[1] < 1
    assert res.boundaries == partition_boundaries(res.t[0], res.t[1], res.similarity, 3, 10)
    assert math.isclose(res.boundaries[0] * 10, round(res.boundaries[0] * 10))


def test_sigma_axis_is_the_same_clustering():
    """eps*(x_t; t) on the VP axis equals EDM's (x - D*(x; sigma)) / sigma at x = x_t / a_t, sigma = s_t / a_t,
    with D*(x; sigma) the optimal EDM denoiser over the same data: the stages carry over to sigma."""
    from duodiff_fast.methods.stage_clustering import sigma_of_t

    g = torch.Generator().manual_seed(0)
    data = torch.randn(7, 3, 2, 2, generator=g, dtype=torch.float64)
    sched = vp_linear()
    t = torch.tensor([0.05, 0.3, 0.442, 0.7, 0.95], dtype=torch.float64)
    y = data[torch.tensor([0, 3, 5, 1, 6])]
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    a, s = sched.alpha(t).view(-1, 1, 1, 1), sched.sigma(t).view(-1, 1, 1, 1)
    xt = a * y + s * eps
    vp = optimal_denoiser(xt, t, data, sched, chunk_size=3)
    sig = sigma_of_t(t, sched).view(-1, 1, 1, 1)
    x = xt / a
    d2 = ((x.reshape(5, 1, -1) - data.reshape(1, 7, -1)) ** 2).sum(-1)  # (5, 7)
    w = torch.softmax(-d2 / (2 * sig.reshape(5, 1) ** 2), dim=1)
    denoised = (w @ data.reshape(7, -1)).reshape(x.shape)
    assert torch.allclose(vp, (x - denoised) / sig, rtol=1e-9, atol=1e-9)


def test_sigma_stage_interval_and_routing():
    from duodiff_fast.edm import stage_from_sigma
    from duodiff_fast.methods.multistage import stage_of
    from duodiff_fast.methods.stage_clustering import sigma_of_t, sigma_stage_interval

    iv = sigma_stage_interval((0.442, 0.6308))
    assert iv[0][0][0] == 0.0 and iv[-1][0][1] == math.inf and len(iv) == 3
    assert iv[0][0][1] == pytest.approx(2.5103, abs=5e-4)  # the authors' first EDM boundary
    t = torch.linspace(0.001, 1.0, 997, dtype=torch.float64)
    sig = sigma_of_t(t)
    assert bool((sig[1:] > sig[:-1]).all())
    routed = [stage_from_sigma(float(v), iv) for v in sig]
    assert routed == stage_of(t, (0.442, 0.6308)).tolist()
    with pytest.raises(ValueError):
        sigma_stage_interval((0.7, 0.3))
