"""The one place that decides which implementation runs the U-ViT inference ops.

Backends:
    "torch"   the PyTorch reference modules (``duodiff_fast.models.uvit``); always available, and
              the only path that records gradients (training).
    "triton"  the fused Triton kernels of ``duodiff_fast.kernels``, called through the
              ``torch.library`` custom ops registered below (namespace ``duodiff_triton``), each
              with a fake (meta) implementation so ``torch.compile`` traces through them and CUDA
              graph capture records their launches.
    "auto"    "triton" where it can run, else "torch" with one warning that says why.

Where Triton can run: CUDA tensors with ``triton`` importable and a CUDA device present; CPU
tensors only in Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported, as
the test suite does on machines without CUDA). Asking for "triton" by name where it cannot run
raises :class:`BackendUnavailable` with the reason.

Choosing:
    per model   ``FusedUViT(model, backend="triton")`` or ``prepare_model(model, "triton")``
    per call    ``with dispatch.use_backend("torch"): ...`` overrides every model's choice
    gradients   a call that needs gradients always runs "torch" (the autograd path)

Matmul implementation inside the "triton" backend (``set_matmul("triton" | "cublas")``):
"triton" (default) runs the fused-epilogue Triton matmuls; "cublas" runs the bare matmuls through
``F.linear`` (cuBLAS) and fuses only what the LayerNorm kernel can absorb. Neither choice has
been measured here (no GPU); ``benchmarks/kernels.py`` reports both.
"""
import contextlib
import functools
import importlib.util
import os
import threading
import warnings
from typing import Iterator, List, Optional, Tuple

import torch

BACKEND_CHOICES = ("auto", "torch", "triton")
MATMUL_CHOICES = ("triton", "cublas")


class BackendUnavailable(RuntimeError):
    """The "triton" backend was asked for by name where it cannot run."""


_STATE = threading.local()
_WARNED = set()
_MATMUL = {"impl": "triton"}


# ------------------------------------------------------------------------------ availability
@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # a broken install: report it rather than crash
        return f"triton failed to import ({type(e).__name__}: {e})"
    return None


def interpreter_enabled() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Triton kernels can run on ``device`` (default: CUDA if present), else why not."""
    err = _triton_import_error()
    if err:
        return err
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if interpreter_enabled():
            return "TRITON_INTERPRET=1 is set, so Triton cannot launch kernels on CUDA tensors"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return ("no CUDA device is available (Triton kernels need one; set TRITON_INTERPRET=1 "
                "before importing triton to run them in the slow CPU interpreter)")
    return f"Triton kernels do not run on {device.type} tensors"


def triton_available(device: Optional[torch.device] = None) -> bool:
    return triton_unavailable_reason(device) is None


# ------------------------------------------------------------------------------ choosing
def check_backend_choice(name: str) -> str:
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within this block every fused model runs ``name`` ("auto", "torch", "triton")."""
    check_backend_choice(name)
    previous = getattr(_STATE, "override", None)
    _STATE.override = name
    try:
        yield
    finally:
        _STATE.override = previous


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"duodiff_fast: Triton kernels unavailable ({reason}); running the PyTorch "
                      "reference path", RuntimeWarning, stacklevel=3)


def resolve_backend(requested: str, device: torch.device, needs_grad: bool = False) -> str:
    """The backend ("torch" or "triton") that runs a call.

    Args:
        requested: the model's choice ("auto", "torch", "triton"); a :func:`use_backend` block
            overrides it.
        device: the device of the call's tensors.
        needs_grad: the call records gradients: always "torch" (the kernels have no backward).
    Raises:
        BackendUnavailable: "triton" was asked for by name and cannot run on ``device``.
    """
    override = getattr(_STATE, "override", None)
    choice = check_backend_choice(override or requested)
    if choice == "torch" or needs_grad:
        return "torch"
    reason = triton_unavailable_reason(device)
    if reason is None:
        return "triton"
    if choice == "triton":
        raise BackendUnavailable(f"the 'triton' backend cannot run: {reason}")
    _warn_once(reason)
    return "torch"


def set_matmul(impl: str) -> None:
    """Matmul implementation of the "triton" backend: "triton" (fused epilogues) or "cublas"."""
    if impl not in MATMUL_CHOICES:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_CHOICES)}, got {impl!r}")
    _MATMUL["impl"] = impl


def matmul_impl() -> str:
    return _MATMUL["impl"]


# ------------------------------------------------------------------------------ custom ops
# The kernels module is imported lazily (inside each op), so importing duodiff_fast.dispatch never
# imports triton and never touches CUDA; TRITON_INTERPRET is read when the kernels are first used.
def _k():
    import duodiff_fast.kernels as kernels

    return kernels


@torch.library.custom_op("duodiff_triton::layernorm", mutates_args=())
def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis (Triton). (..., D) -> (..., D)."""
    return _k().layernorm(x, weight, bias, eps)


@layernorm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("duodiff_triton::add_layernorm", mutates_args=())
def add_layernorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(x + residual), x + residual) in one pass (Triton)."""
    return _k().layernorm(x, weight, bias, eps, residual=residual)


@add_layernorm.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("duodiff_triton::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    x2: Optional[torch.Tensor],
    gelu: bool,
) -> torch.Tensor:
    """``epilogue(cat[x, x2] @ weight^T + bias)`` (Triton); see ``kernels.linear``."""
    return _k().linear(x, weight, bias, activation="gelu" if gelu else None, residual=residual, x2=x2)


@linear.register_fake
def _(x, weight, bias, residual, x2, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("duodiff_triton::attention_qkv", mutates_args=())
def attention_qkv(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention from the fused qkv output: (B, N, 3C) -> (B, N, C) (Triton)."""
    return _k().attention_qkv(qkv, num_heads, scale)


@attention_qkv.register_fake
def _(qkv, num_heads, scale):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))


@torch.library.custom_op("duodiff_triton::frontend", mutates_args=())
def frontend(
    images: torch.Tensor,
    patch_weight: torch.Tensor,
    patch_bias: torch.Tensor,
    pos_embed: torch.Tensor,
    time_token: torch.Tensor,
    label_table: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
) -> torch.Tensor:
    """U-ViT token front end: (B, C, H, W) -> (B, E + L, D) (Triton)."""
    return _k().frontend(images, patch_weight, patch_bias, pos_embed, time_token, label_table, y)


@frontend.register_fake
def _(images, patch_weight, patch_bias, pos_embed, time_token, label_table, y):
    return patch_weight.new_empty((images.shape[0], pos_embed.shape[-2], patch_weight.shape[0]))


@torch.library.custom_op("duodiff_triton::final_layer", mutates_args=())
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
    """LayerNorm + decoder_pred + drop extras + unpatchify: (B, E + L, D) -> (B, C, H, W) (Triton)."""
    return _k().final_layer(tokens, norm_weight, norm_bias, eps, pred_weight, pred_bias, extras, channels)


@final_layer.register_fake
def _(tokens, norm_weight, norm_bias, eps, pred_weight, pred_bias, extras, channels):
    b, nt, _ = tokens.shape
    grid = int(round((nt - extras) ** 0.5))
    p = int(round((pred_weight.shape[0] // channels) ** 0.5))
    return tokens.new_empty((b, channels, grid * p, grid * p))


def registered_ops() -> List[str]:
    """Qualified names of the custom ops this module registers."""
    return [f"duodiff_triton::{n}" for n in
            ("layernorm", "add_layernorm", "linear", "attention_qkv", "frontend", "final_layer")]
