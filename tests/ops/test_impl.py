"""ops.impl: the one module that decides each op's implementation (native C++, Triton, PyTorch); the
former names in dispatch, UViT and FusedUViT still work (issue 20, part 3: one vocabulary)."""
import pathlib
import re

import pytest
import torch

from duodiff_fast import dispatch
from duodiff_fast.models import create_model
from duodiff_fast.models.fused import FusedUViT
from duodiff_fast.ops import compaction, embedding, impl

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "duodiff_fast"


def test_dispatch_names_are_the_impl_module():
    assert dispatch.resolve_backend is impl.layer_impl
    assert dispatch.use_backend is impl.use_impl
    assert dispatch.check_backend_choice is impl.check_impl
    assert dispatch.BackendUnavailable is impl.BackendUnavailable
    assert dispatch.BACKEND_CHOICES == impl.IMPL_CHOICES == ("auto", "torch", "triton")
    assert dispatch.set_matmul is impl.set_matmul and dispatch.matmul_impl is impl.matmul_impl


def test_model_attributes_keep_their_former_names():
    m = create_model("tiny")
    assert m.op_impl == "torch" and m.kernel_backend == "torch"
    m.kernel_backend = "auto"
    assert m.op_impl == "auto"
    f = FusedUViT(m, backend="torch")
    assert f.impl == f.backend == "torch"
    assert FusedUViT(m, "triton").impl == "triton"
    with pytest.raises(ValueError, match="unknown op implementation"):
        FusedUViT(m, impl="cuda")
    with pytest.raises(TypeError, match="pass one"):
        FusedUViT(m, impl="torch", backend="triton")


def test_no_op_is_called_outside_ops():
    """Every torch.ops.duodiff / duodiff_triton call lives in duodiff_fast/ops/ (one home for ops)."""
    call = re.compile(r"torch\.ops\.duodiff(_triton)?\.\w+\(")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "ops" or path.parent.name == "kernels":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if call.search(line) and not line.strip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{no}: {line.strip()}")
    assert not offenders, offenders


def test_native_ops_follow_the_one_answer(monkeypatch):
    """With impl.native saying no, the embedding, Philox noise and compaction take their PyTorch
    references (no torch.ops.duodiff call), whatever the extension could do."""
    from duodiff_fast.samplers import philox

    monkeypatch.setattr(impl, "native", lambda device: False)

    class NoNative:
        def __getattr__(self, name):
            raise AssertionError(f"torch.ops.duodiff.{name} called although impl.native said no")

    monkeypatch.setattr(torch.ops, "duodiff", NoNative(), raising=False)
    t = torch.tensor([1.0, 500.0])
    torch.testing.assert_close(embedding.timestep_embedding(t, 8), embedding.timestep_embedding_reference(t, 8))
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    torch.testing.assert_close(philox.philox_normal(seeds, 3, (2, 2)), philox.philox_normal_reference(seeds, 3, (2, 2)))
    keep = torch.tensor([True, False, True])
    assert compaction.active_indices(keep).tolist() == [0, 2]
    (rows,) = compaction.gather_rows([torch.arange(6.).view(3, 2)], torch.tensor([2, 0]))
    assert rows.tolist() == [[4.0, 5.0], [0.0, 1.0]]
