"""Multi-head self-attention read straight from the fused qkv projection's output.

Reference (U-ViT's ``Attention`` between its ``qkv`` and ``proj`` Linears)::

    q, k, v = qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)      # feature axis (3, H, Dh)
    out = softmax(q @ k^T * scale) @ v                                  # (B, H, N, Dh)
    out = out.transpose(1, 2).reshape(B, N, H * Dh)                     # what proj reads

The kernel indexes q, k and v inside the (B, N, 3*H*Dh) projection output (no permute copies),
runs the online (streaming) softmax over key tiles in float32, and writes (B, N, H*Dh) directly.
One program owns BLOCK_M queries of one (batch, head) pair.

Tiles: U-ViT sequences are a power-of-two patch count plus one or two extra tokens (257, 258),
so a 128-token tile would pad them to 384 (a third wasted). :func:`attention_tiles` picks the
largest tile (128, 64, 32, 16) that wastes at most 1/8 of the padded length, e.g. 32 for 258
(288 padded, 10%); see the function.

Head dims that are not powers of two (72 for U-ViT-H) are split into two power-of-two column
groups (72 = 64 + 16, 8 of them masked): 80 columns of dot-product work instead of 128.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_dtype, dot_precision, dot_upcast, mma, interpreting, next_pow2


@triton.jit
def _attention_kernel(
    qkv_ptr, out_ptr,
    N, H, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # The head dim is covered by two power-of-two column groups, [0, D_LO) and [D_LO, D_LO + D_HI)
    # (D_HI = 0: none), e.g. 72 = 64 + 16 (8 masked) instead of one 128-wide padded tile.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    width = H * HEAD_DIM  # C
    row_stride = 3 * width
    q_base = qkv_ptr + b.to(tl.int64) * N * row_stride + h * HEAD_DIM
    k_base = q_base + width
    v_base = q_base + 2 * width

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    d_lo = tl.arange(0, D_LO)
    lo_ok = d_lo < HEAD_DIM
    q_lo = tl.load(q_base + offs_m[:, None] * row_stride + d_lo[None, :], mask=m_ok[:, None] & lo_ok[None, :],
                   other=0.0)
    acc_lo = tl.zeros((BLOCK_M, D_LO), dtype=tl.float32)
    if D_HI > 0:
        d_hi = D_LO + tl.arange(0, D_HI)
        hi_ok = d_hi < HEAD_DIM
        q_hi = tl.load(q_base + offs_m[:, None] * row_stride + d_hi[None, :],
                       mask=m_ok[:, None] & hi_ok[None, :], other=0.0)
        acc_hi = tl.zeros((BLOCK_M, D_HI), dtype=tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + offs_n
        k_ok = keys < N
        k_lo = tl.load(k_base + keys[None, :] * row_stride + d_lo[:, None],
                       mask=lo_ok[:, None] & k_ok[None, :], other=0.0)          # (D_LO, BLOCK_N)
        s = mma(q_lo, k_lo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
        if D_HI > 0:
            k_hi = tl.load(k_base + keys[None, :] * row_stride + d_hi[:, None],
                           mask=hi_ok[:, None] & k_ok[None, :], other=0.0)      # (D_HI, BLOCK_N)
            s = mma(q_hi, k_hi, s, PRECISION, UPCAST)
        s = s * qk_scale_log2                                                   # log2-domain logits
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_lo = tl.load(v_base + keys[:, None] * row_stride + d_lo[None, :],
                       mask=k_ok[:, None] & lo_ok[None, :], other=0.0)          # (BLOCK_N, D_LO)
        p = p.to(v_lo.dtype)
        acc_lo = mma(p, v_lo, acc_lo * alpha[:, None], PRECISION, UPCAST)
        if D_HI > 0:
            v_hi = tl.load(v_base + keys[:, None] * row_stride + d_hi[None, :],
                           mask=k_ok[:, None] & hi_ok[None, :], other=0.0)      # (BLOCK_N, D_HI)
            acc_hi = mma(p, v_hi, acc_hi * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
    out_row = out_ptr + (b.to(tl.int64) * N + offs_m[:, None]) * width + h * HEAD_DIM
    tl.store(out_row + d_lo[None, :], (acc_lo / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & lo_ok[None, :])
    if D_HI > 0:
        tl.store(out_row + d_hi[None, :], (acc_hi / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & hi_ok[None, :])


def head_dim_groups(head_dim: int) -> Tuple[int, int]:
    """(D_LO, D_HI): power-of-two column groups (>= 16 wide, D_HI = 0 for none) covering head_dim.

    64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 80 -> (64, 16), 40 -> (32, 16), 8 -> (16, 0).
    """
    lo = max(16, 1 << (int(head_dim).bit_length() - 1))
    rest = head_dim - lo
    return lo, (next_pow2(rest, 16) if rest > 0 else 0)


def attention_tiles(n: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a sequence of n tokens.

    The largest of 128, 64, 32 whose padding wastes at most 1/8 of the padded length, else 16.
    258 -> 32 (288 padded), 257 -> 32, 1026 -> 128 (1152), 1024 -> 128, 65 -> 16 (80), 17 -> 16.
    Untuned on a GPU (none was available): the benchmark should confirm the choice.
    """
    for tile in (128, 64, 32):
        padded = triton.cdiv(n, tile) * tile
        if padded - n <= padded // 8:
            return tile, tile
    return 16, 16


def attention_qkv(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """Self-attention from the fused projection output.

    Args:
        qkv: (B, N, 3*C) with the feature axis ordered (3, heads, head_dim), C = heads*head_dim.
        num_heads: H.
        scale: logit scale (default head_dim ** -0.5).
    Returns:
        (B, N, C) in qkv's dtype, heads concatenated along the features (the proj input).
    """
    check_dtype("qkv", qkv)
    b, n, c3 = qkv.shape
    if c3 % (3 * num_heads):
        raise ValueError(f"qkv width {c3} is not 3 * heads ({num_heads}) * head_dim")
    head_dim = c3 // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    qkv = qkv.contiguous()
    out = torch.empty((b, n, num_heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    bm, bn = attention_tiles(n)
    d_lo, d_hi = head_dim_groups(head_dim)
    if interpreting():
        bm, bn = max(bm, 64), max(bn, 64)  # fewer, larger programs run faster in the interpreter
    grid = (triton.cdiv(n, bm), b * num_heads)
    _attention_kernel[grid](
        qkv, out, n, num_heads, float(scale) * math.log2(math.e),
        HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, BLOCK_M=bm, BLOCK_N=bn,
        PRECISION=dot_precision(qkv.dtype), UPCAST=dot_upcast(qkv.dtype),
        num_warps=4 if bm <= 64 else 8, num_stages=2,
    )
    return out


def attention_reference(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """The PyTorch computation :func:`attention_qkv` matches (U-ViT's Attention core)."""
    b, n, c3 = qkv.shape
    head_dim = c3 // (3 * num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale if scale is not None else head_dim ** -0.5)
    return out.transpose(1, 2).reshape(b, n, num_heads * head_dim)
