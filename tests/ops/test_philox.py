"""Philox noise: the pure-PyTorch stream (always) and the native op against it (when _C is built)."""
import math

import pytest
import torch

from duodiff_fast import _native
from duodiff_fast.samplers import NoiseSource
from duodiff_fast.samplers.philox import (
    PhiloxNoise,
    philox4x32_10_reference,
    philox_normal,
    philox_normal_reference,
)

needs_native = pytest.mark.skipif(not _native.available(), reason=f"duodiff_fast._C not built: {_native.load_error()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _words(c, k):
    return [int(v) for v in philox4x32_10_reference([torch.tensor(v) for v in c], [torch.tensor(v) for v in k])]


def test_philox_known_answers():
    # Random123's known-answer vectors of Philox4x32-10.
    assert _words([0] * 4, [0] * 2) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert _words([m] * 4, [m] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("sample_shape", [(1,), (3, 5, 7), (4, 8, 8), (2, 3)])
def test_same_noise_whatever_the_batch(sample_shape):
    seeds = torch.tensor([11, 2**62 + 3, -7, 0, 123456789], dtype=torch.int64)
    full = philox_normal(seeds, 3, sample_shape)
    for i in range(len(seeds)):
        alone = philox_normal(seeds[i : i + 1], 3, sample_shape)
        assert torch.equal(full[i : i + 1], alone)
    assert torch.equal(philox_normal(seeds.flip(0), 3, sample_shape), full.flip(0))


def test_distribution():
    z = philox_normal_reference(torch.arange(32, dtype=torch.int64), 1, (4096,)).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 6 * math.sqrt(2 / n)
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01  # shape, not only moments
    # steps and seeds decorrelate
    a = philox_normal_reference(torch.tensor([5]), 1, (20000,)).double().flatten()
    b = philox_normal_reference(torch.tensor([5]), 2, (20000,)).double().flatten()
    c = philox_normal_reference(torch.tensor([6]), 1, (20000,)).double().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.05
    assert abs(torch.corrcoef(torch.stack([a, c]))[0, 1]) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    seeds = torch.tensor([1, 2, 3])
    z = philox_normal(seeds, 0, (3, 5), dtype)
    assert z.dtype == dtype and z.shape == (3, 3, 5)
    assert torch.equal(z, philox_normal_reference(seeds, 0, (3, 5)).to(dtype))


@needs_native
@pytest.mark.parametrize("sample_shape", [(1,), (5,), (3, 7, 9), (4, 16, 16)])
def test_native_matches_reference(sample_shape):
    seeds = torch.tensor([0, 1, 2**63 - 1, -(2**63), 987654321987], dtype=torch.int64)
    for step in (0, 1, 2**33 + 5):
        native = torch.ops.duodiff.philox_normal(seeds, step, list(sample_shape), torch.float32)
        ref = philox_normal_reference(seeds, step, sample_shape)
        # float64 math rounded to float32 on both sides: equal up to 1 float ulp at most.
        torch.testing.assert_close(native, ref, rtol=1.2e-7, atol=1e-7)


def test_noise_source_interface():
    ns = PhiloxNoise([5, 6, 7])
    assert isinstance(ns, NoiseSource) and len(ns) == 3
    x0 = ns.initial((3, 2, 4))
    z1 = ns.step_noise((3, 2, 4))
    seeds = torch.tensor([5, 6, 7])
    assert torch.equal(x0, philox_normal_reference(seeds, 0, (2, 4)))
    assert torch.equal(z1, philox_normal_reference(seeds, 1, (2, 4)))
    # a subset shares the counters: it continues at step 2, only for its rows
    sub = ns.subset(torch.tensor([False, True, True]))
    assert sub.seeds == [6, 7]
    z2 = sub.step_noise((2, 2, 4))
    assert torch.equal(z2, philox_normal_reference(torch.tensor([6, 7]), 2, (2, 4)))
    # row 0 did not advance; rows 1, 2 did: mixed steps take the per-row path
    z = ns.step_noise((3, 2, 4))
    assert torch.equal(z[0], philox_normal_reference(torch.tensor([5]), 2, (2, 4))[0])
    assert torch.equal(z[1:], philox_normal_reference(torch.tensor([6, 7]), 3, (2, 4)))
    with pytest.raises(ValueError, match="batch size"):
        ns.step_noise((2, 2, 4))
    big = PhiloxNoise([2**64 - 1])
    assert big.seeds == [2**64 - 1]


@needs_cuda
@pytest.mark.gpu
def test_cuda_matches_cpu():
    seeds = torch.tensor([3, 4, 2**40], dtype=torch.int64)
    cpu = philox_normal(seeds, 7, (3, 33, 17))
    gpu = philox_normal(seeds.cuda(), 7, (3, 33, 17)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1.2e-7, atol=1e-7)
