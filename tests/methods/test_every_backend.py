"""Every method on every backend: each method's denoiser on the "triton" backend (Triton's CPU
interpreter on CPU tensors without CUDA, float32; CUDA tensors in bfloat16 on a GPU) against the
same method computed in float64, within the one tolerance rule (tests/conftest.py): at most twice
PyTorch's own error at the triton backend's precision (the "reference" backend in float32 on the
CPU, "eager-bf16" on a GPU). The models are built on the device the backend targets before they
are prepared, as a user does: a CPU model prepared for "triton" on a CUDA machine is refused.

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


from tests.conftest import backend_dtype, lowp_torch_backend, within_torch_error


def _models():
    torch.manual_seed(0)
    full = create_model("tiny-latent").eval()
    shallow = create_model("tiny-latent", depth=0).eval()
    return full, shallow


def _prepare(model, backend: str, device: torch.device):
    """``model`` on ``device`` in ``backend``'s form; "float64" is the reference path in float64."""
    model = model.to(device)
    if backend == "float64":
        return prepare_model(model, "reference").double()
    return prepare_model(model, backend)


def _denoiser(method: str, backend: str, schedule, device: torch.device):
    """The method's denoiser with its model built on ``device`` and prepared for ``backend`` (same
    weights every time)."""
    full, shallow = _models()
    if method == "base":
        return ModelDenoiser(_prepare(full, backend, device), schedule)
    if method == "duodiff":
        return DuoDiff(_prepare(shallow, backend, device), _prepare(full, backend, device), schedule, t_s=500)
    if method.startswith("adadiff"):
        ada = AdaDiffUViT(full)
        # Exits follow the time only (no activation weight): rows at t = 0.9 leave after two
        # layers, rows at t = 0.2 run the whole network, far from theta on either side.
        set_synthetic_exit_profile(ada, schedule, t_switch=0.6, exit_layer=2, theta=0.07, sample_spread=0.0)
        return AdaDiff(_prepare(ada, backend, device), schedule, 0.07, mode=method.split("-")[1])
    if method == "ase":
        return ASEDenoiser(_prepare(full, backend, device), schedule, [2, 1, 0])
    if method == "multistage":
        torch.manual_seed(1)
        kwargs = dict(get_config("tiny-latent"))
        ms = MultistageUViT((0.4, 0.7), stage_widths=[64, 32, 48], **kwargs).eval()
        return MultistageDenoiser(_prepare(ms, backend, device), schedule)
    raise AssertionError(method)


METHODS = ["base", "duodiff", "adadiff-simulated", "adadiff-shrinking", "adadiff-bucketed", "ase", "multistage"]


@pytest.mark.parametrize("method", METHODS)
def test_method_on_triton_matches_reference(method, triton_device, monkeypatch):
    device = triton_device
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
    lowp = lowp_torch_backend("triton", device)
    outs, exits = {}, {}
    for backend in ("float64", lowp, "triton"):
        calls["n"] = 0
        den = _denoiser(method, backend, schedule, device)
        xb = x.double() if backend == "float64" else x
        with torch.no_grad():
            mixed = den(xb, t, y)
            if method.startswith("adadiff"):
                exits[backend] = den.last_exits.clone()
            cfg = ClassifierFreeGuidance(den, 1.5, den.model.null_class)
            guided = cfg(xb, t[:1].expand(4).contiguous(), y)
        outs[backend] = torch.cat([mixed.flatten(), guided.flatten()]).cpu()
        if backend != "triton":
            assert calls["n"] == 0, f"the {backend} path called a Triton op"
        else:
            assert calls["n"] > 0, f"{method} on the triton backend made no fused call"
    within_torch_error(outs["triton"], outs[lowp], outs["float64"], backend_dtype("triton", device),
                       f"{method} on triton ({device.type})")
    if exits:
        assert torch.equal(exits["triton"], exits["float64"]) and torch.equal(exits[lowp], exits["float64"])
        assert set(exits["float64"].tolist()) == {2, 5}  # rows really left early, others ran all 5 layers
