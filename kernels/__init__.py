"""Fused Triton kernels for the U-ViT and DiT inference paths (installed as ``duodiff_fast.kernels``).

One module per op family; each holds its ``@triton.jit`` kernels and the Python launchers, and its
docstring names the PyTorch reference the launchers match:

    layernorm     LayerNorm, optionally fused with the residual add before it; DiT's adaLN form
                  (no affine, then the per-sample ``x * (1 + scale) + shift``)
    linear        x @ W^T with fused epilogues (bias, exact or tanh GELU, residual add, DiT's
                  per-sample gated residual) and the two-input form ``cat[x, skip] @ W^T`` that
                  never builds the concatenation
    attention     multi-head self-attention read straight from the fused qkv projection output
    frontend      patch embedding + time/label tokens + position embedding in one pass
    final_layer   LayerNorm + decoder_pred + drop extra tokens + unpatchify in one pass

The kernels know nothing about models or the rest of the package (nothing here imports
``duodiff_fast``; a reference that needs a model's rearrangement takes it as an argument):
``duodiff_fast.ops.triton_ops`` registers them as ``torch.library`` custom ops (``duodiff_triton::*``)
and the layer program's ``TritonExecutor`` (``duodiff_fast.models.executor``) calls those ops. Set
``TRITON_INTERPRET=1`` *before* this package is imported to run them on CPU tensors.

Each launcher plans its launch with a pure ``*_launch`` function of (shapes, dtypes, flags); the
``aot`` module compiles exactly those plans for sm_90 without a GPU (``python -m
duodiff_fast.kernels.aot``). On a GPU the 16-bit linear tiles are tuned once per shape bucket:
call :func:`tune_linear` (or run one eager forward per batch bucket) before CUDA-graph capture;
inside a capture an untuned bucket uses the documented default tile and never benchmarks.
"""
from .attention import attention_qkv, attention_reference, attention_tiles
from .final_layer import final_layer, final_layer_reference
from .frontend import frontend, frontend_reference
from .layernorm import adaln_layernorm, adaln_layernorm_reference, layernorm, layernorm_reference
from .linear import linear, linear_reference
from .linear import tune as tune_linear

__all__ = [
    "attention_qkv", "attention_reference", "attention_tiles",
    "final_layer", "final_layer_reference",
    "frontend", "frontend_reference",
    "adaln_layernorm", "adaln_layernorm_reference", "layernorm", "layernorm_reference",
    "linear", "linear_reference", "tune_linear",
]
