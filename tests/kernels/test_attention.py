"""kernels.attention_qkv against U-ViT's attention (reshape/permute + SDPA + transpose)."""
import pytest
import torch

from .conftest import DTYPES, assert_within_torch_error


def _math_attention(qkv, h):
    """Eager attention at the input dtype (logits and probabilities rounded to it), the way a
    bfloat16 PyTorch forward without a fused kernel computes it. (CPU SDPA keeps float32 inside,
    GPU flash SDPA rounds the probabilities as the Triton kernel does.)"""
    b, n, c3 = qkv.shape
    dh = c3 // (3 * h)
    q, k, v = qkv.reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
    out = ((q @ k.transpose(-1, -2)) * dh ** -0.5).softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, n, h * dh)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,h,dh", [(1, 5, 2, 64), (2, 17, 3, 72), (1, 258, 1, 16), (1, 9, 2, 40)])
def test_attention_matches_torch(device, poisoned, dtype, b, n, h, dh):
    from duodiff_fast.kernels import attention_qkv, attention_reference

    g = torch.Generator().manual_seed(n * 100 + dh)
    qkv = torch.randn(b, n, 3 * h * dh, generator=g).to(device, dtype)
    out = attention_qkv(qkv, h)
    assert out.shape == (b, n, h * dh)
    exact = attention_reference(qkv.double(), h)
    torch_low = _math_attention(qkv, h)
    assert_within_torch_error(out, torch_low, exact, dtype, f"attention b{b} n{n} h{h} dh{dh}")


def test_attention_custom_scale(device):
    from duodiff_fast.kernels import attention_qkv, attention_reference

    qkv = torch.randn(1, 9, 3 * 2 * 16, device=device)
    out = attention_qkv(qkv, 2, scale=0.37)
    torch.testing.assert_close(out, attention_reference(qkv, 2, scale=0.37), rtol=1e-4, atol=1e-5)


def test_tiles_do_not_waste_a_third_on_padding():
    from duodiff_fast.kernels import attention_tiles

    for n in (5, 17, 65, 257, 258, 1025, 1026, 4097):
        bm, bn = attention_tiles(n)
        padded = -(-n // bn) * bn
        assert (padded - n) / padded <= 0.2 or bn == 16, (n, bn)
    assert attention_tiles(258) == (32, 32)
    assert attention_tiles(1024) == (128, 128)


def test_head_dim_groups_cover_without_power_of_two_padding():
    from duodiff_fast.kernels.attention import head_dim_groups

    assert head_dim_groups(64) == (64, 0)
    assert head_dim_groups(72) == (64, 16)
    assert head_dim_groups(96) == (64, 32)
    assert head_dim_groups(8) == (16, 0)
    for d in range(1, 257):
        lo, hi = head_dim_groups(d)
        assert lo + hi >= d and lo & (lo - 1) == 0 and (hi == 0 or hi & (hi - 1) == 0)
