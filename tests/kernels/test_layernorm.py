"""kernels.layernorm against F.layer_norm (and x + residual)."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import stable_seed

from .conftest import DTYPES, assert_within_torch_error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 40), (2, 17, 96), (1, 258, 24)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_matches_torch(device, poisoned, dtype, shape, with_residual):
    from duodiff_fast.kernels import layernorm

    g = torch.Generator().manual_seed(stable_seed(shape, with_residual))
    d = shape[-1]
    x = torch.randn(shape, generator=g) * 3 + 1
    r = torch.randn(shape, generator=g) if with_residual else None
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    xd, rd = x.to(device, dtype), (r.to(device, dtype) if r is not None else None)
    out = layernorm(xd, w.to(device), b.to(device), 1e-6, residual=rd)
    # float64 reference on the same (rounded) inputs; PyTorch's own result at dtype
    s64 = xd.double() + rd.double() if r is not None else xd.double()
    exact = F.layer_norm(s64, (d,), w.double().to(device), b.double().to(device), 1e-6)
    s_low = xd + rd if r is not None else xd
    torch_low = F.layer_norm(s_low, (d,), w.to(device, dtype), b.to(device, dtype), 1e-6)
    if with_residual:
        out, s = out
        if dtype == torch.bfloat16 and device.type == "cpu":
            # Triton's interpreter converts float32 -> bfloat16 by truncation, not rounding: one ulp.
            torch.testing.assert_close(s, s_low, rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(s, s_low), "the returned sum must equal x + residual in the input dtype"
    assert out.shape == x.shape
    assert_within_torch_error(out, torch_low, exact, dtype, f"layernorm{shape}")


def _adaln_exact(x, shift, scale, eps):
    """DiT's ``modulate(norm(x), shift, scale)`` in float64 (norm without affine)."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps)
    return h * (1 + scale.double().unsqueeze(1)) + shift.double().unsqueeze(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 40), (2, 17, 96), (1, 258, 24)])
@pytest.mark.parametrize("chunked", [True, False])
def test_adaln_layernorm_matches_torch(device, poisoned, dtype, shape, chunked):
    """Norm without affine + per-sample ``x * (1 + scale) + shift``; shift/scale either strided
    chunks of a (B, 6D) adaLN output (read in place) or separate (B, D) tensors."""
    from duodiff_fast.kernels import adaln_layernorm, adaln_layernorm_reference

    g = torch.Generator().manual_seed(hash((shape, chunked)) % 2**31)
    b, n, d = shape
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)
    if chunked:
        mod = torch.randn(b, 6 * d, generator=g).to(device, dtype)
        shift, scale = mod.chunk(6, dim=1)[3:5]
        assert shift.stride(0) == 6 * d
    else:
        shift, scale = (torch.randn(b, d, generator=g).to(device, dtype) for _ in range(2))
    out = adaln_layernorm(x, shift, scale, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    exact = _adaln_exact(x, shift, scale, 1e-6)
    torch_low = adaln_layernorm_reference(x, shift, scale, 1e-6)
    assert_within_torch_error(out, torch_low, exact, dtype, f"adaln_layernorm{shape}")


def test_adaln_layernorm_rows_take_their_own_sample(device):
    """Each sample's tokens use that sample's modulation: zero input rows give exactly shift."""
    from duodiff_fast.kernels import adaln_layernorm

    b, n, d = 3, 7, 24
    shift = torch.arange(b * d, dtype=torch.float32).reshape(b, d).to(device)
    out = adaln_layernorm(torch.zeros(b, n, d, device=device), shift, torch.randn(b, d).to(device))
    assert torch.equal(out, shift.unsqueeze(1).expand(b, n, d))


def test_adaln_layernorm_rejects_bad_shapes(device):
    from duodiff_fast.kernels import adaln_layernorm

    x = torch.randn(2, 5, 8, device=device)
    with pytest.raises(ValueError, match="shift must be"):
        adaln_layernorm(x, torch.randn(2, 9, device=device), torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        adaln_layernorm(x[0], torch.randn(2, 8, device=device), torch.randn(2, 8, device=device))
