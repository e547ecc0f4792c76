"""Every DiT method on the "triton" backend against the same method on "reference": DuoDiff, ASE
and AdaDiff (simulated, shrinking, bucketed) on a tiny DiT with learned variance, on the device the
kernels run on (Triton's CPU interpreter in float32 here, the GPU in bfloat16 on a CUDA machine).

The batch mixes timesteps so the row-splitting paths run (DuoDiff's two backbones, ASE's per-row kept
blocks, AdaDiff's shrinking batch), and a second call goes through classifier-free guidance. Each
triton run must really use the fused DiT ops: the gated-residual linear is counted.
"""
import pytest
import torch

from duodiff_fast.backends import prepare_model
from duodiff_fast.methods import AdaDiff, AdaDiffUViT, ASEDenoiser, DuoDiff, ModelDenoiser
from duodiff_fast.methods.adadiff import set_synthetic_exit_profile
from duodiff_fast.models import DiT
from duodiff_fast.ops import triton_ops
from duodiff_fast.samplers import ClassifierFreeGuidance
from duodiff_fast.schedules import linear_ddpm

from tests.kernels.conftest import device  # noqa: F401,E402  (the device the kernels run on, or skip)

DEPTH = 4


def _dit(depth: int, seed: int) -> DiT:
    torch.manual_seed(seed)
    m = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero: every block changes the output
    return m.eval()


def _denoiser(method: str, backend: str, schedule):
    """The method's denoiser with its model prepared for ``backend`` (same weights every time)."""
    full = _dit(DEPTH, 0)
    if method == "base":
        return ModelDenoiser(prepare_model(full, backend), schedule)
    if method == "duodiff":
        return DuoDiff(prepare_model(_dit(1, 1), backend), prepare_model(full, backend), schedule, t_s=500)
    if method.startswith("adadiff"):
        ada = AdaDiffUViT(full, init_heads_from_final=False)
        torch.manual_seed(2)
        for p in ada.heads.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        # Exits follow the time only: rows at t = 0.9 leave after two layers, rows at t = 0.2 run
        # every block, far from theta on either side.
        set_synthetic_exit_profile(ada, schedule, t_switch=0.6, exit_layer=2, theta=0.07, sample_spread=0.0)
        return AdaDiff(prepare_model(ada, backend), schedule, 0.07, mode=method.split("-")[1])
    if method == "ase":
        return ASEDenoiser(prepare_model(full, backend), schedule, [4, 2, 1])
    raise AssertionError(method)


METHODS = ["base", "duodiff", "adadiff-simulated", "adadiff-shrinking", "adadiff-bucketed", "ase"]


@pytest.mark.parametrize("method", METHODS)
def test_dit_method_on_triton_matches_reference(method, device, monkeypatch):
    schedule = linear_ddpm()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 4, 4, generator=g).to(device)
    t = torch.tensor([0.9, 0.2, 0.5, 0.95], dtype=torch.float32, device=device)  # every route
    y = torch.tensor([1, 5, 0, 9], device=device)

    calls = {"n": 0}
    real = triton_ops.linear_gated_residual

    def counted(*args):
        calls["n"] += 1
        return real(*args)

    monkeypatch.setattr(triton_ops, "linear_gated_residual", counted)
    outs, exits = {}, {}
    for backend in ("reference", "triton"):
        calls["n"] = 0
        den = _denoiser(method, backend, schedule)
        den.model.to(device)
        if method == "duodiff":
            den.shallow.to(device)
        with torch.no_grad():
            mixed = den.output(x, t, y)  # eps and the variance value
            if method.startswith("adadiff"):
                exits[backend] = den.last_exits.clone()
            cfg = ClassifierFreeGuidance(den, 1.5, den.model.null_class)
            guided = cfg(x, t[:1].expand(4).contiguous(), y)
        assert mixed.shape[1] == 8, "the learned variance channels come back"
        outs[backend] = torch.cat([mixed.flatten(), guided.flatten()]).float().cpu()
        if backend == "reference":
            assert calls["n"] == 0, "the reference backend called a Triton op"
        else:
            assert calls["n"] > 0, f"{method} on the triton backend made no fused call"
    ref = outs["reference"]
    err = float((outs["triton"] - ref).norm() / ref.norm())
    tol = 1e-4 if device.type == "cpu" else 5e-2
    assert err < tol, f"{method}: triton vs reference relative error {err:.3g}"
    if exits:
        assert torch.equal(exits["triton"], exits["reference"])
        assert set(exits["reference"].tolist()) == {2, DEPTH}  # rows really left early, others ran every block
