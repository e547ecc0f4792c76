"""The "triton" backend on DiT: the Triton executor's adaLN block and final layer against the
official DiT outputs (golden file) and the float64 module path, on the device the kernels run on
(Triton's CPU interpreter in float32 here, the GPU on a CUDA machine)."""
import pytest
import torch

from duodiff_fast.backends import prepare_model
from duodiff_fast.models import DiT
from duodiff_fast.models.executor import TritonExecutor
from duodiff_fast.ops import triton_ops
from tests.kernels.conftest import assert_within_torch_error, device  # noqa: F401  (the kernels' device, or skip)


def _golden_model(g) -> DiT:
    model = DiT(**g["config"])
    model.load_state_dict(g["state_dict"])
    return model.eval()


@pytest.fixture
def counted_dit_ops(monkeypatch):
    """Counts the fused DiT custom-op calls (what the Triton executor must really run)."""
    calls = {"adaln_layernorm": 0, "linear_gated_residual": 0}
    for name in calls:
        real = getattr(triton_ops, name)

        def wrapped(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(triton_ops, name, wrapped)
    return calls


def _check(out, ref_fp32, exact, golden_out, what):
    """Within twice PyTorch's own float32 error against float64 (plus the float32 floor) on CPU;
    bfloat16's bound on a GPU; and close to the official output either way."""
    if out.dtype == torch.float32:
        assert_within_torch_error(out, ref_fp32, exact, torch.float32, what)
        tol = 1e-4
    else:  # bfloat16 on CUDA: the backend's dtype
        tol = 3e-2
    err = float((out.double().cpu() - golden_out.double()).norm() / golden_out.double().norm())
    assert err < tol, f"{what}: relative error {err:.3g} against the official output"


def test_golden_forward_on_triton(dit_golden, device, counted_dit_ops):
    f = dit_golden["forward"]
    model = _golden_model(dit_golden)
    fast = prepare_model(model.to(device), "triton")
    assert isinstance(fast, DiT) and fast.op_impl == "triton"
    dtype = next(fast.parameters()).dtype
    with torch.no_grad():
        out = fast(f["x"].to(device, dtype), f["t"].to(device), f["y"].to(device))
        ref = model.cpu()(f["x"], f["t"], f["y"])
        exact = model.double()(f["x"].double(), f["t"], f["y"])
    depth = dit_golden["config"]["depth"]
    assert counted_dit_ops == {"adaln_layernorm": 2 * depth + 1, "linear_gated_residual": 2 * depth}
    _check(out, ref, exact, f["out"], "DiT forward on triton")


def test_golden_forward_with_cfg_on_triton(dit_golden, device, counted_dit_ops):
    c = dit_golden["forward_with_cfg"]
    model = _golden_model(dit_golden)
    fast = prepare_model(model.to(device), "triton")
    dtype = next(fast.parameters()).dtype
    with torch.no_grad():
        out = fast.forward_with_cfg(c["x"].to(device, dtype), c["t"].to(device), c["y"].to(device), c["cfg_scale"])
        ref = model.cpu().forward_with_cfg(c["x"], c["t"], c["y"], c["cfg_scale"])
        exact = model.double().forward_with_cfg(c["x"].double(), c["t"], c["y"], c["cfg_scale"])
    assert counted_dit_ops["linear_gated_residual"] > 0
    _check(out, ref, exact, c["out"], "DiT forward_with_cfg on triton")


@pytest.mark.parametrize("matmul", ["triton", "cublas"])
def test_executor_pieces_match_the_modules(device, matmul, monkeypatch):
    """adaln_block and adaln_final (also on an odd token count and width) equal the modules."""
    from duodiff_fast.ops import impl

    monkeypatch.setattr(impl, "_MATMUL", {"impl": matmul})
    torch.manual_seed(0)
    m = DiT(input_size=6, patch_size=2, in_channels=3, hidden_size=24, depth=1, num_heads=3, num_classes=4).eval()
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero
    ex = TritonExecutor()
    assert ex.matmul == matmul
    x, c = torch.randn(2, 9, 24), torch.randn(2, 24)
    with torch.no_grad():
        m.double()
        want_blk = m.blocks[0](x.double(), c.double())
        want_fin = m.decode(x.double(), c.double())
        m.float().to(device)
        got_blk = ex.adaln_block(m.blocks[0], x.to(device), c.to(device))
        got_fin = ex.adaln_final(m.final_layer, x.to(device), c.to(device), m.out_channels)
    tol = 1e-5 if device.type == "cpu" else 2e-3
    assert got_fin.shape == (2, 6, 6, 6)
    for got, want in ((got_blk, want_blk), (got_fin, want_fin)):
        err = float((got.double().cpu() - want).norm() / want.norm())
        assert err < tol, f"{matmul}: relative error {err:.3g}"


def test_prepare_model_refuses_a_model_without_backbone():
    with pytest.raises(TypeError, match="U-ViT and DiT"):
        prepare_model(torch.nn.Linear(2, 2), "triton")
