"""Execution backends for inference: one place that turns a model into the variant that runs.

Backends:
    reference      eager PyTorch in float32, attention computed in float32 (the official path).
    eager-bf16     eager PyTorch with bfloat16 weights and activations, attention in bfloat16.
    torch.compile  the eager-bf16 model compiled with ``torch.compile`` (the usual peer to beat).
    triton         the fused Triton kernels for every model of the package: a plain U-ViT becomes a
                   ``duodiff_fast.models.fused.FusedUViT``; a DiT and a method's model
                   (AdaDiffUViT, ASEDiT, MultistageUViT, ...) keep their class and every U-ViT or
                   DiT inside runs its layer program on the Triton executor (DiT: fused adaLN
                   blocks and final layer, the B-row embedding MLPs in PyTorch). bfloat16 on CUDA; float32 on the CPU, where it
                   runs only in Triton's interpreter (tests).
                   Asking for it where it cannot run raises with the reason
                   (``duodiff_fast.ops.availability.triton_unavailable_reason``).

    auto           not a backend of its own: the fastest of the above that runs on the device and
                   passes a self-check there (:mod:`duodiff_fast.auto_backend`; ``reference`` on a
                   CPU). Resolve it with :func:`resolve_backend` before :func:`prepare_model`.

"Backend" means these execution backends everywhere in the package. Which implementation runs one
op inside them (native C++, Triton, PyTorch) is the *op implementation*, decided in
:mod:`duodiff_fast.ops.impl`.

The solver state stays in float32 whatever the backend; :class:`~duodiff_fast.methods.ModelDenoiser`
casts the network input to the backbone's dtype and the prediction back.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch

BACKENDS = ("reference", "eager-bf16", "torch.compile", "triton")
BACKEND_CHOICES = BACKENDS + ("auto",)  # what --backend accepts


def check_backend(name: str, allow_auto: bool = False) -> str:
    """Return ``name`` if it is a known backend (or "auto" with ``allow_auto``), else raise a
    ValueError listing the known ones."""
    known = BACKEND_CHOICES if allow_auto else BACKENDS
    if name not in known:
        if name == "auto":
            raise ValueError("backend 'auto' must be resolved first (duodiff_fast.backends.resolve_backend)")
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(known)}")
    return name


def resolve_backend(name: str, config: str, device) -> Tuple[str, str]:
    """(backend, why) for a requested backend: "auto" resolves through
    :func:`duodiff_fast.auto_backend.choose_backend` (self-checked, cached); any other known name is
    itself ("requested: triton")."""
    check_backend(name, allow_auto=True)
    if name != "auto":
        return name, f"requested: {name}"
    from .auto_backend import choose_backend

    choice = choose_backend(config, device)
    return choice.backend, choice.reason


def prepare_model(
    model: torch.nn.Module,
    backend: str = "reference",
    compile_mode: Optional[str] = None,
    copy_model: bool = True,
) -> torch.nn.Module:
    """The inference form of ``model`` for ``backend`` (in eval mode).

    Args:
        model: a UViT (any module with ``set_attention_upcast`` for the bf16 backends).
        backend: one of :data:`BACKENDS`.
        compile_mode: ``torch.compile`` mode for the "torch.compile" backend (default: PyTorch's).
        copy_model: work on a deep copy so the caller's (training) model is left untouched.
    """
    check_backend(backend)
    m = copy.deepcopy(model) if copy_model else model
    m.eval()
    if backend == "triton":
        return _prepare_triton(m)
    if backend == "reference":
        m.float()
        if hasattr(m, "set_attention_upcast"):
            m.set_attention_upcast(True)
        return m
    m.to(torch.bfloat16)
    if hasattr(m, "set_attention_upcast"):
        m.set_attention_upcast(False)
    if backend == "torch.compile":
        # Keep the model's attributes (in_chans, img_size, ...) reachable: compile the forward only.
        m.forward = torch.compile(m.forward, mode=compile_mode, dynamic=False)
    return m


def _prepare_triton(m: torch.nn.Module) -> torch.nn.Module:
    """``m`` on the Triton kernels (raises BackendUnavailable with the reason if they cannot run).

    A plain U-ViT becomes a FusedUViT; any other model (a DiT, a method's model) keeps its class and
    every U-ViT or DiT inside it runs its layer program on the Triton executor.
    """
    from .models.dit import DiT
    from .models.fused import FusedUViT
    from .models.uvit import UViT
    from .ops import impl

    backbones = [mod for mod in m.modules() if isinstance(mod, (UViT, DiT))]
    if not backbones:
        raise TypeError(f"the 'triton' backend runs U-ViT and DiT models; {type(m).__name__} holds neither")

    device = next((p.device for p in m.parameters()), torch.device("cpu"))
    reason = impl.triton_unavailable(device)
    if reason is not None:
        raise impl.BackendUnavailable(f"the 'triton' backend cannot run: {reason}")
    if device.type == "cuda":
        m.to(torch.bfloat16)
        if hasattr(m, "set_attention_upcast"):
            m.set_attention_upcast(False)
    else:
        m.float()
    m.requires_grad_(False)
    if isinstance(m, UViT):
        return FusedUViT(m, impl="triton").eval()
    for backbone in backbones:  # the programs run the op implementation their backbone asks for
        backbone.op_impl = "triton"
    return m


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
