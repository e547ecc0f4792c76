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


def ddim_by_hand(den, betas: torch.Tensor, seeds, sample_shape, num_steps: int, y=None, device="cpu") -> torch.Tensor:
    """Deterministic DDIM (eta = 0) written out from the DDIM paper, in float64, sharing no code
    with the package's solvers: the grid is its ``range(0, N, N // steps)``, step i of the N-step
    process sits at t = (i + 1) / N, and x_T is each seed's Philox initial draw on ``device``."""
    N = betas.numel()
    alpha_bar = torch.cumprod(1.0 - betas.double(), 0)
    grid = [k * (N // num_steps) for k in range(num_steps)]
    x = PhiloxNoise(seeds, device=device).initial((len(seeds), *sample_shape)).double()
    for j in reversed(range(num_steps)):
        ab = float(alpha_bar[grid[j]])
        ab_prev = float(alpha_bar[grid[j - 1]]) if j > 0 else 1.0
        t = torch.full((len(seeds),), (grid[j] + 1) / N, dtype=torch.float32, device=x.device)
        eps = den(x.float(), t, y).double()
        x0 = (x - (1.0 - ab) ** 0.5 * eps) / ab ** 0.5
        x = ab_prev ** 0.5 * x0 + (1.0 - ab_prev) ** 0.5 * eps
    return x.float()


def test_graph_sampler_on_cpu_runs_ddim_as_written_by_hand(recwarn):
    sched = linear_ddpm()
    gs = GraphSampler(_den, sched, (2, 5, 3), solver="ddim", num_steps=7, eta=0.0)
    seeds = [3, 99, 7]
    out = gs(seeds)
    ref = ddim_by_hand(_den, sched.betas, seeds, (2, 5, 3), 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not gs.graphs and not gs.failed  # nothing captured on a CPU ...
    assert not [w for w in recwarn if "graph" in str(w.message).lower()]  # ... and no capture warning
    # a sample depends on its seed only, not on its batch or its place in it (Philox noise)
    alone = gs([99])
    torch.testing.assert_close(alone[0], out[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(gs([4])[0], alone[0])  # another seed, another sample


class _EagerGraph:
    """A stand-in for a captured CUDA graph on a CPU: ``replay`` reruns the loop on the static
    buffers and writes the static output, as a replay does."""

    def __init__(self, gs, seeds, y):
        self.gs, self.seeds, self.y = gs, seeds, y
        self.out = gs._body(seeds, y)

    def replay(self):
        self.out.copy_(self.gs._body(self.seeds, self.y))


def test_replay_reuses_static_buffers_per_bucket(monkeypatch):
    """The replay path without a GPU: one capture per bucket, the static seed and label buffers are
    refilled for each call (padding rows zeroed), and the result is a copy of the static output."""
    from duodiff_fast.runtime.graphs import _Captured

    torch.manual_seed(0)
    model = create_model("tiny", depth=2, num_classes=4).eval()
    den = ModelDenoiser(model, linear_ddpm())
    gs = GraphSampler(den, den.schedule, (3, 16, 16), solver="ddim", num_steps=3, buckets=[4])
    captured = []

    def capture(key):
        seeds = torch.zeros(key.batch, dtype=torch.int64)
        y = torch.zeros(key.batch, dtype=torch.long) if key.conditional else None
        graph = _EagerGraph(gs, seeds, y)
        captured.append(graph)
        return _Captured(graph, seeds, y, graph.out, ConstantTable())

    monkeypatch.setattr(gs, "uses_graphs", lambda: True)
    monkeypatch.setattr(gs, "capture", capture)
    with torch.no_grad():
        first = gs([5, 6, 7], torch.tensor([0, 1, 2]))
        second = gs([8, 9], torch.tensor([3, 1]))
        labels = torch.tensor([3, 1])
        ref = ddim_by_hand(den, den.schedule.betas, [8, 9], (3, 16, 16), 3, labels)
    assert len(captured) == 1 and len(gs.graphs) == 1  # B = 3 and B = 2 share bucket 4: one capture
    g = captured[0]
    assert g.seeds.tolist() == [8, 9, 0, 0] and g.y.tolist() == [3, 1, 0, 0]  # refilled, padding zeroed
    assert second.shape == (2, 3, 16, 16) and second.data_ptr() != g.out.data_ptr()  # a copy
    torch.testing.assert_close(second, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[1:], gs.plain([6, 7], torch.tensor([1, 2])), rtol=1e-5, atol=1e-5)


def test_capture_failure_warns_once_and_runs_the_plain_loop(monkeypatch):
    from duodiff_fast.samplers.constants import GraphUnsafe

    gs = GraphSampler(_den, linear_ddpm(), (2, 5, 3), solver="ddim", num_steps=4, buckets=[4])
    attempts = []

    def capture(key):
        attempts.append(key)
        raise GraphUnsafe("device constant (0.5,) was not recorded before capture")

    monkeypatch.setattr(gs, "uses_graphs", lambda: True)
    monkeypatch.setattr(gs, "capture", capture)
    with pytest.warns(RuntimeWarning, match="not recorded before capture"):
        out = gs([1, 2, 3])
    torch.testing.assert_close(out, ddim_by_hand(_den, linear_ddpm().betas, [1, 2, 3], (2, 5, 3), 4),
                               rtol=1e-5, atol=1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gs([4, 5])  # same bucket: no second attempt, no second warning
    assert len(attempts) == 1 and len(gs.failed) == 1


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
            backbone = duo.shallow if t > 0.7 else duo.full  # the route by hand: that backbone alone
            torch.testing.assert_close(routed(x, tv), ModelDenoiser(backbone, duo.schedule)(x, tv), rtol=0, atol=0)
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
    with torch.no_grad():
        out = gs([1, 2])
        ref = ddim_by_hand(duo, duo.schedule.betas, [1, 2], (3, 16, 16), 4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


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
@pytest.mark.parametrize("solver,kw", [("ddim", {"num_steps": 10, "eta": 0.5}), ("ddim", {"num_steps": 8, "eta": 0.0}),
                                       ("dpm_solver", {"num_steps": 9}),
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
    if solver == "ddim" and kw.get("eta", 0.0) == 0.0:
        with torch.no_grad():
            by_hand = ddim_by_hand(duo, sched.betas, seeds, (3, 16, 16), kw["num_steps"], device=out.device)
        torch.testing.assert_close(out, by_hand, rtol=1e-4, atol=1e-4)
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
