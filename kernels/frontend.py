"""U-ViT token front end in one pass: patch embedding, label and time tokens, position embedding.

Reference (``UViT.embed``)::

    patches = Conv2d(C, D, kernel=stride=p)(x).flatten(2).transpose(1, 2)     # (B, L, D)
    tokens = cat([label_emb[y] (conditional only), time_token, patches], 1)    # (B, E + L, D)
    tokens = tokens + pos_embed

The patch convolution is a matmul over implicit im2col rows: each output row gathers its
C*p*p pixels straight from the (B, C, H, W) image (k = c*p*p + i*p + j, the conv weight's
flattening), so no patchified copy is written. The same program writes the extra tokens
(label embedding row gathered by y, the precomputed time token) and adds the position
embedding: the output is written once and nothing else is read twice.

The time token (B, D) is computed by the caller (sinusoid, plus the optional time MLP): it is
B rows, not worth a kernel.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (Launch, check_dtype, check_grid, dot_precision, dot_upcast, interpreting, launch, mma,
                      next_pow2)


@triton.jit
def _frontend_kernel(
    img_ptr, w_ptr, bias_ptr, pos_ptr, time_ptr, label_ptr, y_ptr, out_ptr,
    B, NT, D, K, C, IMG, GRID_W,
    P: tl.constexpr, EXTRAS: tl.constexpr, HAS_LABEL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)       # flattened (b, token)
    row_ok = rows < B * NT
    b = rows // NT
    t = rows % NT
    patch = t - EXTRAS
    is_patch = row_ok & (patch >= 0)
    patch = tl.maximum(patch, 0)
    gy = patch // GRID_W
    gx = patch % GRID_W
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    img_row = b.to(tl.int64) * C * IMG * IMG + (gy * P) * IMG + gx * P

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        c = kk // (P * P)
        i = (kk % (P * P)) // P
        j = kk % P
        pix = img_row[:, None] + (c * IMG * IMG + i * IMG + j)[None, :]
        a = tl.load(img_ptr + pix, mask=is_patch[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a.to(w.dtype), w, acc, PRECISION, UPCAST)

    mask = row_ok[:, None] & col_ok[None, :]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    val = tl.where(is_patch[:, None], acc + bias[None, :], 0.0)
    is_time = row_ok & (t == EXTRAS - 1)
    val += tl.load(time_ptr + b[:, None] * D + cols[None, :], mask=is_time[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)
    if HAS_LABEL:
        is_label = row_ok & (t == 0)
        label = tl.load(y_ptr + b, mask=is_label, other=0)
        val += tl.load(label_ptr + label[:, None].to(tl.int64) * D + cols[None, :],
                       mask=is_label[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    val += tl.load(pos_ptr + t[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def frontend_tiles(interpret: Optional[bool] = None) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). GPU: 64 x 64 tiles with 4 warps (one wgmma warpgroup); the
    64 x 128 tile held 221-255 registers on sm_90 (the (BLOCK_M, BLOCK_N) epilogue gathers time,
    label and position rows), so the N tile was halved. Untimed (no GPU yet)."""
    if interpreting() if interpret is None else interpret:
        return 64, 64, 4
    return 64, 64, 4


def frontend_launch(bsz: int, channels: int, img: int, patch: int, d: int, has_label: bool,
                    dtypes: Sequence[torch.dtype], interpret: Optional[bool] = None) -> Launch:
    """The launch for (bsz, channels, img, img) images, patch size ``patch``, width d.

    ``dtypes``: of the 7 inputs (images, weight, bias, pos_embed, time, label table, y); the output
    has the weight's dtype. BLOCK_K covers the patch's C*p*p pixels (at most 64 per step).
    """
    extras = 2 if has_label else 1
    grid_w = img // patch
    nt = extras + grid_w * grid_w
    k = channels * patch * patch
    bm, bn, warps = frontend_tiles(interpret)
    bk = min(64, next_pow2(k, 16))
    dtype = dtypes[1]
    flags = dict(P=patch, EXTRAS=extras, HAS_LABEL=has_label, PRECISION=dot_precision(dtype, interpret),
                 UPCAST=dot_upcast(dtype, interpret), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    grid = (triton.cdiv(bsz * nt, bm), triton.cdiv(d, bn))
    check_grid(grid)
    return launch(_frontend_kernel, grid, [*dtypes, dtype], (bsz, nt, d, k, channels, img, grid_w), flags,
                  warps, 3)


def frontend(
    images: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    time_token: torch.Tensor,
    label_table: Optional[torch.Tensor] = None,
    y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Tokens ``[label, time, patches] + pos_embed`` from images.

    Args:
        images: (B, C, H, W), H = W, divisible by the patch size p.
        patch_weight: (D, C, p, p) conv weight; patch_bias (D,).
        pos_embed: (1, E + L, D) with E = 2 when labels are given, else 1; L = (H/p)^2.
        time_token: (B, D) the (embedded) time token.
        label_table: (num_classes, D) label embeddings (conditional models), with y (B,) long.
    Returns:
        (B, E + L, D) in patch_weight's dtype.
    """
    check_dtype("images", images)
    bsz, c, h, w_img = images.shape
    d, _, p, _ = patch_weight.shape
    if h != w_img or h % p:
        raise ValueError(f"images must be square and divisible by the patch size {p}, got {h}x{w_img}")
    has_label = label_table is not None and y is not None
    extras = 2 if has_label else 1
    grid_w = h // p
    nt = extras + grid_w * grid_w
    if pos_embed.shape[-2:] != (nt, d):
        raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, {nt}, {d})")
    dtype = patch_weight.dtype
    out = torch.empty((bsz, nt, d), device=images.device, dtype=dtype)
    w2 = patch_weight.reshape(d, c * p * p).contiguous()
    tt = time_token.contiguous()
    lt = label_table.contiguous() if has_label else w2
    yy = y.contiguous() if has_label else tt
    args = (images.contiguous(), w2, patch_bias.contiguous(), pos_embed.contiguous(), tt, lt, yy)
    frontend_launch(bsz, c, h, p, d, has_label, [t.dtype for t in args], interpret=None).run(*args, out)
    return out


def frontend_reference(images, patch_weight, patch_bias, pos_embed, time_token, label_table=None, y=None):
    """The PyTorch computation :func:`frontend` matches (``UViT.embed`` with its inputs split out)."""
    p = patch_weight.shape[-1]
    dtype = patch_weight.dtype
    tokens = F.conv2d(images.to(dtype), patch_weight, patch_bias, stride=p).flatten(2).transpose(1, 2)
    front = [time_token.to(dtype).unsqueeze(1)]
    if label_table is not None and y is not None:
        front.insert(0, label_table[y].to(dtype).unsqueeze(1))
    return torch.cat([*front, tokens], dim=1) + pos_embed
