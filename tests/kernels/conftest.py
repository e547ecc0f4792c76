"""Fixtures for the Triton kernel tests.

On a machine without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); on a CUDA machine they run on the GPU. The
tests skip, with the reason, when neither is possible. Nothing here touches CUDA at import time.
"""
import pytest
import torch

from tests.conftest import ERROR_FLOOR as FLOOR, rel, within_torch_error  # noqa: F401  (the one tolerance rule)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="session")
def device(triton_device):
    """The device the kernels run on here, or skip with the reason (tests/conftest.py's triton_device)."""
    return triton_device


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


def assert_within_torch_error(out, torch_lowp, exact, dtype, what=""):
    """The kernel's output has ``dtype`` and meets the tolerance rule (tests/conftest.py)."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    within_torch_error(out, torch_lowp, exact, dtype, what)
