"""EDM's sigma grid and the Heun sampler: closed forms, evaluation count, dtype, churn."""
import math

import pytest
import torch

from duodiff_fast.edm import HeunConfig, heun_nfe, heun_sample, sigma_grid


def test_grid_closed_form():
    g = sigma_grid(18)
    assert g.dtype == torch.float64 and g.shape == (19,)
    assert g[0].item() == pytest.approx(80.0) and g[17].item() == pytest.approx(0.002) and g[18] == 0
    i = 5
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert g[i].item() == pytest.approx(ref, rel=1e-12)
    assert bool((g[:-1] > g[1:]).all())


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=2, sigma_min=5.0, sigma_max=1.0),
                                 dict(num_steps=2, rho=0.0)])
def test_grid_refuses(bad):
    with pytest.raises(ValueError):
        sigma_grid(**bad)


class Counter:
    """A Gaussian-data denoiser (exact for data ~ N(0, sd^2)) that counts its calls."""

    def __init__(self, sd=0.5):
        self.sd, self.calls, self.dtypes = sd, 0, set()

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        self.dtypes.add(x.dtype)
        return (x.to(torch.float32) * (self.sd ** 2 / (self.sd ** 2 + sigma ** 2))).to(torch.float32)


@pytest.mark.parametrize("n", [1, 2, 18])
def test_nfe_and_float64_state(n):
    den = Counter()
    x0 = heun_sample(den, torch.randn(2, 3, 4, 4), HeunConfig(num_steps=n))
    assert den.calls == heun_nfe(n) == 2 * n - 1
    assert den.dtypes == {torch.float64} and x0.dtype == torch.float64


def test_gaussian_data_second_order_convergence():
    """For N(0, sd^2) data the probability-flow ODE maps x_T to x_T sqrt(sd^2 + s^2) / sqrt(sd^2 + smax^2)
    at level s, and the final Euler step to 0 returns D exactly: Heun's error falls ~4x per doubling."""
    sd, smin, smax = 0.5, 0.002, 80.0
    lat = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = lat * smax * math.sqrt(sd ** 2 + smin ** 2) / math.sqrt(sd ** 2 + smax ** 2) * sd ** 2 / (sd ** 2 + smin ** 2)
    errs = [float((heun_sample(Counter(sd), lat, HeunConfig(num_steps=n)) - exact).norm() / exact.norm())
            for n in (20, 40, 80)]
    assert errs[2] < 3e-3
    assert 3.0 < errs[0] / errs[1] < 5.5 and 3.0 < errs[1] / errs[2] < 5.5, errs


def test_churn_adds_noise_in_window_only():
    lat = torch.randn(1, 1, 2, 2)
    calls = []

    def randn_like(x):
        calls.append(1)
        return torch.zeros_like(x)

    base = heun_sample(Counter(), lat, HeunConfig(num_steps=6))
    churned = heun_sample(Counter(), lat, HeunConfig(num_steps=6, S_churn=40, S_min=0.05, S_max=50),
                          randn_like=randn_like)
    grid = sigma_grid(6)
    assert len(calls) == int(((grid[:-1] >= 0.05) & (grid[:-1] <= 50)).sum())
    assert not torch.equal(base, churned)  # t_hat differs even with zero noise
    with pytest.raises(ValueError):
        HeunConfig(S_churn=-1)


def test_denoiser_limits_clip_the_grid():
    den = Counter()
    den.sigma_max = 10.0
    seen = []
    orig = den.__call__

    class Wrap:
        sigma_min, sigma_max = 0.0, 10.0

        def __call__(self, x, s, y=None):
            seen.append(float(s))
            return orig(x, s, y)

    heun_sample(Wrap(), torch.randn(1, 1, 2, 2), HeunConfig(num_steps=3))
    assert seen[0] == pytest.approx(10.0)
