"""U-ViT final layer in one pass: LayerNorm, decoder_pred, drop the extra tokens, unpatchify.

Reference (``UViT.decode`` without its optional 3x3 conv)::

    x = decoder_pred(norm(tokens))[:, E:, :]                   # (B, L, p*p*C)
    x = unpatchify(x, C)                                       # (B, C, H, W), (p1 p2 C) order

Each program takes BLOCK_M patch tokens (the E extra tokens are never read), computes their
LayerNorm statistics in float32, normalizes on the fly while it multiplies by decoder_pred's
weight (the normalized tokens are never written), adds the bias and stores every prediction at
its pixel in the (B, C, H, W) image. The optional 3x3 conv (``final_layer``) is left to
cuDNN (``F.conv2d``): a separate, small pass.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Launch, check_dtype, check_grid, dot_precision, dot_upcast, interpreting, launch, mma, next_pow2


@triton.jit
def _final_layer_kernel(
    x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, bias_ptr, out_ptr,
    B, NT, L, D, NOUT, C, IMG, GRID_W, eps,
    P: tl.constexpr, EXTRAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # flattened (b, patch)
    row_ok = rows < B * L
    b = rows // L
    patch = rows % L
    x_row = (b.to(tl.int64) * NT + EXTRAS + patch) * D
    offs_k = tl.arange(0, BLOCK_K)

    # LayerNorm statistics, two passes over the row in float32 (mean, then centred variance).
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        xv = tl.load(x_ptr + x_row[:, None] + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
        total += tl.sum(xv.to(tl.float32), axis=1)
    mean = total / D
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        m = row_ok[:, None] & (kk[None, :] < D)
        xv = tl.load(x_ptr + x_row[:, None] + kk[None, :], mask=m, other=0.0).to(tl.float32)
        diff = tl.where(m, xv - mean[:, None], 0.0)
        sq += tl.sum(diff * diff, axis=1)
    rstd = 1.0 / tl.sqrt(sq / D + eps)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        xv = tl.load(x_ptr + x_row[:, None] + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(ln_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        be = tl.load(ln_b_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = (xv.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + be[None, :]
        a = tl.where(k_ok[None, :], a, 0.0).to(xv.dtype)     # eager rounds the norm output here
        w = tl.load(w_ptr + cols[None, :] * D + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, w, acc, PRECISION, UPCAST)
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    # Unpatchify: column o = (i*P + j)*C + c  ->  out[b, c, gy*P + i, gx*P + j].
    gy = patch // GRID_W
    gx = patch % GRID_W
    c = cols % C
    i = cols // (C * P)
    j = (cols // C) % P
    dst = (b.to(tl.int64)[:, None] * C + c[None, :]) * IMG * IMG \
        + (gy[:, None] * P + i[None, :]) * IMG + gx[:, None] * P + j[None, :]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def final_layer_launch(bsz: int, nt: int, d: int, nout: int, channels: int, extras: int, eps: float,
                       dtypes: Sequence[torch.dtype], interpret: Optional[bool] = None) -> Launch:
    """The launch for tokens (bsz, nt, d) and decoder_pred (nout, d); ``dtypes`` of the 5 inputs
    (tokens, norm weight, norm bias, pred weight, pred bias); the image has the tokens' dtype.

    BLOCK_M = 64 patch tokens (one wgmma warpgroup, 4 warps; 32 in the interpreter), BLOCK_N = the
    p*p*C predictions rounded to a power of two (<= 128), BLOCK_K = 64 of the width per step.
    """
    p = int(round((nout // channels) ** 0.5))
    l = nt - extras
    grid_w = int(round(l ** 0.5))
    bm = 32 if (interpreting() if interpret is None else interpret) else 64
    bn = min(128, next_pow2(nout, 16))
    bk = min(64, next_pow2(d, 16))
    dtype = dtypes[0]
    flags = dict(P=p, EXTRAS=extras, PRECISION=dot_precision(dtype, interpret), UPCAST=dot_upcast(dtype, interpret),
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    grid = (triton.cdiv(bsz * l, bm), triton.cdiv(nout, bn))
    check_grid(grid)
    scalars = (bsz, nt, l, d, nout, channels, grid_w * p, grid_w, float(eps))
    return launch(_final_layer_kernel, grid, [*dtypes, dtype], scalars, flags, 4, 3)


def final_layer(
    tokens: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    pred_weight: torch.Tensor,
    pred_bias: torch.Tensor,
    extras: int,
    channels: int,
) -> torch.Tensor:
    """Images from the last tokens (no conv).

    Args:
        tokens: (B, E + L, D), L = (H/p)^2 patch tokens after E extra tokens.
        norm_weight, norm_bias: (D,) LayerNorm affine; eps its epsilon.
        pred_weight: (p*p*C, D), pred_bias (p*p*C,): decoder_pred.
        extras: E; channels: C.
    Returns:
        (B, C, H, W) in tokens' dtype.
    """
    check_dtype("tokens", tokens)
    bsz, nt, d = tokens.shape
    nout = pred_weight.shape[0]
    p = int(round((nout // channels) ** 0.5))
    l = nt - extras
    grid_w = int(round(l ** 0.5))
    if p * p * channels != nout or grid_w * grid_w != l:
        raise ValueError(f"cannot unpatchify {l} tokens of {nout} values into {channels} channels")
    img = grid_w * p
    out = torch.empty((bsz, channels, img, img), device=tokens.device, dtype=tokens.dtype)
    args = (tokens.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(),
            pred_weight.contiguous().to(tokens.dtype), pred_bias.contiguous())
    final_layer_launch(bsz, nt, d, nout, channels, extras, eps, [t.dtype for t in args]).run(*args, out)
    return out


def final_layer_reference(tokens, norm_weight, norm_bias, eps, pred_weight, pred_bias, extras, channels, *,
                          unpatchify):
    """The PyTorch computation :func:`final_layer` matches (``UViT.decode`` minus the conv).

    ``unpatchify(tokens (B, L, p*p*C), channels) -> (B, C, H, W)`` is the model's own rearrangement
    (``duodiff_fast.models.functional.unpatchify``), passed in: the kernels know nothing of models.
    """
    x = F.layer_norm(tokens, (tokens.shape[-1],), norm_weight.to(tokens.dtype), norm_bias.to(tokens.dtype), eps)
    x = F.linear(x, pred_weight.to(tokens.dtype), pred_bias.to(tokens.dtype))[:, extras:, :]
    return unpatchify(x, channels)
