"""Execution backends for the EDM U-Nets.

    reference      float32 eager.
    eager-bf16     the U-Net's weights and activations in bfloat16 (the preconditioning, the sampler
                   state and the attention softmax stay in float32).
    torch.compile  eager-bf16 with the U-Net's forward compiled (``torch.compile``, static shapes).
    triton         refused: the package's Triton kernels are the U-ViT transformer's (fused
                   LayerNorm/attention/MLP on tokens); a convolutional U-Net has none of those layers.

On CUDA the U-Net runs channels-last (NHWC), the layout cuDNN's convolutions are fastest in.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..backends import check_backend
from .precond import _Precond

__all__ = ["EDM_BACKENDS", "prepare_edm_net"]

EDM_BACKENDS = ("reference", "eager-bf16", "torch.compile")


def prepare_edm_net(net: _Precond, backend: str = "reference", device: Optional[torch.device] = None,
                    copy_model: bool = True, compile_mode: Optional[str] = None,
                    compile_backend: str = "inductor") -> _Precond:
    """The inference form (eval mode, on ``device``) of a preconditioned EDM net for ``backend``.

    ``compile_mode`` / ``compile_backend`` go to ``torch.compile`` (tests trace with "eager")."""
    check_backend(backend)
    if backend not in EDM_BACKENDS:
        raise ValueError(f"the {backend!r} backend runs the U-ViT transformer kernels; EDM U-Nets run on "
                         f"{', '.join(EDM_BACKENDS)}")
    if not isinstance(net, _Precond):
        raise TypeError(f"expected an EDM preconditioned net (EDMPrecond, VPPrecond, VEPrecond), got {type(net).__name__}")
    m = copy.deepcopy(net) if copy_model else net
    m.eval().requires_grad_(False)
    if device is not None:
        m.to(device)
    on_cuda = next(m.parameters()).is_cuda
    if backend == "reference":
        m.float()
        m.compute_dtype = torch.float32
    else:
        m.model.to(torch.bfloat16)
        m.compute_dtype = torch.bfloat16
    if on_cuda:
        m.model.to(memory_format=torch.channels_last)
        m.channels_last = True
    if backend == "torch.compile":
        m.model.forward = torch.compile(m.model.forward, mode=compile_mode, dynamic=False,
                                        backend=compile_backend)
    return m
