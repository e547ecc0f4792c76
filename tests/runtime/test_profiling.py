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


def test_nvtx_on_without_cuda_is_a_no_op(monkeypatch):
    # Pretend there is no CUDA device (whatever this machine has), so the check runs everywhere.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiling.enable(True)
    try:
        assert not profiling.enabled()
        assert profiling.nvtx_range("step") is profiling.nvtx_range("other")  # the shared no-op
        with profiling.nvtx_range("step"):
            pass
        assert profiling.annotate_module(create_model("tiny", depth=2)) == 0
    finally:
        profiling.enable(False)


def test_nvtx_on_with_cuda_pushes_and_pops_ranges(monkeypatch):
    # Record the NVTX calls instead of sending them to a device (CPU machines run this too).
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append(("pop",)))
    profiling.enable(True)
    try:
        assert profiling.enabled()
        with profiling.nvtx_range("step 3"):
            events.append(("body",))
        assert events == [("push", "step 3"), ("body",), ("pop",)]
        events.clear()
        m = create_model("tiny", depth=2).eval()
        assert profiling.annotate_module(m, "uvit") == 4  # model, 1 in-block, 1 out-block, mid-block
        assert profiling.annotate_module(m, "uvit") == 4  # idempotent: no second set of hooks
        with torch.no_grad():
            m(torch.randn(1, 3, 16, 16), torch.tensor([5.0]))
        pushed = [e[1] for e in events if e[0] == "push"]
        assert pushed == ["uvit", "uvit.in_blocks[0]", "uvit.mid_block", "uvit.out_blocks[0]"]
        assert sum(e[0] == "pop" for e in events) == len(pushed)
    finally:
        profiling.enable(False)
