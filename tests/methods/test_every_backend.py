"""Every method on every backend: each method's denoiser on the "triton" backend (Triton's CPU
interpreter here, float32; the GPU on a CUDA machine) against the same method on "reference".

The batch mixes timesteps on purpose, so the row-splitting paths run (DuoDiff's two backbones,
ASE's per-row kept blocks, multistage's per-row stages, AdaDiff's shrinking batch), and a second
call goes through classifier-free guidance (shared timestep). Each triton run must also really
use the fused ops: the Triton linear op is counted.
"""
import copy

import pytest
import torch

from duodiff_fast.ops import triton_ops
from duodiff_fast.backends import prepare_model
from duodiff_fast.methods import (AdaDiff, AdaDiffUViT, ASEDenoiser, DuoDiff, ModelDenoiser, MultistageDenoiser,
                                  MultistageUViT)
from duodiff_fast.methods.adadiff import set_synthetic_exit_profile
from duodiff_fast.models import create_model, get_config
from duodiff_fast.samplers import ClassifierFreeGuidance
from duodiff_fast.schedules import get_schedule


from tests.kernels.conftest import device  # noqa: F401,E402  (the device the kernels run on, or skip)


def _models():
    torch.manual_seed(0)
    full = create_model("tiny-latent").eval()
    shallow = create_model("tiny-latent", depth=0).eval()
    return full, shallow


def _denoiser(method: str, backend: str, schedule):
    """The method's denoiser with its model prepared for ``backend`` (same weights every time)."""
    full, shallow = _models()
    if method == "base":
        return ModelDenoiser(prepare_model(full, backend), schedule)
    if method == "duodiff":
        return DuoDiff(prepare_model(shallow, backend), prepare_model(full, backend), schedule, t_s=500)
    if method.startswith("adadiff"):
        ada = AdaDiffUViT(full)
        # Exits follow the time only (no activation weight): rows at t = 0.9 leave after two
        # layers, rows at t = 0.2 run the whole network, far from theta on either side.
        set_synthetic_exit_profile(ada, schedule, t_switch=0.6, exit_layer=2, theta=0.07, sample_spread=0.0)
        return AdaDiff(prepare_model(ada, backend), schedule, 0.07, mode=method.split("-")[1])
    if method == "ase":
        return ASEDenoiser(prepare_model(full, backend), schedule, [2, 1, 0])
    if method == "multistage":
        torch.manual_seed(1)
        kwargs = dict(get_config("tiny-latent"))
        ms = MultistageUViT((0.4, 0.7), stage_widths=[64, 32, 48], **kwargs).eval()
        return MultistageDenoiser(prepare_model(ms, backend), schedule)
    raise AssertionError(method)


METHODS = ["base", "duodiff", "adadiff-simulated", "adadiff-shrinking", "adadiff-bucketed", "ase", "multistage"]


@pytest.mark.parametrize("method", METHODS)
def test_method_on_triton_matches_reference(method, device, monkeypatch):
    schedule = get_schedule("vp-linear")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g).to(device)
    t = torch.tensor([0.9, 0.2, 0.5, 0.95], dtype=torch.float32, device=device)  # every route
    y = torch.tensor([1, 5, 0, 9], device=device)

    calls = {"n": 0}
    real_linear = triton_ops.linear

    def counted(*args):
        calls["n"] += 1
        return real_linear(*args)

    monkeypatch.setattr(triton_ops, "linear", counted)  # what the Triton executor calls
    outs, exits = {}, {}
    for backend in ("reference", "triton"):
        calls["n"] = 0
        den = _denoiser(method, backend, schedule)
        den.model.to(device)
        if method == "duodiff":
            den.shallow.to(device)
        with torch.no_grad():
            mixed = den(x, t, y)
            if method.startswith("adadiff"):
                exits[backend] = den.last_exits.clone()
            cfg = ClassifierFreeGuidance(den, 1.5, den.model.null_class)
            guided = cfg(x, t[:1].expand(4).contiguous(), y)
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
        assert set(exits["reference"].tolist()) == {2, 5}  # rows really left early, others ran all 5 layers
