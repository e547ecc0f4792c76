"""duodiff_fast.dispatch: backend choice, fallback warning, explicit errors, custom ops."""
import warnings

import pytest
import torch

from duodiff_fast import dispatch
from duodiff_fast.ops import impl
from duodiff_fast.backends import BACKENDS, prepare_model
from duodiff_fast.models import create_model
from tests.conftest import skip_unless_triton_runs


@pytest.fixture
def unavailable(monkeypatch):
    """Pretend Triton cannot run, with a known reason; forget earlier warnings (ops.impl decides)."""
    monkeypatch.setattr(impl, "triton_unavailable_reason", lambda device=None: "no test GPU")
    monkeypatch.setattr(impl, "_WARNED", set())


@pytest.fixture
def available(monkeypatch):
    monkeypatch.setattr(impl, "triton_unavailable_reason", lambda device=None: None)


CPU = torch.device("cpu")


def test_torch_and_gradients_always_run_the_reference(available):
    assert dispatch.resolve_backend("torch", CPU) == "torch"
    assert dispatch.resolve_backend("triton", CPU, needs_grad=True) == "torch"
    assert dispatch.resolve_backend("auto", CPU) == "triton"
    assert dispatch.resolve_backend("triton", CPU) == "triton"


def test_auto_falls_back_with_one_warning(unavailable):
    with pytest.warns(RuntimeWarning, match="no test GPU"):
        assert dispatch.resolve_backend("auto", CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend("auto", CPU) == "torch"  # no second warning


def test_explicit_triton_where_unavailable_is_an_error(unavailable):
    with pytest.raises(dispatch.BackendUnavailable, match="no test GPU"):
        dispatch.resolve_backend("triton", CPU)
    with pytest.raises(dispatch.BackendUnavailable, match="no test GPU"):
        prepare_model(create_model("tiny"), "triton")


def test_per_call_override(available):
    with dispatch.use_backend("torch"):
        assert dispatch.resolve_backend("triton", CPU) == "torch"
        with dispatch.use_backend("auto"):
            assert dispatch.resolve_backend("torch", CPU) == "triton"
    assert dispatch.resolve_backend("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="unknown op implementation"):
        dispatch.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match="matmul"):
        dispatch.set_matmul("cutlass")


def test_reasons_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only reasons")
    # Import triton (and the kernels) under the suite's TRITON_INTERPRET first: triton fixes its
    # interpreter mode at import, and this test only flips the variable dispatch reads.
    dispatch._triton_import_error()
    import duodiff_fast.kernels  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = dispatch.triton_unavailable_reason(CPU)
    assert reason and "CUDA" in reason and "TRITON_INTERPRET" in reason
    assert dispatch.triton_unavailable_reason(torch.device("cuda"))  # no device: a reason, no crash
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dispatch._triton_import_error() is None:
        assert dispatch.triton_unavailable_reason(CPU) is None


def test_triton_is_a_listed_backend():
    assert "triton" in BACKENDS


def test_custom_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in dispatch.registered_ops():
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), name
    with FakeTensorMode():  # shapes come from the fake implementations: no kernel runs
        x = torch.empty(2, 10, 24)
        w = torch.empty(36, 24)
        assert dispatch.linear(x, w, None, None, None, True).shape == (2, 10, 36)
        assert dispatch.linear(x, torch.empty(8, 48), None, None, x, False).shape == (2, 10, 8)
        assert dispatch.attention_qkv(torch.empty(2, 10, 72), 3, 0.25).shape == (2, 10, 24)
        y, s = dispatch.add_layernorm(x, x, torch.empty(24), torch.empty(24), 1e-6)
        assert y.shape == s.shape == x.shape
        img = dispatch.frontend(torch.empty(2, 3, 8, 8), torch.empty(24, 3, 2, 2), torch.empty(24),
                                torch.empty(1, 18, 24), torch.empty(2, 24), torch.empty(5, 24),
                                torch.zeros(2, dtype=torch.long))
        assert img.shape == (2, 18, 24)
        out = dispatch.final_layer(torch.empty(2, 18, 24), torch.empty(24), torch.empty(24), 1e-6,
                                   torch.empty(12, 24), torch.empty(12), 2, 3)
        assert out.shape == (2, 3, 8, 8)


def _runnable():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip_unless_triton_runs(dev)
    return dev


def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake implementation and dispatch agree for each op."""
    dev = _runnable()
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    x = r(2, 5, 24)
    cases = [
        (dispatch.layernorm, (x, r(24), r(24), 1e-6)),
        (dispatch.add_layernorm, (x, r(2, 5, 24), r(24), r(24), 1e-6)),
        (dispatch.linear, (x, r(40, 24), r(40), None, None, True)),
        (dispatch.linear, (x, r(24, 48), None, r(2, 5, 24), x, False)),
        (dispatch.attention_qkv, (r(2, 5, 3 * 2 * 16), 2, 0.25)),
        (dispatch.frontend, (r(2, 3, 4, 4), r(24, 3, 2, 2), r(24), r(1, 6, 24), r(2, 24), r(5, 24),
                             torch.tensor([1, 4], device=dev))),
        (dispatch.final_layer, (r(2, 6, 24), r(24), r(24), 1e-6, r(12, 24), r(12), 2, 3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_fused_forward_traces_under_torch_compile():
    """Dynamo traces the fused forward as one graph through the custom ops (no graph break)."""
    from duodiff_fast.models.fused import fused_forward

    dev = _runnable()
    torch.manual_seed(0)
    model = create_model("tiny-latent").to(dev).eval().requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, device=dev)
    t, y = torch.tensor([3.0, 9.0], device=dev), torch.tensor([1, 2], device=dev)
    compiled = torch.compile(lambda a, b, c: fused_forward(model, a, b, c), backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, t, y)
        ref = model(x, t, y)
    tol = 1e-4 if dev.type == "cpu" else 1e-2  # cuDNN may run the reference's conv in TF32
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
