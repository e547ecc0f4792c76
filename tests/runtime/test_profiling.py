import torch

from duodiff_fast import profiling
from duodiff_fast.models import create_model


def test_nvtx_off_is_free():
    profiling.enable(False)
    a, b = profiling.nvtx_range("x"), profiling.nvtx_range("y")
    assert a is b  # one shared no-op context
    with a:
        pass
    m = create_model("tiny", depth=2)
    assert profiling.annotate_module(m) == 0
    assert not m._forward_pre_hooks


def test_nvtx_on_without_cuda_is_a_no_op():
    profiling.enable(True)
    try:
        if not torch.cuda.is_available():
            assert not profiling.enabled()
            with profiling.nvtx_range("step"):
                pass
    finally:
        profiling.enable(False)
