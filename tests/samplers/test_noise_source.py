"""Per-sample reproducible noise: independent of batch size and composition."""
import random

import pytest
import torch

from duodiff_fast.samplers import NoiseSource, ddim_sample, ddpm_sample, mix_seed, seeds_for
from duodiff_fast.schedules import linear_ddpm, vp_linear

SHAPE = (2, 4, 4)


def toy_denoiser(x, t, y):
    return 0.5 * torch.tanh(x) + 0.1 * t.view(-1, 1, 1, 1)


def run(solver, seeds, schedule):
    ns = NoiseSource(seeds)
    x_T = ns.initial((len(seeds), *SHAPE))
    if solver == "ddpm":
        return ddpm_sample(toy_denoiser, schedule, x_T, noise_source=ns, num_steps=25)
    return ddim_sample(toy_denoiser, schedule, x_T, noise_source=ns, num_steps=25, eta=0.8)


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
@pytest.mark.parametrize("schedule", [linear_ddpm(), vp_linear()], ids=["discrete", "vp"])
def test_same_seed_same_image_any_batching(solver, schedule):
    seeds = seeds_for(1234, 0, 8)
    full = run(solver, seeds, schedule)
    # batch size 1
    for k in (0, 5):
        torch.testing.assert_close(run(solver, [seeds[k]], schedule)[0], full[k], rtol=0, atol=1e-6)
    # batches of 3 (last one of 2)
    parts = torch.cat([run(solver, seeds[i : i + 3], schedule) for i in range(0, 8, 3)])
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-6)
    # shuffled composition
    perm = list(range(8))
    random.Random(0).shuffle(perm)
    shuffled = run(solver, [seeds[p] for p in perm], schedule)
    torch.testing.assert_close(shuffled, full[perm], rtol=0, atol=1e-6)
    # and a different seed really gives a different sample (the test is not vacuous)
    other = run(solver, [seeds[0] + 1], schedule)[0]
    assert (other - full[0]).abs().max() > 1e-2


def test_step_noise_is_stochastic_part():
    # two runs with the same x_T but different step-noise streams must differ for eta > 0
    schedule = linear_ddpm()
    x_T = NoiseSource([1]).initial((1, *SHAPE))
    a = ddim_sample(toy_denoiser, schedule, x_T, noise_source=NoiseSource([7]), num_steps=10, eta=1.0)
    b = ddim_sample(toy_denoiser, schedule, x_T, noise_source=NoiseSource([8]), num_steps=10, eta=1.0)
    c = ddim_sample(toy_denoiser, schedule, x_T, noise_source=NoiseSource([7]), num_steps=10, eta=1.0)
    assert (a - b).abs().max() > 1e-2
    assert torch.equal(a, c)


def test_noise_source_basics():
    ns = NoiseSource([1, 2, 3], dtype=torch.float64)
    a = ns.initial((3, 5))
    assert a.shape == (3, 5) and a.dtype == torch.float64
    # rows are what a single seeded generator produces
    g = torch.Generator().manual_seed(2)
    torch.testing.assert_close(a[1], torch.randn(5, generator=g, dtype=torch.float32).double())
    # step noise continues the same stream
    torch.testing.assert_close(ns.step_noise((3, 5))[1], torch.randn(5, generator=g, dtype=torch.float32).double())
    # tensor seeds work and give the same noise
    torch.testing.assert_close(NoiseSource(torch.tensor([1, 2, 3])).initial((3, 5)), NoiseSource([1, 2, 3]).initial((3, 5)))
    assert len(ns) == 3


def test_subset_shares_streams():
    ns = NoiseSource([10, 11, 12, 13])
    ref = NoiseSource([10, 11, 12, 13])
    ns.initial((4, 3)), ref.initial((4, 3))
    sub = ns.subset([1, 3])
    assert sub.seeds == [11, 13]
    z_sub = sub.step_noise((2, 3))
    z_ref = ref.step_noise((4, 3))
    torch.testing.assert_close(z_sub, z_ref[[1, 3]])
    # the subset advanced rows 1 and 3 of the parent; rows 0 and 2 were not advanced
    nxt = ns.step_noise((4, 3))
    nxt_ref = ref.step_noise((4, 3))
    torch.testing.assert_close(nxt[[1, 3]], nxt_ref[[1, 3]])  # third draw of rows 1, 3
    torch.testing.assert_close(nxt[[0, 2]], z_ref[[0, 2]])  # second draw of rows 0, 2
    mask = ns.subset(torch.tensor([True, False, True, False]))
    assert mask.seeds == [10, 12]
    assert len(ns.subset([])) == 0 and ns.subset([]).step_noise((0, 3)).shape == (0, 3)


def test_seeds_for_is_deterministic_and_decorrelated():
    a = seeds_for(0, 0, 100)
    assert a == seeds_for(0, 0, 100)
    assert seeds_for(0, 10, 5) == a[10:15]  # depends only on the global index
    assert len(set(a)) == 100
    assert seeds_for(1, 0, 100) != a
    assert all(0 <= s < 2**63 for s in a)
    assert mix_seed(0, 1) != mix_seed(1, 0)
    # neighbouring seeds are well mixed: bits of consecutive seeds look independent
    diffs = [bin(a[i] ^ a[i + 1]).count("1") for i in range(99)]
    assert 25 < sum(diffs) / len(diffs) < 38  # ~31.5 of 63 bits flip on average


def test_bad_seeds_and_shapes():
    with pytest.raises(TypeError, match="seeds"):
        NoiseSource(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="seeds"):
        NoiseSource([-1])
    with pytest.raises(TypeError, match="seeds"):
        NoiseSource("123")
    with pytest.raises(ValueError, match="batch size 2"):
        NoiseSource([1, 2]).initial((3, 4))
    with pytest.raises(ValueError, match="base_seed"):
        seeds_for(-1, 0, 3)
    with pytest.raises(IndexError):
        NoiseSource([1, 2]).subset([2])
