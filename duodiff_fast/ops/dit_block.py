"""One DiT block (adaLN-Zero), and the DiT final layer's token part, through the Triton custom ops:
the "triton" backend's DiT layers.

Computes, for tokens x (B, N, D) and the block's adaLN output ``mod = adaLN_modulation(c)``
(B, 6D), chunked in DiT's order ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp``::

    x = x + gate_msa[:, None] * proj(attn(qkv(norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None])))
    x = x + gate_mlp[:, None] * fc2(gelu_tanh(fc1(norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])))

(norms without affine; attention softmax(q k^T / sqrt(head_dim)) v over the heads of the fused qkv
output, laid out (3, heads, head_dim) on the feature axis as timm's ``Attention``) in seven
launches::

    adaln_layernorm -> linear (qkv, bias) -> attention_qkv -> linear_gated_residual (proj)
    -> adaln_layernorm -> linear_gelu_tanh (fc1) -> linear_gated_residual (fc2)

:func:`dit_final_tokens` is the final layer before unpatchify: ``linear(norm(x) * (1 + scale) + shift)``
with ``shift, scale = mod.chunk(2, dim=1)`` (two launches).

Matmuls follow ``duodiff_fast.dispatch.matmul_impl()`` as the U-ViT's Triton executor does:
"triton" (default) runs the fused-epilogue Triton matmuls above; "cublas" runs the bare matmuls
through ``F.linear`` (cuBLAS) with the GELU and gated residuals in PyTorch, the norms and the
attention still on the Triton kernels (``benchmarks/kernels.py`` compares the two choices).

The modulation chunks are strided views of ``mod`` that the kernels read in place (no copies).
The B-row condition MLP that makes ``mod`` (SiLU, Linear(D, 6D)) is left to the caller: B rows, not
worth a kernel. Inference only (the custom ops have no backward).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_ops

MATMULS = ("triton", "cublas")


def _matmul(matmul: Optional[str]) -> str:
    if matmul is None:
        from .. import dispatch  # lazily: dispatch imports this package

        matmul = dispatch.matmul_impl()
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {', '.join(MATMULS)}, got {matmul!r}")
    return matmul


def _check(name: str, t: Optional[torch.Tensor], shape, device: torch.device) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"dit_block: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"dit_block: {name} must be floating point, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"dit_block: {name} is on {t.device}, x on {device}")


def check_dit_block_args(x, mod, qkv_weight, qkv_bias, proj_weight, proj_bias, fc1_weight, fc1_bias,
                         fc2_weight, fc2_bias, num_heads: int) -> None:
    """Raise ValueError/TypeError naming the first argument whose shape, dtype or device does not fit
    a DiT block of x's width (before any kernel is launched)."""
    if x.dim() != 3:
        raise ValueError(f"dit_block: x must be (B, N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dit_block: x must be float32, float16 or bfloat16, got {x.dtype}")
    b, _, d = x.shape
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"dit_block: width {d} is not divisible by num_heads={num_heads}")
    hidden = fc1_weight.shape[0] if fc1_weight.dim() == 2 else -1
    for name, t, shape in (("mod", mod, (b, 6 * d)), ("qkv_weight", qkv_weight, (3 * d, d)),
                           ("qkv_bias", qkv_bias, (3 * d,)), ("proj_weight", proj_weight, (d, d)),
                           ("proj_bias", proj_bias, (d,)), ("fc1_weight", fc1_weight, (hidden, d)),
                           ("fc1_bias", fc1_bias, (hidden,)), ("fc2_weight", fc2_weight, (d, hidden)),
                           ("fc2_bias", fc2_bias, (d,))):
        _check(name, t, shape, x.device)


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def dit_block(
    x: torch.Tensor,
    mod: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    num_heads: int,
    eps: float = 1e-6,
    matmul: Optional[str] = None,
) -> torch.Tensor:
    """One DiT block on the Triton kernels (see the module docstring for the equations).

    Args:
        x: (B, N, D) tokens, float32/float16/bfloat16 (the kernels compute in x's dtype, weights
            are cast to it).
        mod: (B, 6D) ``adaLN_modulation(c)``, any float dtype (used in float32 inside the kernels).
        qkv_weight (3D, D), qkv_bias (3D,) or None; proj_weight (D, D), proj_bias (D,);
        fc1_weight (H, D), fc1_bias (H,); fc2_weight (D, H), fc2_bias (D,): nn.Linear layouts
            (DiT: H = mlp_ratio * D).
        num_heads: attention heads (head_dim = D / num_heads, scale head_dim ** -0.5).
        eps: the norms' epsilon (DiT: 1e-6).
        matmul: "triton" or "cublas" (default: ``duodiff_fast.dispatch.matmul_impl()``).
    Returns:
        (B, N, D) in x's dtype: the block's output tokens.
    """
    check_dit_block_args(x, mod, qkv_weight, qkv_bias, proj_weight, proj_bias, fc1_weight, fc1_bias,
                         fc2_weight, fc2_bias, num_heads)
    d = x.shape[-1]
    scale = float((d // num_heads) ** -0.5)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
    if _matmul(matmul) == "cublas":
        dt = x.dtype
        h = triton_ops.adaln_layernorm(x, shift_msa, scale_msa, eps)
        a = triton_ops.attention_qkv(F.linear(h, qkv_weight.to(dt), _cast(qkv_bias, dt)), num_heads, scale)
        x = x + gate_msa.to(dt).unsqueeze(1) * F.linear(a, proj_weight.to(dt), _cast(proj_bias, dt))
        h = triton_ops.adaln_layernorm(x, shift_mlp, scale_mlp, eps)
        h = F.gelu(F.linear(h, fc1_weight.to(dt), _cast(fc1_bias, dt)), approximate="tanh")
        return x + gate_mlp.to(dt).unsqueeze(1) * F.linear(h, fc2_weight.to(dt), _cast(fc2_bias, dt))
    h = triton_ops.adaln_layernorm(x, shift_msa, scale_msa, eps)
    qkv = triton_ops.linear(h, qkv_weight, qkv_bias, None, None, False)               # (B, N, 3D)
    a = triton_ops.attention_qkv(qkv, num_heads, scale)                                # (B, N, D)
    x = triton_ops.linear_gated_residual(a, proj_weight, proj_bias, x, gate_msa)
    h = triton_ops.adaln_layernorm(x, shift_mlp, scale_mlp, eps)
    h = triton_ops.linear_gelu_tanh(h, fc1_weight, fc1_bias)                          # (B, N, H)
    return triton_ops.linear_gated_residual(h, fc2_weight, fc2_bias, x, gate_mlp)


def dit_final_tokens(x: torch.Tensor, mod: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     eps: float = 1e-6, matmul: Optional[str] = None) -> torch.Tensor:
    """DiT's ``FinalLayer`` up to unpatchify on the Triton kernels.

    Args:
        x: (B, N, D) tokens (float32/float16/bfloat16).
        mod: (B, 2D) ``adaLN_modulation(c)`` of the final layer, chunked ``shift, scale``.
        weight: (P, D) and bias (P,) or None: its ``linear`` (P = patch * patch * out_channels).
        eps: the norm's epsilon (DiT: 1e-6).
        matmul: "triton" or "cublas" (default: ``duodiff_fast.dispatch.matmul_impl()``).
    Returns:
        (B, N, P) in x's dtype (the caller unpatchifies).
    """
    if x.dim() != 3:
        raise ValueError(f"dit_final_tokens: x must be (B, N, D), got shape {tuple(x.shape)}")
    b, _, d = x.shape
    p = weight.shape[0] if weight.dim() == 2 else -1
    for name, t, shape in (("mod", mod, (b, 2 * d)), ("weight", weight, (p, d)), ("bias", bias, (p,))):
        _check(name, t, shape, x.device)
    shift, scale = mod.chunk(2, dim=1)
    h = triton_ops.adaln_layernorm(x, shift, scale, eps)
    if _matmul(matmul) == "cublas":
        return F.linear(h, weight.to(x.dtype), _cast(bias, x.dtype))
    return triton_ops.linear(h, weight, bias, None, None, False)
