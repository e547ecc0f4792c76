"""Clipping and dynamic thresholding of the denoised estimate, every solver, against closed forms.

The test model is an x0 predictor whose estimate P is fixed and partly outside [-1, 1]:
eps(x, t) = (x - alpha(t) P) / sigma(t). With a correction c, every solver's x0 is c(P) at every
step, so the exact probability-flow trajectory from x_T is x_t = alpha_t c(P) + sigma_t z with
z = (x_T - alpha_T c(P)) / sigma_T (the re-derived noise is z at every step): first-order and
higher-order solvers alike reproduce it up to rounding, and DDPM/DDIM end at exactly c(P).
"""
import math

import pytest
import torch

from duodiff_fast.samplers import (
    DDIMSampler,
    DDPMSampler,
    DenoisedCorrection,
    DPMSolver,
    NoiseSource,
    denoised_correction,
    sample,
)
from duodiff_fast.schedules import linear_ddpm, vp_linear


def _pattern(B=2, C=1, H=4, W=4):
    g = torch.Generator().manual_seed(3)
    return (3.0 * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)).float()  # many |P| > 1


class FixedX0:
    """eps for an x0 estimate that is always ``x0``."""

    def __init__(self, schedule, x0):
        self.schedule, self.x0 = schedule, x0

    def __call__(self, x, t, y):
        a = self.schedule.alpha(t.double()).view(-1, 1, 1, 1)
        s = self.schedule.sigma(t.double()).view(-1, 1, 1, 1)
        return ((x.double() - a * self.x0.double()) / s).to(x.dtype)


def _by_hand_threshold(x0, ratio, max_value):
    out = torch.empty_like(x0)
    for b in range(x0.shape[0]):
        v = x0[b].abs().flatten().sort().values
        pos = ratio * (v.numel() - 1)  # linear interpolation between order statistics
        lo, hi = math.floor(pos), math.ceil(pos)
        s = float(v[lo] + (v[hi] - v[lo]) * (pos - lo))
        s = max(s, max_value)
        out[b] = x0[b].clamp(-s, s) / s
    return out


# ---- the corrections themselves -------------------------------------------------------------------
def test_clip_is_clamp():
    x0 = _pattern()
    assert torch.equal(DenoisedCorrection("clip")(x0), x0.clamp(-1, 1))


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_dynamic_thresholding_by_hand(ratio, max_value):
    x0 = _pattern(B=3, C=2, H=5, W=5)
    x0[2] *= 0.1  # a sample already in range: s = max_value, only divided by it
    got = DenoisedCorrection("thresholding", ratio, max_value)(x0)
    torch.testing.assert_close(got, _by_hand_threshold(x0, ratio, max_value))
    assert got.abs().max() <= 1.0 + 1e-6


def test_options_checked():
    assert denoised_correction() is None
    assert denoised_correction(clip_denoised=True) == DenoisedCorrection("clip")
    assert denoised_correction(thresholding=True, thresholding_max_value=2.0).max_value == 2.0
    with pytest.raises(ValueError, match="choose one"):
        denoised_correction(True, True)
    with pytest.raises(ValueError, match="ratio"):
        DenoisedCorrection("thresholding", 1.5)
    with pytest.raises(ValueError, match="max value"):
        DenoisedCorrection("thresholding", 0.995, 0.0)
    with pytest.raises(ValueError, match="mode"):
        DenoisedCorrection("static")
    with pytest.raises(TypeError, match="x0_fn"):
        DDIMSampler(linear_ddpm(10), 5, x0_fn="clip")


CORRECTIONS = [DenoisedCorrection("clip"), DenoisedCorrection("thresholding", 0.9, 1.0)]
IDS = ["clip", "thresholding"]


# ---- one step by hand -------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
def test_ddpm_step_by_hand(corr, fused):
    sch = linear_ddpm(10)
    P = _pattern()
    x_T = torch.randn(P.shape, generator=torch.Generator().manual_seed(1))
    seen = []
    s = DDPMSampler(sch, 10, variance="beta_tilde", fused=fused, x0_fn=corr)
    s.sample(FixedX0(sch, P), x_T, noise_source=NoiseSource([5, 6]), callback=lambda i, t, x: seen.append(x))
    acp = sch.alphas_cumprod
    ab, abp = float(acp[9]), float(acp[8])
    beta = 1 - ab / abp
    x0 = corr(P)
    mean = abp**0.5 * beta / (1 - ab) * x0 + (1 - beta) ** 0.5 * (1 - abp) / (1 - ab) * x_T
    var = (1 - abp) / (1 - ab) * beta
    z = NoiseSource([5, 6]).step_noise(P.shape)
    torch.testing.assert_close(seen[0], mean + var**0.5 * z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1], x0, rtol=1e-5, atol=1e-5)  # the last step returns x0 itself


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_by_hand(corr, eta, fused):
    sch = linear_ddpm(10)
    P = _pattern()
    x_T = torch.randn(P.shape, generator=torch.Generator().manual_seed(1))
    seen = []
    s = DDIMSampler(sch, 5, eta=eta, fused=fused, x0_fn=corr)
    s.sample(FixedX0(sch, P), x_T, noise_source=NoiseSource([5, 6]), callback=lambda i, t, x: seen.append(x))
    ab, abp = float(sch.alphas_cumprod[s.indices[-1]]), float(sch.alphas_cumprod[s.indices[-2]])
    sigma = eta * ((1 - abp) / (1 - ab)) ** 0.5 * (1 - ab / abp) ** 0.5
    x0 = corr(P)
    eps = (x_T - ab**0.5 * x0) / (1 - ab) ** 0.5
    want = abp**0.5 * x0 + (1 - abp - sigma**2) ** 0.5 * eps
    if eta:
        want = want + sigma * NoiseSource([5, 6]).step_noise(P.shape)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[-1], x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("corr", CORRECTIONS, ids=IDS)
@pytest.mark.parametrize("predict_x0", [False, True])
def test_dpm_solver_first_order_step_by_hand(corr, predict_x0):
    sch = vp_linear()
    P = _pattern()
    x = torch.randn(P.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = DPMSolver(FixedX0(sch, P.double()), sch, predict_x0=predict_x0, x0_fn=corr)
    s, t = 0.8, 0.5
    got = solver.singlestep_update(x, s, t, 1)
    a_s, a_t = float(sch.alpha(torch.tensor(s).double())), float(sch.alpha(torch.tensor(t).double()))
    sg_s, sg_t = float(sch.sigma(torch.tensor(s).double())), float(sch.sigma(torch.tensor(t).double()))
    x0 = corr(P.double())
    # the first-order step is DDIM's: x_t = alpha_t x0 + sigma_t (x_s - alpha_s x0) / sigma_s
    torch.testing.assert_close(got, a_t * x0 + sg_t * (x - a_s * x0) / sg_s, rtol=1e-7, atol=1e-7)


# ---- whole runs, every solver and method --------------------------------------------------------------
RUNS = [
    ("ddpm", {}), ("ddpm", {"variance": "beta_tilde"}), ("ddim", {}), ("ddim", {"eta": 1.0}),
    ("dpm_solver", {"method": "fast"}), ("dpm_solver", {"method": "singlestep", "order": 2}),
    ("dpm_solver", {"method": "singlestep_fixed", "order": 3}), ("dpm_solver", {"method": "multistep", "order": 3}),
    ("dpm_solver", {"method": "multistep", "order": 2, "predict_x0": True}),
]


@pytest.mark.parametrize("solver,opts", RUNS, ids=[f"{s}-{'-'.join(map(str, o.values()))}" for s, o in RUNS])
@pytest.mark.parametrize("mode", ["none", "clip", "thresholding"])
def test_every_solver_ends_at_the_corrected_estimate(solver, opts, mode):
    sch = linear_ddpm(1000)
    P = _pattern()
    kw = {"clip_denoised": mode == "clip", "thresholding": mode == "thresholding", "thresholding_ratio": 0.9}
    steps = {"ddpm": 20, "ddim": 10, "dpm_solver": 9}[solver]
    out = sample(FixedX0(sch, P.double()), sch, tuple(P.shape), solver=solver, num_steps=steps, seeds=[1, 2],
                 dtype=torch.float64, progress=False, **opts, **kw)
    corr = denoised_correction(mode == "clip", mode == "thresholding", 0.9)
    x0 = P.double() if corr is None else corr(P.double())
    if solver == "dpm_solver":
        # exact trajectory to t_end: alpha x0 + sigma z, z from x_T
        x_T = NoiseSource([1, 2], dtype=torch.float64).initial(P.shape)
        t1, te = torch.tensor(1.0).double(), torch.tensor(sch.t_min).double()
        z = (x_T - sch.alpha(t1) * x0) / sch.sigma(t1)
        want = sch.alpha(te) * x0 + sch.sigma(te) * z
    else:
        want = x0
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if mode != "none":
        assert out.abs().max() <= 1.0 + 0.05  # at t_end sigma z adds ~0.01 * |z|
    else:
        assert out.abs().max() > 2.0  # the default uses the estimate as it is


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm_solver"])
def test_fused_philox_path_agrees(solver):
    sch = linear_ddpm(1000)
    P = _pattern()
    kw = dict(solver=solver, num_steps=6, seeds=[3, 4], progress=False, noise="philox", clip_denoised=True)
    plain = sample(FixedX0(sch, P), sch, tuple(P.shape), fused=False, **kw)
    fused = sample(FixedX0(sch, P), sch, tuple(P.shape), fused=True, **kw)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_default_is_bit_identical_to_no_correction():
    """The new options off leave every solver's arithmetic as it was (no x0 round trip)."""
    sch = linear_ddpm(1000)

    def den(x, t, y):
        return 0.3 * x + 0.1 * t.view(-1, 1, 1, 1).to(x.dtype)

    for solver in ("ddpm", "ddim", "dpm_solver"):
        a = sample(den, sch, (2, 1, 4, 4), solver=solver, num_steps=6, seeds=[1, 2], progress=False)
        s = {"ddpm": DDPMSampler(sch, 6), "ddim": DDIMSampler(sch, 6)}.get(solver)
        if s is not None:
            ns = NoiseSource([1, 2])
            b = s.sample(den, ns.initial((2, 1, 4, 4)), noise_source=ns)
        else:
            b = DPMSolver(den, sch).sample(NoiseSource([1, 2]).initial((2, 1, 4, 4)), steps=6)
        assert torch.equal(a, b)


# ---- the command line ---------------------------------------------------------------------------------
def test_cli_sample_records_and_applies_the_choice(tmp_path, capsys):
    import json

    from duodiff_fast.cli import main

    common = ["sample", "--config", "tiny", "--random-weights", "--solver", "ddim", "--steps", "3",
              "--n-samples", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    for flags, want in (([], "none"), (["--clip-denoised"], "clip"),
                        (["--thresholding", "--thresholding-ratio", "0.9"],
                         {"mode": "thresholding", "ratio": 0.9, "max_value": 1.0})):
        out = tmp_path / (flags[0][2:] if flags else "plain")
        assert main(common + flags + ["--out", str(out)]) == 0
        assert json.loads((out / "manifest.json").read_text())["settings"]["denoised"] == want
        x = torch.load(out / "samples.pt", weights_only=True)
        if flags:  # the last DDIM step returns the corrected x0 itself
            assert x.abs().max() <= 1.0 + 1e-5
        else:  # a random network's estimate is far out of range
            assert x.abs().max() > 1.5
    assert main(common + ["--clip-denoised", "--thresholding", "--out", str(tmp_path / "x")]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(common + ["--thresholding", "--thresholding-ratio", "2", "--out", str(tmp_path / "x")]) == 2
    assert "ratio" in capsys.readouterr().err
