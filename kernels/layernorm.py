"""LayerNorm over the last axis, optionally fused with the residual add that precedes it, and the
adaLN form of DiT (LayerNorm without affine, then the per-sample modulation).

References:
    :func:`layernorm`        ``F.layer_norm(x, (D,), weight, bias, eps)``; with a residual,
                             ``s = x + residual`` (rounded to the activations' dtype, as eager
                             PyTorch stores it) and ``(layer_norm(s), s)``.
    :func:`adaln_layernorm`  ``F.layer_norm(x, (D,), eps=eps) * (1 + scale[:, None]) + shift[:, None]``
                             for x (B, N, D) and per-sample shift/scale (B, D) (DiT's ``modulate``
                             after its affine-free norms).
Statistics, the affine transform and the modulation are computed in float32; the output is
rounded once (eager PyTorch rounds after the norm, the ``1 + scale``, the product and the sum).

One program normalizes ROWS rows held entirely in registers (the row width is padded to a power
of two), so the input is read once and each output written once: the op is memory-bound and
this is the minimum traffic.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Launch, check_dtype, launch, next_pow2


@triton.jit
def _layernorm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, sum_ptr,
    M, D, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum eager PyTorch would store
        tl.store(sum_ptr + offs, s, mask=mask)
        x = s
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / D
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_layernorm_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr,
    M, D, TOKENS, stride_shift, stride_scale, eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    xf = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(xf, axis=1) / D
    diff = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    # Row r belongs to sample r // TOKENS; its modulation row is read in place (the (B, 6D) adaLN
    # output's chunks are strided views: no copy).
    sample = rows // TOKENS
    shift = tl.load(shift_ptr + sample[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + sample[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0)
    y = diff * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _row_plan(d: int) -> Tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) of the row-in-registers kernels (see :func:`layernorm_launch`)."""
    block_d = next_pow2(d, 16)
    rows = max(1, min(64, 4096 // block_d))
    return block_d, rows, 4 if block_d <= 1024 else 8


def layernorm_launch(m: int, d: int, dtype: torch.dtype, residual: bool, eps: float = 1e-5,
                     param_dtypes: Tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32)) -> Launch:
    """The launch for m rows of width d in ``dtype`` (affine parameters in ``param_dtypes``).

    A row is padded to a power of two BLOCK_D and held in registers; ROWS rows per program give
    each program ~4K elements (fewer, fatter programs), at most 64 rows; 8 warps above 1024 wide.
    """
    block_d, rows, warps = _row_plan(d)
    flags = dict(HAS_RES=residual, ROWS=rows, BLOCK_D=block_d)
    dts = [dtype, dtype, param_dtypes[0], param_dtypes[1], dtype, dtype]
    return launch(_layernorm_kernel, (triton.cdiv(m, rows),), dts, (m, d, float(eps)), flags, warps, 3)


def adaln_layernorm_launch(m: int, d: int, tokens: int, dtype: torch.dtype, eps: float = 1e-6,
                           mod_dtypes: Optional[Tuple[torch.dtype, torch.dtype]] = None,
                           mod_strides: Optional[Tuple[int, int]] = None) -> Launch:
    """The launch for m = B * tokens rows of width d in ``dtype``; shift and scale rows of
    ``mod_dtypes`` (default ``dtype``) with row strides ``mod_strides`` (default 6 * d: the chunks
    of DiT's (B, 6D) adaLN output). Same row plan as :func:`layernorm_launch`."""
    block_d, rows, warps = _row_plan(d)
    mod_dtypes = mod_dtypes or (dtype, dtype)
    mod_strides = mod_strides or (6 * d, 6 * d)
    scalars = (m, d, tokens, int(mod_strides[0]), int(mod_strides[1]), float(eps))
    return launch(_adaln_layernorm_kernel, (triton.cdiv(m, rows),), [dtype, *mod_dtypes, dtype], scalars,
                  dict(ROWS=rows, BLOCK_D=block_d), warps, 3)


def layernorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm of ``x`` (or of ``x + residual``) over the last axis.

    Args:
        x: (..., D) float32/float16/bfloat16.
        weight, bias: (D,) affine parameters (any float dtype; used in float32).
        eps: variance epsilon.
        residual: optional (..., D) tensor added to ``x`` first.
    Returns:
        y (..., D) in x's dtype; with ``residual`` the pair (y, x + residual).
    """
    check_dtype("x", x)
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    m = x2.shape[0]
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else y
    r2 = residual.reshape(-1, d).contiguous().to(x.dtype) if residual is not None else x2
    w, bb = weight.contiguous(), bias.contiguous()
    layernorm_launch(m, d, x.dtype, residual is not None, eps, (w.dtype, bb.dtype)).run(x2, r2, w, bb, y, s)
    if residual is not None:
        return y.reshape(x.shape), s.reshape(x.shape)
    return y.reshape(x.shape)


def _mod_rows(name: str, t: torch.Tensor, b: int, d: int) -> torch.Tensor:
    """``t`` as (b, d) rows with unit column stride (a strided chunk view is kept as it is)."""
    check_dtype(name, t)
    if t.shape != (b, d):
        raise ValueError(f"{name} must be (B, D) = ({b}, {d}), got {tuple(t.shape)}")
    if t.stride(1) != 1:
        t = t.contiguous()
    return t


def adaln_layernorm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DiT's ``modulate(norm(x), shift, scale)`` in one pass (norm without affine).

    Args:
        x: (B, N, D) float32/float16/bfloat16 tokens.
        shift, scale: (B, D) per-sample modulation (any float dtype, used in float32); strided
            row views such as the chunks of a (B, 6D) tensor are read in place.
        eps: variance epsilon (DiT: 1e-6).
    Returns:
        (B, N, D) in x's dtype: ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]``.
    """
    check_dtype("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, D), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    shift = _mod_rows("shift", shift, b, d)
    scale = _mod_rows("scale", scale, b, d)
    if shift.device != x.device or scale.device != x.device:
        raise ValueError(f"shift/scale on {shift.device}/{scale.device}, x on {x.device}")
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    lch = adaln_layernorm_launch(b * n, d, n, x.dtype, eps, (shift.dtype, scale.dtype),
                                 (shift.stride(0), scale.stride(0)))
    lch.run(x2, shift, scale, y)
    return y


def adaln_layernorm_reference(x, shift, scale, eps=1e-6):
    """The PyTorch computation :func:`adaln_layernorm` matches (DiT's ``modulate(norm(x), ...)``)."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + scale.to(x.dtype).unsqueeze(1)) + shift.to(x.dtype).unsqueeze(1)


def layernorm_reference(x, weight, bias, eps=1e-5, residual=None):
    """The PyTorch computation :func:`layernorm` matches."""
    if residual is not None:
        s = x + residual
        return F.layer_norm(s, (x.shape[-1],), weight.to(s.dtype), bias.to(s.dtype), eps), s
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
