"""DDPM and DDIM against closed forms."""
import pytest
import torch

from duodiff_fast.samplers import (
    DDIMSampler,
    DDPMSampler,
    NoiseSource,
    alpha_bar_grid,
    ddim_sample,
    ddpm_sample,
    respaced_indices,
)
from duodiff_fast.schedules import linear_ddpm, scaled_linear, vp_linear


class OracleDenoiser:
    """Exact eps for data that is always ``x0``: eps = (x - sqrt(ab) x0) / sqrt(1 - ab)."""

    def __init__(self, schedule, x0):
        self.schedule, self.x0, self.calls = schedule, x0, []

    def __call__(self, x, t, y):
        self.calls.append(t.clone())
        ab = self.schedule.alpha_bar(t.double()).view(-1, *([1] * (x.dim() - 1)))
        return ((x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()).to(x.dtype)


class AffineDenoiser:
    """A smooth, t-dependent but otherwise arbitrary eps model (for one-step comparisons)."""

    def __call__(self, x, t, y):
        return 0.3 * x + 0.1 * t.view(-1, 1, 1, 1).to(x.dtype) + 0.05


SCHEDULES = [linear_ddpm(), scaled_linear(), vp_linear()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__ + str(getattr(s, "num_timesteps", "")))
@pytest.mark.parametrize("num_steps", [1, 7, 50])
def test_ddim_eta0_recovers_x0_exactly(schedule, num_steps):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    x_T = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    den = OracleDenoiser(schedule, x0)
    out = ddim_sample(den, schedule, x_T, num_steps=num_steps, eta=0.0)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    assert len(den.calls) == num_steps


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("num_steps", [None, 10])
def test_ddpm_oracle_recovers_x0_final_step_noise_free(variance, num_steps):
    # With the exact eps every step's x0-prediction is x0; the last step (to alpha_bar = 1)
    # must return it without adding noise.
    schedule = linear_ddpm()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    x_T = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    den = OracleDenoiser(schedule, x0)
    out = ddpm_sample(den, schedule, x_T, noise_source=NoiseSource([1, 2, 3], dtype=torch.float64),
                      num_steps=num_steps, variance=variance)
    torch.testing.assert_close(out, x0, rtol=1e-8, atol=1e-8)
    assert len(den.calls) == (1000 if num_steps is None else num_steps)
    # times visited: descending, starting at t = 1, ending at the first grid point
    ts = torch.stack([c[0] for c in den.calls])
    assert float(ts[0]) == 1.0 and abs(float(ts[-1]) - 1e-3) < 1e-12
    assert bool((ts[1:] < ts[:-1]).all())


def _first_step(sampler, x_T, seeds):
    """Run ``sampler`` and return x after its first (noisiest) step."""
    seen = {}

    def cb(step, t, x):
        if step == 0:
            seen["x"], seen["t"] = x.clone(), t.clone()

    sampler.sample(AffineDenoiser(), x_T, noise_source=NoiseSource(seeds, dtype=torch.float64), callback=cb)
    return seen["x"], seen["t"]


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_one_step_hand_computed(variance):
    schedule = linear_ddpm()
    ac = schedule.alphas_cumprod
    seeds = [11, 12]
    x_T = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # 4 respaced steps (linspace): indices 0, 333, 666, 999; first step 999 -> 666
    sampler = DDPMSampler(schedule, num_steps=4, variance=variance)
    assert sampler.indices.tolist() == [0, 333, 666, 999]
    x1, t = _first_step(sampler, x_T, seeds)
    assert float(t[0]) == 1.0
    ab, ab_prev = float(ac[999]), float(ac[666])
    beta = 1 - ab / ab_prev
    eps = 0.3 * x_T + 0.1 * 1.0 + 0.05
    mean = (x_T - beta / (1 - ab) ** 0.5 * eps) / (1 - beta) ** 0.5
    var = beta if variance == "beta" else (1 - ab_prev) / (1 - ab) * beta
    z = NoiseSource(seeds, dtype=torch.float64).step_noise(x_T.shape)
    torch.testing.assert_close(x1, mean + var**0.5 * z, rtol=1e-12, atol=1e-12)


def test_ddim_one_step_hand_computed_with_eta():
    schedule = vp_linear()
    t_grid, ab_grid = alpha_bar_grid(schedule)
    eta, seeds = 0.7, [21, 22]
    x_T = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sampler = DDIMSampler(schedule, num_steps=10, eta=eta)  # uniform: indices 0, 100, ..., 900
    assert sampler.indices.tolist() == list(range(0, 1000, 100))
    x1, t = _first_step(sampler, x_T, seeds)
    assert abs(float(t[0]) - 0.901) < 1e-12
    ab = float(torch.exp(torch.tensor(2 * (-(19.9) / 4 * 0.901**2 - 0.05 * 0.901), dtype=torch.float64)))
    ab_prev = float(torch.exp(torch.tensor(2 * (-(19.9) / 4 * 0.801**2 - 0.05 * 0.801), dtype=torch.float64)))
    assert abs(float(ab_grid[900]) - ab) < 1e-15
    sigma = eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5
    eps = 0.3 * x_T + 0.1 * 0.901 + 0.05
    x0_pred = (x_T - (1 - ab) ** 0.5 * eps) / ab**0.5
    z = NoiseSource(seeds, dtype=torch.float64).step_noise(x_T.shape)
    expected = ab_prev**0.5 * x0_pred + (1 - ab_prev - sigma**2) ** 0.5 * eps + sigma * z
    torch.testing.assert_close(x1, expected, rtol=1e-12, atol=1e-12)


def test_ddim_eta1_equals_ddpm_beta_tilde_on_same_steps():
    schedule = linear_ddpm()
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    seeds = [5, 6, 7]
    a = ddim_sample(AffineDenoiser(), schedule, x_T, noise_source=NoiseSource(seeds, dtype=torch.float64),
                    num_steps=20, eta=1.0, spacing="linspace")
    b = ddpm_sample(AffineDenoiser(), schedule, x_T, noise_source=NoiseSource(seeds, dtype=torch.float64),
                    num_steps=20, variance="beta_tilde", spacing="linspace")
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    c = ddpm_sample(AffineDenoiser(), schedule, x_T, noise_source=NoiseSource(seeds, dtype=torch.float64),
                    num_steps=20, variance="beta", spacing="linspace")
    assert (a - c).abs().max() > 1e-3  # the two variances really differ


class GaussianOptimalDenoiser:
    """Optimal eps for data x0 ~ N(mu, s^2 I): sqrt(1-ab) (x - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def __init__(self, schedule, mu, s):
        self.schedule, self.mu, self.s = schedule, mu, s

    def __call__(self, x, t, y):
        assert bool((t == t[0]).all())  # the solvers step all rows together
        ab = float(self.schedule.alpha_bar(t[:1].double()))
        return ((1 - ab) ** 0.5 / (ab * self.s**2 + 1 - ab)) * (x - ab**0.5 * self.mu)


@pytest.mark.parametrize("solver", ["ddpm", "ddpm100", "ddim"])
def test_gaussian_data_recovers_its_distribution(solver):
    mu, s = 0.5, 0.3
    schedule = linear_ddpm()
    den = GaussianOptimalDenoiser(schedule, mu, s)
    torch.manual_seed(0)  # noise_source=None draws from torch's global RNG
    x_T = torch.randn(4000, 1, 1, 1, dtype=torch.float64)
    if solver == "ddpm":
        out = ddpm_sample(den, schedule, x_T)
    elif solver == "ddpm100":
        out = ddpm_sample(den, schedule, x_T, num_steps=100, variance="beta_tilde")
    else:
        out = ddim_sample(den, schedule, x_T, num_steps=50)
    assert abs(float(out.mean()) - mu) < 0.03
    assert abs(float(out.std()) - s) < 0.03


def test_respaced_indices():
    assert respaced_indices(1000, 50, "uniform").tolist() == list(range(0, 1000, 20))
    assert respaced_indices(1000, 30, "uniform").tolist() == [33 * k for k in range(30)]
    lin = respaced_indices(1000, 7, "linspace").tolist()
    assert lin[0] == 0 and lin[-1] == 999 and len(set(lin)) == 7 and lin == sorted(lin)
    assert respaced_indices(1000, 1000, "linspace").tolist() == list(range(1000))
    assert respaced_indices(1000, 1, "linspace").tolist() == [999]
    tr = respaced_indices(1000, 50, "trailing").tolist()
    assert tr[-1] == 999 and tr[0] == 19 and len(set(tr)) == 50
    with pytest.raises(ValueError, match="spacing"):
        respaced_indices(1000, 10, "random")


def test_respaced_betas_match_schedule_when_not_respaced():
    schedule = linear_ddpm()
    full = DDPMSampler(schedule)
    torch.testing.assert_close(full.betas, schedule.betas, rtol=1e-9, atol=1e-12)
    # respaced: betas from consecutive kept alpha_bars
    r = DDPMSampler(schedule, num_steps=4)
    ac = schedule.alphas_cumprod
    expected = torch.stack([1 - ac[0], 1 - ac[333] / ac[0], 1 - ac[666] / ac[333], 1 - ac[999] / ac[666]])
    torch.testing.assert_close(r.betas, expected, rtol=1e-12, atol=0)


def test_bad_inputs():
    schedule = linear_ddpm()
    x = torch.zeros(2, 1, 2, 2)
    den = AffineDenoiser()
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            DDPMSampler(schedule, num_steps=bad)
        with pytest.raises(ValueError, match="num_steps"):
            DDIMSampler(schedule, num_steps=bad)
    with pytest.raises(TypeError, match="num_steps"):
        DDIMSampler(schedule, num_steps=2.5)
    with pytest.raises(ValueError, match="variance"):
        DDPMSampler(schedule, variance="learned")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(schedule, eta=-0.1)
    with pytest.raises(TypeError, match="y"):
        ddim_sample(den, schedule, x, y=torch.zeros(2), num_steps=2)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        ddim_sample(den, schedule, x, y=torch.zeros(3, dtype=torch.long), num_steps=2)
    with pytest.raises(ValueError, match="noise_source"):
        ddpm_sample(den, schedule, x, noise_source=NoiseSource([1, 2, 3]), num_steps=2)
    with pytest.raises(TypeError, match="x_T"):
        ddim_sample(den, schedule, torch.zeros(2, 1, 2, 2, dtype=torch.long), num_steps=2)
    with pytest.raises(ValueError, match="denoiser must return"):
        ddim_sample(lambda x, t, y: x[:1], schedule, x, num_steps=2)
    with pytest.raises(TypeError, match="schedule"):
        DDIMSampler("linear")
