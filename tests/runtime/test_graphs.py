"""The CUDA-graph sampler runtime: pure-Python logic and the CPU path (the plain loop), everywhere;
capture and replay on a GPU only."""
import pytest
import torch

from duodiff_fast.methods import DuoDiff, ModelDenoiser
from duodiff_fast.models import create_model
from duodiff_fast.runtime import ConstantTable, static_constants
from duodiff_fast.samplers.constants import GraphUnsafe, cached_time, device_constant, host_time
from duodiff_fast.runtime.graphs import GraphDenoiser, GraphKey, GraphSampler, HostRoutedDenoiser, choose_bucket
from duodiff_fast.samplers import sample
from duodiff_fast.samplers.ddim import DDIMSampler
from duodiff_fast.samplers.ddpm import DDPMSampler
from duodiff_fast.samplers.dpm_solver import DPMSolver
from duodiff_fast.samplers.philox import PhiloxNoise
from duodiff_fast.schedules import linear_ddpm, vp_linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _den(x, t, y=None):
    return torch.tanh(0.3 * x + 0.5 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype))


def test_choose_bucket():
    assert choose_bucket(3, None) == 3
    assert choose_bucket(3, [1, 4, 16]) == 4
    assert choose_bucket(16, [16, 1, 4]) == 16
    assert choose_bucket(17, [1, 4, 16]) == 17  # beyond the largest bucket: exact size
    with pytest.raises(ValueError):
        choose_bucket(0, [4])


def test_graph_key():
    den = object()
    k = GraphKey.make("ddim", {"num_steps": 50, "eta": 0.0}, 4, (3, 8, 8), torch.float32, "cpu", False, den)
    same = GraphKey.make("ddim", {"eta": 0.0, "num_steps": 50}, 4, [3, 8, 8], torch.float32, "cpu", False, den)
    assert k == same and hash(k) == hash(same)
    assert k != GraphKey.make("ddim", {"num_steps": 50, "eta": 0.0}, 8, (3, 8, 8), torch.float32, "cpu", False, den)
    assert k != GraphKey.make("ddim", {"num_steps": 50, "eta": 0.0}, 4, (3, 8, 8), torch.float16, "cpu", False, den)
    assert k != GraphKey.make("ddim", {"num_steps": 50, "eta": 0.0}, 4, (3, 8, 8), torch.float32, "cpu", True, den)
    assert k != GraphKey.make("ddim", {"num_steps": 50, "eta": 0.0}, 4, (3, 8, 8), torch.float32, "cpu", False, object())


def test_constant_table():
    x = torch.zeros(3, 2)
    assert cached_time(0.5, x, torch.float32) is None  # no table: callers convert as before
    table = ConstantTable()
    with static_constants(table, recording=True):
        t1 = cached_time(0.5, x, torch.float32)
        assert t1 is cached_time(torch.tensor(0.5, dtype=torch.float64), x, torch.float32)
        assert t1.shape == (3,) and t1.dtype == torch.float32 and host_time(t1) == 0.5
        c = device_constant((1.0, 2.0, 3.0), "cpu")
        assert c is device_constant((1.0, 2.0, 3.0), "cpu")
        assert cached_time(torch.tensor([0.1, 0.2, 0.3]), x, torch.float32) is None  # per-row times
    assert host_time(t1) is None
    with static_constants(table, recording=False):
        assert cached_time(0.5, x, torch.float32) is t1
        with pytest.raises(GraphUnsafe):
            cached_time(0.25, x, torch.float32)
        with pytest.raises(GraphUnsafe):
            device_constant((4.0,), "cpu")


@pytest.mark.parametrize(
    "solver,kw",
    [("ddim", {"num_steps": 7, "eta": 0.0}), ("ddim", {"num_steps": 6, "eta": 1.0}), ("ddpm", {"num_steps": 5}),
     ("dpm_solver", {"num_steps": 6, "order": 1, "method": "singlestep"}), ("dpm_solver", {"num_steps": 7})],
)
def test_graph_sampler_on_cpu_is_the_plain_loop(solver, kw):
    sched = vp_linear() if solver == "dpm_solver" else linear_ddpm()
    gs = GraphSampler(_den, sched, (2, 5, 3), solver=solver, **kw)
    seeds = [3, 99, 7]
    out = gs(seeds)
    kw = dict(kw)
    ref = sample(_den, sched, (3, 2, 5, 3), solver=solver, seeds=seeds, noise="philox", fused=True,
                 progress=False, **kw)
    assert torch.equal(out, ref)
    assert not gs.graphs  # nothing captured on a CPU
    # a sample does not depend on its batch (Philox noise)
    alone = gs([99])
    torch.testing.assert_close(alone[0], out[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_fused_ddim_equals_unfused(eta):
    sched = linear_ddpm()
    x = PhiloxNoise([1, 2]).initial((2, 3, 4))
    a = DDIMSampler(sched, 8, eta=eta).sample(_den, x, None, PhiloxNoise([1, 2]))
    b = DDIMSampler(sched, 8, eta=eta, fused=True).sample(_den, x, None, PhiloxNoise([1, 2]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_ddpm_and_dpm1_equal_unfused():
    sched = linear_ddpm()
    x = PhiloxNoise([4, 5]).initial((2, 3, 4))
    a = DDPMSampler(sched, 10, variance="beta_tilde").sample(_den, x, None, PhiloxNoise([4, 5]))
    b = DDPMSampler(sched, 10, variance="beta_tilde", fused=True).sample(_den, x, None, PhiloxNoise([4, 5]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    vp = vp_linear()
    a = DPMSolver(_den, vp).sample(x, steps=5, order=1, method="singlestep")
    b = DPMSolver(_den, vp, fused=True).sample(x, steps=5, order=1, method="singlestep")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a = DPMSolver(_den, vp, predict_x0=True).sample(x, steps=6, order=2, method="multistep")
    b = DPMSolver(_den, vp, predict_x0=True, fused=True).sample(x, steps=6, order=2, method="multistep")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _duodiff(t_s=300):
    torch.manual_seed(0)
    full = create_model("tiny", depth=2).eval()
    shallow = create_model("tiny", depth=2).eval()
    return DuoDiff(shallow, full, linear_ddpm(), t_s)


def test_host_routed_duodiff_matches_duodiff():
    duo = _duodiff()
    routed = HostRoutedDenoiser(duo)
    x = torch.randn(2, 3, 16, 16)
    table = ConstantTable()
    with torch.no_grad(), static_constants(table):
        for t in (0.9, 0.5):  # shallow, full
            tv = cached_time(t, x, torch.float32)
            assert routed.route(tv) == ("shallow" if t > 0.7 else "full")
            assert torch.equal(routed(x, tv), duo(x, tv))
    assert routed.route(torch.full((2,), 0.9)) is None  # unknown time: plain DuoDiff call
    assert routed.t_s == 300  # attributes pass through


def test_graph_denoiser_on_cpu_calls_through():
    den = ModelDenoiser(create_model("tiny", depth=2).eval(), linear_ddpm())
    gd = GraphDenoiser(den)
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.equal(gd(x, t), den(x, t))
    assert not gd.graphs


def test_graph_sampler_duodiff_cpu():
    duo = _duodiff(t_s=500)
    gs = GraphSampler(duo, duo.schedule, (3, 16, 16), solver="ddim", num_steps=4)
    out = gs([1, 2])
    ref = sample(duo, duo.schedule, (2, 3, 16, 16), solver="ddim", num_steps=4, seeds=[1, 2], noise="philox",
                 fused=True, progress=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw", [{"clip_denoised": True}, {"thresholding": True, "thresholding_ratio": 0.9}])
@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpm_solver"])
def test_capture_body_applies_the_x0_correction(solver, kw):
    """The loop the GPU captures (``_body``) takes the x0 options as the plain loop does (run on the CPU)."""
    gs = GraphSampler(_den, linear_ddpm(), (3, 4, 4), solver=solver, num_steps=4, **kw)
    seeds = [3, 4]
    with torch.no_grad():
        body = gs._body(torch.tensor(seeds), None)
    plain = gs.plain(seeds)
    torch.testing.assert_close(body, plain, rtol=1e-5, atol=1e-5)
    off = GraphSampler(_den, linear_ddpm(), (3, 4, 4), solver=solver, num_steps=4).plain(seeds)
    assert not torch.allclose(plain, off)  # the option changed the samples


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("solver,kw", [("ddim", {"num_steps": 10, "eta": 0.5}), ("dpm_solver", {"num_steps": 9}),
                                       ("ddpm", {"num_steps": 10, "clip_denoised": True}),
                                       ("dpm_solver", {"num_steps": 9, "thresholding": True})])
def test_captured_equals_uncaptured_gpu(solver, kw):
    duo = _duodiff(t_s=400)
    duo.shallow.cuda(), duo.full.cuda()
    sched = duo.schedule
    gs = GraphSampler(duo, sched, (3, 16, 16), solver=solver, device="cuda", buckets=[4], **kw)
    seeds = [11, 12, 13]
    out = gs(seeds)
    assert gs.graphs and not gs.failed, gs.failed
    ref = gs.plain(seeds)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out2 = gs([14, 15])  # new seeds, same bucket: replay without recapture
    assert len(gs.graphs) == 1
    torch.testing.assert_close(out2, gs.plain([14, 15]), rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_graph_denoiser_gpu():
    duo = _duodiff(t_s=400)
    duo.shallow.cuda(), duo.full.cuda()
    gd = GraphDenoiser(duo)
    ref = sample(duo, duo.schedule, (2, 3, 16, 16), solver="ddim", num_steps=6, seeds=[1, 2], device="cuda",
                 noise="philox", fused=True, progress=False)
    with static_constants(ConstantTable()):  # host times known: DuoDiff routes on the host
        out = sample(gd, duo.schedule, (2, 3, 16, 16), solver="ddim", num_steps=6, seeds=[1, 2], device="cuda",
                     noise="philox", fused=True, progress=False)
    assert len(gd.graphs) == 2 and not gd.failed, gd.failed  # one graph per backbone
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
