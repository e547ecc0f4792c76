"""kernels.linear (bias, GELU, residual epilogues; two-input skip_linear) against eager PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from .conftest import DTYPES, assert_within_torch_error

SHAPES = [((5,), 24, 40), ((2, 17), 40, 72), ((1, 258), 24, 48)]  # (leading, K, N)


def _reference(x, w, b, epilogue, r, x2):
    if x2 is not None:
        x = torch.cat([x, x2], -1)
    y = F.linear(x, w, b)
    if epilogue == "gelu":
        y = F.gelu(y)
    if r is not None:
        y = r + y
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("epilogue", ["bias", "nobias", "gelu", "residual", "two-input"])
def test_linear_matches_torch(device, poisoned, dtype, lead, k, n, epilogue):
    from duodiff_fast.kernels import linear

    g = torch.Generator().manual_seed(hash((lead, k, n, epilogue)) % 2**31)
    k2 = 36 if epilogue == "two-input" else 0
    x = torch.randn(*lead, k, generator=g).to(device, dtype)
    x2 = torch.randn(*lead, k2, generator=g).to(device, dtype) if k2 else None
    w = (torch.randn(n, k + k2, generator=g) / (k + k2) ** 0.5).to(device, dtype)
    b = None if epilogue == "nobias" else torch.randn(n, generator=g).to(device, dtype)
    r = torch.randn(*lead, n, generator=g).to(device, dtype) if epilogue == "residual" else None
    gelu = epilogue == "gelu"
    out = linear(x, w, b, activation="gelu" if gelu else None, residual=r, x2=x2)
    assert out.shape == (*lead, n)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    exact = _reference(d(x), d(w), d(b), "gelu" if gelu else None, d(r), d(x2))
    torch_low = _reference(x, w, b, "gelu" if gelu else None, r, x2)
    assert_within_torch_error(out, torch_low, exact, dtype, f"linear {epilogue} {lead}x{k}->{n}")


def test_linear_rejects_bad_arguments(device):
    from duodiff_fast.kernels import linear

    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="activation"):
        linear(x, torch.randn(4, 8, device=device), activation="relu")
    with pytest.raises(ValueError, match="input features"):
        linear(x, torch.randn(4, 9, device=device))


@pytest.mark.parametrize("blocks", __import__("duodiff_fast.kernels.linear", fromlist=["x"]).TUNING_CONFIGS)
def test_every_autotune_tile_computes_the_same(device, poisoned, blocks):
    """Each candidate tile of the GPU autotuner, forced, on an odd shape (two-input + bias)."""
    from duodiff_fast.kernels import linear

    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(37, 24, generator=g), torch.randn(37, 40, generator=g)
    w, b = torch.randn(72, 64, generator=g) / 8, torch.randn(72, generator=g)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # the tiles target 16-bit on GPUs
    x, x2, w, b = (t.to(device, dtype) for t in (x, x2, w, b))
    out = linear(x, w, b, x2=x2, blocks=blocks)
    ref = torch.nn.functional.linear(torch.cat([x, x2], -1).double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (out.double() - ref).abs().max().item() < tol
