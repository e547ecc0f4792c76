"""Multi-head self-attention read straight from the fused qkv projection's output.

Reference (U-ViT's ``Attention`` between its ``qkv`` and ``proj`` Linears)::

    q, k, v = qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)      # feature axis (3, H, Dh)
    out = softmax(q @ k^T * scale) @ v                                  # (B, H, N, Dh)
    out = out.transpose(1, 2).reshape(B, N, H * Dh)                     # what proj reads

The kernel indexes q, k and v inside the (B, N, 3*H*Dh) projection output (no permute copies),
runs the online (streaming) softmax over key tiles in float32, and writes (B, N, H*Dh) directly.
One program owns BLOCK_M queries (or the TAIL_M-row tail) of one (batch, head) pair.

Tiles: U-ViT sequences are a power-of-two patch count plus one or two extra tokens (257, 258).
Padding them to whole 128- or 64-token tiles wastes up to a third of the work (384 for 258), and
small 32x32 tiles cannot use Hopper's wgmma (64 rows per warpgroup). So both axes use wide tiles
plus one narrow tail tile: queries in BLOCK_M = 64/128-row tiles (wgmma) and one TAIL_M-row
program for the rest; keys in full BLOCK_N = 128 tiles, unmasked, then one masked TAIL_N tile.
258 tokens: 2 x 128 + 16 on both axes (272 padded, 5% waste). See :func:`attention_config`.

Head dims that are not powers of two (72 for U-ViT-H) are split into two power-of-two column
groups (72 = 64 + 16, 8 of them masked): 80 columns of dot-product work instead of 128.

Grid: one axis, (batch * heads * query tiles) programs, query tiles fastest so the programs of one
(batch, head) run together and share its K/V in L2. (Axis 1 is limited to 65535 programs, which
batch 4096 x 16 heads would exceed.)
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Launch, check_dtype, check_grid, dot_precision, dot_upcast, interpreting, launch, mma, next_pow2


@triton.jit
def _key_tile(q_lo, q_hi, k_base, v_base, key0, N, row_stride, qk_scale_log2, acc_lo, acc_hi, m_i, l_i,
              KEYS: tl.constexpr, MASK_KEYS: tl.constexpr, HEAD_DIM: tl.constexpr, D_LO: tl.constexpr,
              D_HI: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over KEYS keys starting at key0 (masked past N when MASK_KEYS)."""
    keys = key0 + tl.arange(0, KEYS)
    d_lo = tl.arange(0, D_LO)
    k_mask = (keys < N)[None, :] & (d_lo < HEAD_DIM)[:, None]
    v_mask = (keys < N)[:, None] & (d_lo < HEAD_DIM)[None, :]
    if MASK_KEYS or D_LO > HEAD_DIM:
        k_lo = tl.load(k_base + keys[None, :] * row_stride + d_lo[:, None], mask=k_mask, other=0.0)
    else:
        k_lo = tl.load(k_base + keys[None, :] * row_stride + d_lo[:, None])               # (D_LO, KEYS)
    s = mma(q_lo, k_lo, tl.zeros((q_lo.shape[0], KEYS), dtype=tl.float32), PRECISION, UPCAST)
    if D_HI > 0:
        d_hi = D_LO + tl.arange(0, D_HI)
        k_hi = tl.load(k_base + keys[None, :] * row_stride + d_hi[:, None],
                       mask=(keys < N)[None, :] & (d_hi < HEAD_DIM)[:, None], other=0.0)  # (D_HI, KEYS)
        s = mma(q_hi, k_hi, s, PRECISION, UPCAST)
    s = s * qk_scale_log2                                                                 # log2 domain
    if MASK_KEYS:
        s = tl.where((keys < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASK_KEYS or D_LO > HEAD_DIM:
        v_lo = tl.load(v_base + keys[:, None] * row_stride + d_lo[None, :], mask=v_mask, other=0.0)
    else:
        v_lo = tl.load(v_base + keys[:, None] * row_stride + d_lo[None, :])               # (KEYS, D_LO)
    p = p.to(v_lo.dtype)
    acc_lo = mma(p, v_lo, acc_lo * alpha[:, None], PRECISION, UPCAST)
    if D_HI > 0:
        d_hi = D_LO + tl.arange(0, D_HI)
        v_hi = tl.load(v_base + keys[:, None] * row_stride + d_hi[None, :],
                       mask=(keys < N)[:, None] & (d_hi < HEAD_DIM)[None, :], other=0.0)  # (KEYS, D_HI)
        acc_hi = mma(p, v_hi, acc_hi * alpha[:, None], PRECISION, UPCAST)
    return acc_lo, acc_hi, m_new, l_i


@triton.jit
def _attend_rows(q_base, k_base, v_base, out_base, row0, N, N_FULL, row_stride, width, qk_scale_log2,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 D_LO: tl.constexpr, D_HI: tl.constexpr, D_HI_W: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Attention output of query rows row0 .. row0 + ROWS (masked past N) of one (batch, head)."""
    rows = row0 + tl.arange(0, ROWS)
    r_ok = rows < N
    d_lo = tl.arange(0, D_LO)
    q_lo = tl.load(q_base + rows[:, None] * row_stride + d_lo[None, :],
                   mask=r_ok[:, None] & (d_lo < HEAD_DIM)[None, :], other=0.0)
    acc_lo = tl.zeros((ROWS, D_LO), dtype=tl.float32)
    # Without a second column group these stay unused 16-wide placeholders (removed as dead code).
    d_hi = D_LO + tl.arange(0, D_HI_W)
    q_hi = tl.load(q_base + rows[:, None] * row_stride + d_hi[None, :],
                   mask=r_ok[:, None] & ((d_hi < HEAD_DIM) & (d_hi < D_LO + D_HI))[None, :], other=0.0)
    acc_hi = tl.zeros((ROWS, D_HI_W), dtype=tl.float32)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    for key0 in range(0, N_FULL, BLOCK_N):
        acc_lo, acc_hi, m_i, l_i = _key_tile(q_lo, q_hi, k_base, v_base, key0, N, row_stride, qk_scale_log2,
                                             acc_lo, acc_hi, m_i, l_i, BLOCK_N, False, HEAD_DIM, D_LO, D_HI,
                                             PRECISION, UPCAST)
    if TAIL_N > 0:
        acc_lo, acc_hi, m_i, l_i = _key_tile(q_lo, q_hi, k_base, v_base, N_FULL, N, row_stride, qk_scale_log2,
                                             acc_lo, acc_hi, m_i, l_i, TAIL_N, True, HEAD_DIM, D_LO, D_HI,
                                             PRECISION, UPCAST)
    out_rows = out_base + rows[:, None] * width
    tl.store(out_rows + d_lo[None, :], (acc_lo / l_i[:, None]).to(out_base.dtype.element_ty),
             mask=r_ok[:, None] & (d_lo < HEAD_DIM)[None, :])
    if D_HI > 0:
        tl.store(out_rows + d_hi[None, :], (acc_hi / l_i[:, None]).to(out_base.dtype.element_ty),
                 mask=r_ok[:, None] & (d_hi < HEAD_DIM)[None, :])


@triton.jit
def _attention_kernel(
    qkv_ptr, out_ptr,
    N, H, qk_scale_log2,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, D_HI_W: tl.constexpr,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Program p: (batch, head) = p // tiles, query tile p % tiles (the last one is the TAIL_M tail).
    full_m = N // BLOCK_M
    tiles = full_m + 1 if TAIL_M > 0 else full_m
    pid = tl.program_id(0)
    pid_bh = pid // tiles
    pid_m = pid % tiles
    b = pid_bh // H
    h = pid_bh % H
    width = H * HEAD_DIM  # C
    row_stride = 3 * width
    q_base = qkv_ptr + b.to(tl.int64) * N * row_stride + h * HEAD_DIM
    k_base = q_base + width
    v_base = q_base + 2 * width
    out_base = out_ptr + b.to(tl.int64) * N * width + h * HEAD_DIM
    n_full = (N // BLOCK_N) * BLOCK_N if TAIL_N > 0 else N
    if TAIL_M > 0 and pid_m == full_m:
        _attend_rows(q_base, k_base, v_base, out_base, full_m * BLOCK_M, N, n_full, row_stride, width,
                     qk_scale_log2, TAIL_M, BLOCK_N, TAIL_N, HEAD_DIM, D_LO, D_HI, D_HI_W, PRECISION, UPCAST)
    else:
        _attend_rows(q_base, k_base, v_base, out_base, pid_m * BLOCK_M, N, n_full, row_stride, width,
                     qk_scale_log2, BLOCK_M, BLOCK_N, TAIL_N, HEAD_DIM, D_LO, D_HI, D_HI_W, PRECISION, UPCAST)


def head_dim_groups(head_dim: int) -> Tuple[int, int]:
    """(D_LO, D_HI): power-of-two column groups (>= 16 wide, D_HI = 0 for none) covering head_dim.

    64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 80 -> (64, 16), 40 -> (32, 16), 8 -> (16, 0).
    """
    lo = max(16, 1 << (int(head_dim).bit_length() - 1))
    rest = head_dim - lo
    return lo, (next_pow2(rest, 16) if rest > 0 else 0)


def _tail(n: int, block: int) -> int:
    """Width of the tail tile after n // block full tiles: 0, or the rest rounded up to a power of
    two >= 16 (tl.dot's minimum; at most block)."""
    rest = n % block
    return 0 if rest == 0 else next_pow2(rest, 16)


class AttentionConfig(NamedTuple):
    """Tile choice of one attention launch (see :func:`attention_config`)."""
    block_m: int
    tail_m: int
    block_n: int
    tail_n: int
    d_lo: int
    d_hi: int
    num_warps: int
    num_stages: int


# Programs that keep an H100 (132 SMs) busy: below ~2 waves of 128-row programs use 64-row ones.
_BUSY_PROGRAMS = 264


def attention_config(b: int, n: int, heads: int, head_dim: int, interpret: Optional[bool] = None) -> AttentionConfig:
    """Tiles for (b, n tokens, heads, head_dim); pure, shared by the launcher and ``kernels.aot``.

    GPU: BLOCK_M = 128 query rows with 8 warps (two wgmma warpgroups of 64 rows) when there are
    enough (batch, head, tile) programs to fill the GPU, else 64 rows with 4 warps; BLOCK_N = 128
    keys for head dims up to 64, else 64 (registers). The interpreter runs 64 x 64 tiles.
    Tails: see :func:`_tail` (258 tokens, head dim 64 -> 2 x 128 + 16 keys).
    """
    d_lo, d_hi = head_dim_groups(head_dim)
    if interpreting() if interpret is None else interpret:
        bm, bn, warps = 64, 64, 4
    else:
        # 128 keys per tile for head dim <= 64 (157 registers at 128 rows, sm_90); two column groups
        # (72 = 64 + 16) need 255 registers with 128 keys, 226 with 64: no spills, see README.
        bn = 128 if d_lo + d_hi <= 64 else 64
        bm, warps = (128, 8) if b * heads * triton.cdiv(n, 128) >= _BUSY_PROGRAMS else (64, 4)
    tail_m, tail_n = _tail(n, bm), _tail(n, bn)
    return AttentionConfig(bm, tail_m, bn, tail_n, d_lo, d_hi, warps, 2)


def attention_grid(b: int, n: int, heads: int, cfg: AttentionConfig) -> Tuple[int]:
    """(programs,): batch x heads x query tiles folded on grid axis 0 (limit 2^31 - 1)."""
    tiles = n // cfg.block_m + (1 if cfg.tail_m else 0)
    grid = (b * heads * tiles,)
    check_grid(grid)
    return grid


def attention_launch(b: int, n: int, heads: int, head_dim: int, dtype: torch.dtype, scale: float,
                     interpret: Optional[bool] = None) -> Launch:
    """The launch of :func:`attention_qkv` for qkv (b, n, 3 * heads * head_dim) of ``dtype``."""
    cfg = attention_config(b, n, heads, head_dim, interpret)
    flags = dict(HEAD_DIM=head_dim, D_LO=cfg.d_lo, D_HI=cfg.d_hi, D_HI_W=max(cfg.d_hi, 16), BLOCK_M=cfg.block_m, TAIL_M=cfg.tail_m,
                 BLOCK_N=cfg.block_n, TAIL_N=cfg.tail_n, PRECISION=dot_precision(dtype, interpret),
                 UPCAST=dot_upcast(dtype, interpret))
    return launch(_attention_kernel, attention_grid(b, n, heads, cfg), [dtype, dtype],
                  (n, heads, float(scale) * math.log2(math.e)), flags, cfg.num_warps, cfg.num_stages)


def attention_tiles(n: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) the GPU uses for n tokens at large batch (8 heads x 64 sequences)."""
    cfg = attention_config(64, n, 8, 64, interpret=False)
    return cfg.block_m, cfg.block_n


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
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be (B, N, 3*C), got shape {tuple(qkv.shape)}")
    b, n, c3 = qkv.shape
    if num_heads < 1 or c3 % (3 * num_heads):
        raise ValueError(f"qkv width {c3} is not 3 * heads ({num_heads}) * head_dim")
    head_dim = c3 // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    qkv = qkv.contiguous()
    out = torch.empty((b, n, num_heads * head_dim), device=qkv.device, dtype=qkv.dtype)
    attention_launch(b, n, num_heads, head_dim, qkv.dtype, scale).run(qkv, out)
    return out


def attention_reference(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """The PyTorch computation :func:`attention_qkv` matches (U-ViT's Attention core)."""
    b, n, c3 = qkv.shape
    head_dim = c3 // (3 * num_heads)
    q, k, v = qkv.reshape(b, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale if scale is not None else head_dim ** -0.5)
    return out.transpose(1, 2).reshape(b, n, num_heads * head_dim)
