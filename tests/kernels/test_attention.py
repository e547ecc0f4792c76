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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,h,dh", [(1, 64, 1, 64), (1, 130, 2, 72), (2, 258, 1, 24), (1, 200, 1, 64)])
def test_attention_full_and_tail_tiles(device, poisoned, dtype, b, n, h, dh):
    """Shapes that run full query/key tiles and the narrow tail tiles (64-wide tiles in the
    interpreter): n = 64 (full only), 130 = 2 x 64 + 16-tail, 258 = 4 x 64 + 16, 200 = 3 x 64 + 16."""
    from duodiff_fast.kernels import attention_qkv, attention_reference

    g = torch.Generator().manual_seed(7 * n + dh)
    qkv = torch.randn(b, n, 3 * h * dh, generator=g).to(device, dtype)
    out = attention_qkv(qkv, h)
    exact = attention_reference(qkv.double(), h)
    assert_within_torch_error(out, _math_attention(qkv, h), exact, dtype, f"attention b{b} n{n} h{h} dh{dh}")


def test_gpu_tiles_are_wgmma_sized_with_small_tails():
    """GPU plans: 64/128-row query tiles, full key tiles plus one tail of at most 16 for U-ViT's
    257/258 tokens (<= 6% padding on both axes), head dim 72 as 64 + 16 columns."""
    from duodiff_fast.kernels.attention import attention_config

    for b, heads in ((1, 8), (256, 16)):
        for n in (257, 258):
            for dh in (64, 72):
                c = attention_config(b, n, heads, dh, interpret=False)
                assert (c.block_m, c.num_warps) in ((64, 4), (128, 8)), c  # 64 rows per warpgroup (wgmma)
                assert c.block_n in (64, 128) and c.tail_m == c.tail_n == 16
                for block, tail in ((c.block_m, c.tail_m), (c.block_n, c.tail_n)):
                    padded = n // block * block + tail
                    assert padded >= n and (padded - n) / padded <= 0.06
                assert (c.d_lo, c.d_hi) == ((64, 16) if dh == 72 else (64, 0))
    assert attention_config(1, 258, 8, 64, interpret=False).block_m == 64     # 24 programs: fill with 64 rows
    assert attention_config(256, 258, 16, 64, interpret=False).block_m == 128
    assert attention_config(4, 1024, 8, 64, interpret=False).tail_m == 0


def test_grid_folds_batch_and_heads_on_axis_0():
    """batch 4096 x 16 heads (65536 > 65535, the limit of grid axes 1 and 2) must launch."""
    from duodiff_fast.kernels.attention import attention_config, attention_grid, attention_launch

    c = attention_config(4096, 258, 16, 72, interpret=False)
    grid = attention_grid(4096, 258, 16, c)
    assert len(grid) == 1 and grid[0] == 4096 * 16 * (258 // c.block_m + 1)
    lch = attention_launch(4096, 258, 16, 72, torch.bfloat16, 72 ** -0.5, interpret=False)
    assert lch.grid == grid
    with pytest.raises(ValueError, match="grid axis 0"):
        attention_grid(2**22, 258, 256, c)


def test_attention_rejects_bad_shapes(device):
    from duodiff_fast.kernels import attention_qkv

    with pytest.raises(ValueError, match="3 \\* heads"):
        attention_qkv(torch.randn(1, 4, 30, device=device), 4)
    with pytest.raises(ValueError, match="B, N, 3\\*C"):
        attention_qkv(torch.randn(4, 48, device=device), 2)


def test_head_dim_groups_cover_without_power_of_two_padding():
    from duodiff_fast.kernels.attention import head_dim_groups

    assert head_dim_groups(64) == (64, 0)
    assert head_dim_groups(72) == (64, 16)
    assert head_dim_groups(96) == (64, 32)
    assert head_dim_groups(8) == (16, 0)
    for d in range(1, 257):
        lo, hi = head_dim_groups(d)
        assert lo + hi >= d and lo & (lo - 1) == 0 and (hi == 0 or hi & (hi - 1) == 0)
