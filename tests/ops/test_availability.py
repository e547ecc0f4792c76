"""ops.availability answers per device: a CPU-only build of _C never serves CUDA tensors (issue 9)."""
import types

import pytest
import torch

from duodiff_fast.models import executor
from duodiff_fast.ops import availability, native


class _CudaLike:
    """Stands in for a (B,) CUDA tensor: only the device questions the callers ask."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def dim(self):
        return 1


@pytest.fixture
def cpu_only_extension(monkeypatch):
    """Pretend _C loaded, built without CUDA kernels."""
    fake = types.SimpleNamespace(with_cuda=False, build_info=lambda: "fake CPU-only build")
    monkeypatch.setattr(native, "_STATE", {"loaded": True, "module": fake, "error": None, "warned": True})
    return fake


@pytest.fixture
def missing_extension(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {"loaded": True, "module": None, "error": "ImportError: gone",
                                           "warned": True})


def test_cpu_only_build_serves_cpu_not_cuda(cpu_only_extension):
    assert availability.native_available(torch.device("cpu"))
    assert not availability.native_available(torch.device("cuda"))
    assert "without CUDA" in availability.native_unavailable_reason("cuda")
    assert native.available() and not native.cuda_available()


def test_cpu_only_build_sends_cuda_time_embedding_to_pytorch(cpu_only_extension, monkeypatch):
    # Before the fix the native op was called for any CUDA tensor once _C had loaded, and a CPU-only
    # build then failed every CUDA forward. The executor must take the PyTorch path instead.
    from duodiff_fast.ops import embedding

    monkeypatch.setattr(embedding, "timestep_embedding_reference", lambda t, dim: ("reference", dim))
    assert executor._sinusoid(_CudaLike(), 8) == ("reference", 8)


def test_cuda_build_would_serve_cuda(cpu_only_extension):
    cpu_only_extension.with_cuda = True
    assert availability.native_available(torch.device("cuda"))
    assert availability.native_unavailable_reason(torch.device("cuda")) is None


def test_missing_extension_has_a_reason_everywhere(missing_extension):
    for dev in ("cpu", "cuda"):
        assert not availability.native_available(torch.device(dev))
        assert "ImportError: gone" in availability.native_unavailable_reason(dev)
    lines = availability.report()
    assert any(line.startswith("native ops on cuda: unavailable") for line in lines)
    assert any(line.startswith("triton on cpu") for line in lines)


def test_other_devices_are_refused_with_a_reason(cpu_only_extension):
    assert "meta" in availability.native_unavailable_reason(torch.device("meta"))
    assert "meta" in availability.triton_unavailable_reason(torch.device("meta")) or \
        availability.triton_import_error() is not None
