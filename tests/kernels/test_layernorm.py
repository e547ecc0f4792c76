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
