"""The native ops of duodiff_fast._C (CPU kernels) against PyTorch references, and the fused
solver update as the samplers use it (with or without the extension)."""
import pytest
import torch

from duodiff_fast import _native
from duodiff_fast.models.uvit import timestep_embedding
from duodiff_fast.samplers.philox import PhiloxNoise, fused_update, philox_normal_reference

needs_native = pytest.mark.skipif(not _native.available(), reason=f"duodiff_fast._C not built: {_native.load_error()}")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _native.available() and _native.cuda_available()),
    reason="needs a CUDA device and a CUDA build of duodiff_fast._C",
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    e = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), e.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 3, 7, 9), (5, 4, 6, 6)])
def test_solver_update_matches_reference(dtype, shape):
    x, e = _inputs(shape, dtype)
    seeds = torch.arange(shape[0], dtype=torch.int64) * 7919 + 3
    coefs = torch.tensor([0.97, -0.21, 0.13], dtype=torch.float64)
    out = torch.ops.duodiff.solver_update(x, e, coefs, seeds, 5)
    z = philox_normal_reference(seeds, 5, shape[1:], torch.float64)
    ref = 0.97 * x.double() - 0.21 * e.double() + 0.13 * z
    assert out.dtype == dtype and out.shape == x.shape
    # the kernel accumulates in float (double for float64) and rounds once: within about one
    # output ulp of the float64 reference
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    det = torch.ops.duodiff.solver_update(x, e, coefs, None, 0)
    torch.testing.assert_close(det.double(), 0.97 * x.double() - 0.21 * e.double(), rtol=TOL[dtype], atol=TOL[dtype] * 4)


@needs_native
def test_solver_update_checks_and_meta():
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="eps must have the shape"):
        torch.ops.duodiff.solver_update(x, torch.zeros(2, 4), torch.zeros(3, dtype=torch.float64), None, 0)
    with pytest.raises(RuntimeError, match="one seed per row"):
        torch.ops.duodiff.solver_update(x, x, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long), 0)
    m = torch.ops.duodiff.solver_update(x.to("meta"), x.to("meta"), torch.zeros(3, device="meta"), None, 0)
    assert m.shape == (2, 3) and m.device.type == "meta"
    n = torch.ops.duodiff.philox_normal(torch.zeros(4, dtype=torch.long, device="meta"), 0, [3, 5], torch.float16)
    assert n.shape == (4, 3, 5) and n.dtype == torch.float16
    e = torch.ops.duodiff.timestep_embedding(torch.zeros(3, device="meta"), 9, 10000.0)
    assert e.shape == (3, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_update_equals_plain_expression(dtype):
    # whichever path runs (native or PyTorch), it is a*x + b*eps + c*z with the Philox z
    x, e = _inputs((3, 2, 5, 5), dtype, seed=1)
    ns = PhiloxNoise([4, 5, 6], dtype=dtype)
    out = fused_update(x, e, 0.8, 0.3, 0.5, ns)
    z = philox_normal_reference(torch.tensor([4, 5, 6]), 0, (2, 5, 5), torch.float64)
    torch.testing.assert_close(out.double(), 0.8 * x.double() + 0.3 * e.double() + 0.5 * z, rtol=1e-5, atol=1e-6)
    assert ns.next_steps() == [1, 1, 1]
    out0 = fused_update(x, e, 0.8, 0.3, 0.0, ns)  # c = 0: no draw
    assert ns.next_steps() == [1, 1, 1]
    torch.testing.assert_close(out0.double(), 0.8 * x.double() + 0.3 * e.double(), rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dim", [2, 3, 7, 64, 129])
def test_timestep_embedding_matches_reference(dim):
    t = torch.tensor([0.0, 0.5, 1.0, 17.25, 499.5, 999.0])
    native = torch.ops.duodiff.timestep_embedding(t, dim, 10000.0)
    ref = timestep_embedding(t, dim)  # the CPU path stays the PyTorch reference
    assert native.shape == ref.shape == (6, dim) and native.dtype == torch.float32
    # same float32 operations; libm vs ATen's vectorised exp/cos/sin differ by a few ulps of the
    # argument (|arg| <= 1000 -> ~1e-4 absolute)
    torch.testing.assert_close(native, ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(torch.ops.duodiff.timestep_embedding(torch.tensor([3, 40]), dim, 10000.0),
                               timestep_embedding(torch.tensor([3, 40]), dim), rtol=0, atol=2e-4)


ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


@needs_native
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("batch", [1, 6, 13])
def test_compaction_native_round_trip(dtype, batch):
    g = torch.Generator().manual_seed(batch)
    keep = torch.rand(batch, generator=g) < 0.6
    hidden = (torch.randn(batch, 7, 3, generator=g) * 10).to(dtype)
    skips = [(torch.randn(batch, 5, generator=g) * 10).to(dtype), (torch.randn(batch, 3, 1, 3, generator=g)).to(dtype)]
    idx = torch.ops.duodiff.active_indices(keep)
    assert idx.dtype == torch.int64 and torch.equal(idx, keep.nonzero().squeeze(1))
    outs = torch.ops.duodiff.gather_rows([hidden, *skips], idx)
    for o, t in zip(outs, [hidden, *skips]):
        assert o.is_contiguous() and torch.equal(o, t.index_select(0, idx))
    dst = torch.zeros_like(hidden)
    torch.ops.duodiff.scatter_rows_(dst, idx, outs[0])
    torch.ops.duodiff.scatter_rows_(dst, torch.ops.duodiff.active_indices(~keep), hidden[~keep])
    assert torch.equal(dst, hidden)


@needs_native
def test_compaction_native_edge_cases():
    x = torch.arange(12.0).reshape(4, 3)
    assert torch.ops.duodiff.active_indices(torch.zeros(4, dtype=torch.bool)).numel() == 0
    (empty,) = torch.ops.duodiff.gather_rows([x], torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 3)
    with pytest.raises(IndexError):
        torch.ops.duodiff.gather_rows([x], torch.tensor([4]))
    # non-contiguous source, int32 index, src cast to dst's dtype
    (g,) = torch.ops.duodiff.gather_rows([x.t()], torch.tensor([2, 0], dtype=torch.int32))
    assert torch.equal(g, x.t()[[2, 0]])
    dst = torch.zeros(4, 3, dtype=torch.float64)
    torch.ops.duodiff.scatter_rows_(dst, torch.tensor([3, 1]), x[:2])
    assert torch.equal(dst[[3, 1]], x[:2].double()) and dst[0].abs().sum() == 0


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_match_cpu(dtype):
    x, e = _inputs((3, 4, 9, 7), dtype)
    seeds = torch.tensor([1, 2**50, -9])
    coefs = torch.tensor([0.5, 0.25, -1.5], dtype=torch.float64)
    cpu = torch.ops.duodiff.solver_update(x, e, coefs, seeds, 3)
    gpu = torch.ops.duodiff.solver_update(x.cuda(), e.cuda(), coefs.cuda(), seeds.cuda(), 3).cpu()
    torch.testing.assert_close(gpu.double(), cpu.double(), rtol=TOL[dtype], atol=TOL[dtype] * 4)
    keep = torch.tensor([True, False, True])
    idx = torch.ops.duodiff.active_indices(keep.cuda())
    (gx,) = torch.ops.duodiff.gather_rows([x.cuda()], idx)
    assert torch.equal(gx.cpu(), x[keep])
    d = torch.zeros_like(x).cuda()
    torch.ops.duodiff.scatter_rows_(d, idx, gx)
    assert torch.equal(d.cpu()[keep], x[keep])
    t = torch.tensor([0.0, 3.5, 998.0])
    torch.testing.assert_close(torch.ops.duodiff.timestep_embedding(t.cuda(), 33, 10000.0).cpu(),
                               torch.ops.duodiff.timestep_embedding(t, 33, 10000.0), rtol=0, atol=2e-4)
