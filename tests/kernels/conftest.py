"""Fixtures for the Triton kernel tests.

On a machine without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); on a CUDA machine they run on the GPU. The
tests skip, with the reason, when neither is possible. Nothing here touches CUDA at import time.
"""
import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Additive slack on top of "twice PyTorch's own error": float32 kernels and references differ only
# by summation order, so they get a small absolute floor instead.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}


@pytest.fixture(scope="session")
def device():
    """The device the kernels run on here, or skip with the reason."""
    from duodiff_fast import dispatch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = dispatch.triton_unavailable_reason(dev)
    if reason:
        pytest.skip(f"Triton kernels cannot run: {reason}")
    return dev


@pytest.fixture
def poisoned(monkeypatch):
    """Make every torch.empty / torch.empty_like allocation start as NaN (or -1 for integers),
    so an output element the kernel forgot to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf when a holds NaN)."""
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_within_torch_error(out, torch_lowp, exact, dtype, what=""):
    """The kernel's error against the float64 result is at most twice PyTorch's own at ``dtype``."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    err = rel(out, exact)
    bound = 2 * rel(torch_lowp, exact) + FLOOR[dtype]
    assert err <= bound, f"{what}: kernel error {err:.3g} > bound {bound:.3g} ({dtype})"
