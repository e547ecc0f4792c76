"""Noise schedules: closed forms, grid exactness, round trips, network inputs, bad inputs."""
import math

import pytest
import torch

from duodiff_fast.schedules import (
    SCHEDULES,
    ContinuousVPSchedule,
    DiscreteSchedule,
    NoiseSchedule,
    get_schedule,
    linear_ddpm,
    scaled_linear,
    vp_linear,
)


def all_schedules():
    return [linear_ddpm(), scaled_linear(), vp_linear(), linear_ddpm(time_input="normalized")]


def test_linear_ddpm_alphas_cumprod_is_direct_cumprod():
    s = linear_ddpm()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    prod, expected = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        expected.append(prod)
    assert s.num_timesteps == 1000
    assert s.betas.dtype == torch.float64
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
    # alpha_bar at grid points t_i = (i + 1) / N is alphas_cumprod[i]
    t = s.discrete_grid(1000)
    torch.testing.assert_close(s.alpha_bar(t), s.alphas_cumprod, rtol=1e-12, atol=0)


def test_scaled_linear_betas():
    s = scaled_linear()
    root = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64)
    torch.testing.assert_close(s.betas, root**2, rtol=1e-12, atol=0)
    assert abs(float(s.betas[0]) - 0.00085) < 1e-12 and abs(float(s.betas[-1]) - 0.012) < 1e-12


def test_vp_log_alpha_closed_form():
    s = vp_linear()
    t = torch.tensor([1e-4, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = -(20.0 - 0.1) / 4 * t**2 - 0.1 / 2 * t
    torch.testing.assert_close(s.log_alpha(t), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.alpha_bar(t), torch.exp(2 * expected), rtol=1e-13, atol=0)
    torch.testing.assert_close(s.sigma(t), torch.sqrt(1 - torch.exp(2 * expected)), rtol=1e-12, atol=0)
    lam = expected - 0.5 * torch.log(1 - torch.exp(2 * expected))
    torch.testing.assert_close(s.lambda_(t), lam, rtol=1e-12, atol=1e-12)
    # known value: log alpha(1) = -(19.9)/4 - 0.05
    assert abs(float(s.log_alpha(1.0)) - (-19.9 / 4 - 0.05)) < 1e-14


@pytest.mark.parametrize("sched", all_schedules(), ids=repr)
def test_lambda_inverse_round_trip(sched):
    t = torch.linspace(sched.t_min, 1.0, 257, dtype=torch.float64)
    back = sched.inverse_lambda(sched.lambda_(t))
    torch.testing.assert_close(back, t, rtol=1e-9, atol=1e-12)
    # and the other way round on lambda values inside the range
    lam = torch.linspace(float(sched.lambda_(1.0)), float(sched.lambda_(sched.t_min)), 101, dtype=torch.float64)
    torch.testing.assert_close(sched.lambda_(sched.inverse_lambda(lam)), lam, rtol=1e-9, atol=1e-9)
    # lambda decreases in t
    assert bool((sched.lambda_(t)[1:] < sched.lambda_(t)[:-1]).all())


def test_discrete_log_alpha_exact_at_grid_and_linear_between():
    s = linear_ddpm(num_timesteps=1000)
    grid_la = 0.5 * torch.log(s.alphas_cumprod)
    t = s.discrete_grid(1000)
    torch.testing.assert_close(s.log_alpha(t), grid_la, rtol=0, atol=1e-15)
    # halfway between grid points i and i+1: the mean of the two values
    i = torch.tensor([0, 17, 500, 998])
    mid = (i.double() + 1.5) / 1000
    torch.testing.assert_close(s.log_alpha(mid), 0.5 * (grid_la[i] + grid_la[i + 1]), rtol=1e-12, atol=0)
    # float32 grid points are still exact up to float32 rounding of the result
    t32 = t.float()
    torch.testing.assert_close(s.log_alpha(t32), grid_la.float(), rtol=1e-5, atol=1e-7)
    assert s.log_alpha(t32).dtype == torch.float32


def test_model_input_index_and_normalized_and_vp():
    N = 1000
    idx = torch.tensor([0, 1, 123, 499, 999])
    t = (idx.double() + 1) / N
    s = linear_ddpm()
    assert torch.equal(s.model_input(t), idx.double())
    assert torch.equal(s.model_input(t.float()), idx.float())  # snapped to exact ints in float32 too
    sn = linear_ddpm(time_input="normalized")
    torch.testing.assert_close(sn.model_input(t), idx.double() / N, rtol=0, atol=1e-15)
    v = vp_linear()
    tv = torch.tensor([1e-4, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(v.model_input(tv), tv * 999, rtol=1e-15, atol=0)
    # a fractional time between grid points maps to a fractional index
    assert abs(float(s.model_input(torch.tensor(0.5005, dtype=torch.float64))) - 499.5) < 1e-9


def test_step_position():
    s = linear_ddpm()
    idx = torch.tensor([0, 299, 699, 999])
    t = ((idx + 1).double() / 1000).float()
    assert torch.equal(s.step_position(t), (idx + 1).float())
    # a 500-step discrete schedule scales to the 1000-step axis
    s500 = linear_ddpm(num_timesteps=500)
    t500 = torch.tensor([1 / 500, 250 / 500, 1.0], dtype=torch.float64)
    assert torch.equal(s500.step_position(t500), torch.tensor([2.0, 500.0, 1000.0], dtype=torch.float64))
    v = vp_linear()
    torch.testing.assert_close(v.step_position(torch.tensor([0.3, 1.0])), torch.tensor([300.0, 1000.0]))


@pytest.mark.parametrize("sched", all_schedules(), ids=repr)
def test_add_noise_formula(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([sched.t_min, 0.5, 1.0])
    out = sched.add_noise(x0, noise, t)
    ab = sched.alpha_bar(t.double()).view(3, 1, 1, 1)
    ref = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float32


def test_sample_training_t():
    s = linear_ddpm(num_timesteps=10)
    g = torch.Generator().manual_seed(1)
    t = s.sample_training_t(4000, generator=g)
    assert t.shape == (4000,) and t.dtype == torch.float32
    i = torch.round(t.double() * 10).long() - 1
    torch.testing.assert_close(t.double(), (i + 1).double() / 10, rtol=0, atol=1e-7)  # on the grid
    counts = torch.bincount(i, minlength=10)
    assert counts.min() > 300 and counts.max() < 500  # roughly uniform over all 10 points
    v = vp_linear()
    tv = v.sample_training_t(4000, generator=torch.Generator().manual_seed(2))
    assert float(tv.min()) >= 1e-4 and float(tv.max()) <= 1.0
    assert abs(float(tv.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("sched", all_schedules(), ids=repr)
def test_bad_t_raises_with_range(sched):
    sched.check_t(torch.tensor([sched.t_min, 1.0]))
    sched.check_t(torch.tensor([sched.t_min], dtype=torch.float32))  # float32 rounding of t_min is fine
    for bad in (torch.tensor([0.0]), torch.tensor([1.01]), torch.tensor([sched.t_min * 0.5]), torch.tensor([float("nan")])):
        with pytest.raises(ValueError, match="t"):
            sched.check_t(bad)
    with pytest.raises(ValueError, match=r"\[.*1\]"):
        sched.check_t(torch.tensor([2.0]))
    with pytest.raises(ValueError):
        sched.add_noise(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([1.5]))


def test_discrete_grid():
    v = vp_linear()
    g = v.discrete_grid(4)
    assert g.dtype == torch.float64
    assert torch.equal(g, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    s = linear_ddpm()
    assert s.discrete_grid(1000).shape == (1000,)
    with pytest.raises(ValueError, match="1000"):
        s.discrete_grid(50)
    with pytest.raises(ValueError):
        v.discrete_grid(0)


def test_registry_and_errors():
    assert set(SCHEDULES) == {"linear", "vp-linear", "scaled-linear"}
    assert isinstance(get_schedule("linear"), DiscreteSchedule)
    assert isinstance(get_schedule("vp-linear"), ContinuousVPSchedule)
    assert get_schedule("linear", num_timesteps=50).num_timesteps == 50
    with pytest.raises(ValueError, match="scaled-linear"):
        get_schedule("cosine")
    with pytest.raises(NotImplementedError):
        NoiseSchedule().log_alpha(torch.tensor(0.5))
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="time_input"):
        DiscreteSchedule(torch.tensor([0.1, 0.2]), time_input="seconds")


def test_dtype_and_device_follow_input():
    s = vp_linear()
    assert s.alpha_bar(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert s.alpha_bar(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64
    assert s.alpha_bar(0.5).dtype == torch.float64
    assert s.T == 1000 and s.t_max == 1.0
