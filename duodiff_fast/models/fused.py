"""The fused inference path of the U-ViT: the same modules and parameters, run through Triton.

The layer program (:mod:`duodiff_fast.models.program`) with the
:class:`~duodiff_fast.models.executor.TritonExecutor` computes ``UViT.forward`` with the custom ops
of :mod:`duodiff_fast.ops.triton_ops` (one front-end kernel, per block: LayerNorm, qkv matmul,
attention, proj + residual, LayerNorm, fc1 + GELU, fc2 + residual, and for out-blocks the
two-input skip_linear; one final-layer kernel, then cuDNN's 3x3 conv when the model has one).

:class:`FusedUViT` wraps a :class:`~duodiff_fast.models.uvit.UViT` (it owns no parameters of its
own) and asks for its op implementation per call (:func:`duodiff_fast.models.executor.executor_for`): calls
that need gradients, and backend "torch", run the reference. Everything else the methods read
(``in_chans``, ``img_size``, ``num_classes``, ``patch_size``, ``is_conditional``, ``null_class``,
``embed``/``run_blocks``/``decode``, ``parameters()``) is the wrapped model's; the methods run
their hooks on the fused path through :func:`duodiff_fast.models.program.program_for`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops import impl as _impl_module
from .executor import TritonExecutor, needs_grad
from .program import LayerProgram, run_model
from .uvit import UViT


def fused_embed(model: UViT, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """``model.embed`` in one kernel: (B, C, H, W) -> (B, E + L, D)."""
    return TritonExecutor().embed(model, x, timesteps, y)


def fused_decode(model: UViT, tokens: torch.Tensor) -> torch.Tensor:
    """``model.decode`` with one final-layer kernel (+ cuDNN 3x3 conv): (B, E+L, D) -> (B, C, H, W)."""
    return TritonExecutor().final(model, model.extras, model.in_chans, tokens)


def fused_forward(model: UViT, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``model(x, timesteps, y)`` through the Triton kernels (inference only, no autograd)."""
    return LayerProgram(model, TritonExecutor()).run(x.to(model.pos_embed.dtype), timesteps, y)


class FusedUViT(nn.Module):
    """A U-ViT that runs its inference forward on the backend chosen per call.

    Args:
        model: the UViT (its modules and parameters are used as they are, not copied).
        impl: the op implementation of its calls (:mod:`duodiff_fast.ops.impl`): "auto" (Triton
            where it runs, else the reference with one warning), "triton" (an error where it cannot
            run) or "torch". ``backend=`` is its former name and still accepted.
    """

    def __init__(self, model: UViT, impl: Optional[str] = None, *, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(model, UViT):
            raise TypeError(f"FusedUViT wraps a UViT, got {type(model).__name__}")
        if impl is not None and backend is not None and impl != backend:
            raise TypeError(f"FusedUViT got impl={impl!r} and its former name backend={backend!r}: pass one")
        self.uvit = model
        self.impl = _impl_module.check_impl(impl or backend or "auto")

    @property
    def backend(self) -> str:
        """Former name of :attr:`impl`."""
        return self.impl

    @backend.setter
    def backend(self, name: str) -> None:
        self.impl = _impl_module.check_impl(name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Read _modules from __dict__: during copy/unpickling it may not exist yet.
            inner = self.__dict__.get("_modules", {}).get("uvit")
            if inner is None:
                raise
            return getattr(inner, name)

    def active_impl(self, x: torch.Tensor) -> str:
        """The op implementation ("torch" or "triton") a call with input ``x`` runs now."""
        return _impl_module.layer_impl(self.impl, x.device, needs_grad(self.uvit, x))

    active_backend = active_impl  # former name

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing:  # value checks would sync the device
            self.uvit.check_inputs(x, timesteps, y)
        return run_model(self, x, timesteps, y)

    def set_attention_upcast(self, upcast: bool) -> "FusedUViT":
        """Applies to the reference path only (the Triton attention always accumulates in float32)."""
        self.uvit.set_attention_upcast(upcast)
        return self
