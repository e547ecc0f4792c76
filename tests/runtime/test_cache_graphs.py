"""Step graphs of the caching methods (runtime.cache_graphs): on a CPU, the sampler's fallback
against a hand-written caching loop, the pattern each step would replay and the reuse of the cache
buffers; capture and replay on a GPU only."""
import pytest
import torch

from duodiff_fast.methods.caching import (BlockCachePolicy, CachingDenoiser, DeepCachePolicy, RouterPolicy,
                                          nonuniform_full_steps)
from duodiff_fast.methods.tome import ToMePolicy
from duodiff_fast.models import create_model
from duodiff_fast.runtime.cache_graphs import CacheStepGraphs
from duodiff_fast.runtime.graphs import GraphDenoiser, GraphSampler
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import linear_ddpm
from tests.methods import explicit

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
STEPS = 7


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("tiny", depth=6).eval()  # 3 in-blocks, mid, 3 out-blocks
    for p in m.parameters():  # off the zero init so every branch matters
        p.data.add_(0.02 * torch.randn_like(p))
    return m


def _deepcache_reference(model, schedule, full_steps, depth=1):
    """eps(x, t, y) of DeepCache written out over the blocks, its own step counter and cache."""
    state = {"k": -1, "t": None, "inner": None}

    def eps(x, t, y=None):
        now = float(t.reshape(-1)[0])
        state["k"] = 0 if state["t"] is None or now >= state["t"] else state["k"] + 1
        state["t"] = now
        k = state["k"]
        ts = schedule.model_input(t.reshape(-1).expand(x.shape[0])).float()
        out, state["inner"] = explicit.deepcache_step(model, x.float(), ts, y, k in full_steps, depth,
                                                      state["inner"])
        return out.to(x.dtype)

    return eps


@pytest.mark.parametrize("nonuniform,solver", [(False, "ddim"), (True, "ddim"), (False, "dpm_solver++")])
def test_sampler_fallback_equals_a_hand_written_loop(model, nonuniform, solver):
    schedule = linear_ddpm()
    if nonuniform:
        policy = DeepCachePolicy(3, 1, num_steps=STEPS, center=0.5, power=1.4)
        full = set(nonuniform_full_steps(STEPS, 3, 0.5, 1.4))
    else:
        policy, full = DeepCachePolicy(3, 1), {k for k in range(STEPS) if k % 3 == 0}
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(model, schedule, policy))
    shape = (model.in_chans, model.img_size, model.img_size)
    sampler = GraphSampler(den, schedule, shape, solver=solver, num_steps=STEPS, device="cpu")
    with torch.no_grad():
        got = sampler([3, 11])
        ref = sample(_deepcache_reference(model, schedule, full), schedule, (2, *shape), solver=solver,
                     num_steps=STEPS, seeds=[3, 11], device="cpu", progress=False, noise="philox", fused=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the pattern each step would replay (eager on a CPU)
    assert [(k, p[0], how) for k, p, how in runner.log] == [
        (k, "full" if k in full else "cache", "eager") for k in range(STEPS)]


def test_patterns_of_fora_and_l2c(model):
    schedule = linear_ddpm()
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(model, schedule, BlockCachePolicy(2, layers=[1, 4])))
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    with torch.no_grad():
        for k in range(4):
            den(x, torch.full((2,), 0.9 - 0.1 * k), None)
    L = model.num_layers
    full = tuple((True, True) for _ in range(L))
    cache = tuple((i not in (1, 4),) * 2 for i in range(L))
    assert [p for _, p, _ in runner.log] == [full, cache, full, cache]

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(STEPS, 2 * L, generator=g)
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(model, schedule, RouterPolicy(logits, 0.5)))
    with torch.no_grad():
        for k in range(3):
            den(x, torch.full((2,), 0.9 - 0.1 * k), None)
    rows = torch.sigmoid(logits.double()) > 0.5
    want = [full] + [tuple((bool(rows[k, 2 * i]), bool(rows[k, 2 * i + 1])) for i in range(L)) for k in (1, 2)]
    assert [p for _, p, _ in runner.log] == want
    short = CacheStepGraphs().attach(CachingDenoiser(model, schedule, RouterPolicy(logits[:, :4], 0.5)))
    with torch.no_grad(), pytest.raises(ValueError, match="logits for 2 layers"):
        short(x, torch.full((2,), 0.9), None)

    # ToMe has no patterns (new destinations every step): eager, pattern None
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(model, schedule, ToMePolicy(0.5)))
    with torch.no_grad():
        den(x, torch.full((2,), 0.5), None)
    assert runner.log == [(0, None, "eager")]


def test_cache_buffers_are_reused_across_trajectories(model):
    schedule = linear_ddpm()
    runner = CacheStepGraphs()
    policy = BlockCachePolicy(2)
    den = runner.attach(CachingDenoiser(model, schedule, policy))
    plain = CachingDenoiser(model, schedule, BlockCachePolicy(2))
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    ptrs = []
    with torch.no_grad():
        for _ in range(2):  # two trajectories (the time rises again: a restart)
            for k in range(3):
                t = torch.full((2,), 0.9 - 0.1 * k)
                torch.testing.assert_close(den(x + k, t, None), plain(x + k, t, None), rtol=0, atol=0)
                ptrs.append(({i: v.data_ptr() for i, v in policy.attn.items()},
                             {i: v.data_ptr() for i, v in policy.mlp.items()}))
        assert all(p == ptrs[0] for p in ptrs) and len(ptrs[0][0]) == model.num_layers
        # a new batch size: new buffers (the old ones and their graphs are dropped)
        den(torch.randn(3, *x.shape[1:]), torch.full((3,), 0.9), None)
    assert policy.attn[0].shape[0] == 3 and runner.signature[0][0] == 3

    dc = DeepCachePolicy(2)
    den = CacheStepGraphs().attach(CachingDenoiser(model, schedule, dc))
    with torch.no_grad():
        seen = set()
        for _ in range(2):
            for k in range(3):
                den(x, torch.full((2,), 0.9 - 0.1 * k), None)
                seen.add(dc.inner.data_ptr())
    assert len(seen) == 1


def test_per_call_graph_denoiser_leaves_caching_steps_alone(model):
    """GraphDenoiser must not replay a caching step from a per-call graph (the step would not advance)."""
    den = CachingDenoiser(model, linear_ddpm(), DeepCachePolicy(2))
    assert den.stateful_steps
    wrapped = GraphDenoiser(den)
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    with torch.no_grad():
        for k in range(3):
            wrapped(x, torch.full((2,), 0.9 - 0.1 * k), None)
    assert den.steps_run == [0, 1, 2] and not wrapped.graphs
    from duodiff_fast.runtime.graphs import has_stateful_steps
    from duodiff_fast.samplers.guidance import ClassifierFreeGuidance

    assert has_stateful_steps(ClassifierFreeGuidance(den, 1.5, null_class=3))
    assert not has_stateful_steps(ClassifierFreeGuidance(lambda x, t, y: x, 1.5, null_class=3))
    with pytest.raises(TypeError, match="CachingDenoiser"):
        CacheStepGraphs().attach(object())
    with pytest.raises(ValueError, match="warmup"):
        CacheStepGraphs(warmup=0)


def _cuda_model(model):
    m = create_model("tiny", depth=6).eval().cuda()
    m.load_state_dict(model.state_dict())
    return m


@needs_cuda
@pytest.mark.parametrize("make", [lambda L: DeepCachePolicy(3, 1), lambda L: BlockCachePolicy(2),
                                  lambda L: DeepCachePolicy(2, 2, num_steps=STEPS),
                                  lambda L: RouterPolicy(torch.randn(STEPS, 2 * L,
                                                                    generator=torch.Generator().manual_seed(1)), 0.5)])
def test_step_graphs_replay_equals_eager_on_cuda(model, make):
    m = _cuda_model(model)
    schedule = linear_ddpm()
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(m, schedule, make(m.num_layers)))
    eager = CachingDenoiser(m, schedule, make(m.num_layers))
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for trajectory in range(2):
            for k in range(STEPS):
                x = torch.randn(2, m.in_chans, m.img_size, m.img_size, device="cuda", generator=g)
                t = torch.full((2,), 0.9 - 0.1 * k, device="cuda")
                torch.testing.assert_close(den(x, t, None), eager(x, t, None), rtol=1e-5, atol=1e-5)
    patterns = {p for _, p, _ in runner.log}
    assert len(runner.graphs) == len(patterns) and not runner.failed
    assert all(how == "replay" for _, _, how in runner.log[STEPS:])  # the second trajectory: replays only
    assert sum(how == "capture" for _, _, how in runner.log) == len(patterns)


@needs_cuda
def test_whole_loop_capture_of_a_caching_denoiser(model):
    m = _cuda_model(model)
    schedule = linear_ddpm()
    den = CacheStepGraphs().attach(CachingDenoiser(m, schedule, DeepCachePolicy(3, 1)))
    shape = (m.in_chans, m.img_size, m.img_size)
    sampler = GraphSampler(den, schedule, shape, solver="ddim", num_steps=STEPS, device="cuda")
    with torch.no_grad():
        got = sampler([3, 11])
        again = sampler([3, 11])
        plain = sampler.plain([3, 11])
    assert sampler.graphs and not sampler.failed
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_steps_inside_the_whole_loop_runtime_run_eagerly(model, monkeypatch):
    """Inside GraphSampler's static-constants block the whole loop is one graph: no step graphs."""
    from duodiff_fast.runtime import ConstantTable, static_constants

    schedule = linear_ddpm()
    runner = CacheStepGraphs()
    den = runner.attach(CachingDenoiser(model, schedule, DeepCachePolicy(2)))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as if on a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    with torch.no_grad(), static_constants(ConstantTable(), recording=True):
        den(x, torch.full((2,), 0.9), None)
    assert runner.log == [(0, ("full",), "eager")] and not runner.graphs


def test_static_buffers_compute_what_the_plain_policies_do(model):
    """L2C and DeepCache with their caches in static buffers (the runner's mode) against the plain
    policies, over two trajectories; composed with DuoDiff the runner sees the full phase only."""
    schedule = linear_ddpm()
    L = model.num_layers
    logits = torch.randn(STEPS, 2 * L, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1)
    shallow = create_model("tiny", depth=2).eval()
    cases = [(lambda: RouterPolicy(logits, 0.5), {}), (lambda: DeepCachePolicy(2, 2), {}),
             (lambda: DeepCachePolicy(2, 1), {"shallow": shallow, "t_s": 300})]
    for make, duo in cases:
        runner = CacheStepGraphs()
        den = runner.attach(CachingDenoiser(model, schedule, make(), **duo))
        plain = CachingDenoiser(model, schedule, make(), **duo)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for _ in range(2):
                for k in range(STEPS):
                    x = torch.randn(2, model.in_chans, model.img_size, model.img_size, generator=g)
                    t = torch.full((2,), 0.9 - 0.1 * k)
                    torch.testing.assert_close(den(x, t, None), plain(x, t, None), rtol=0, atol=0)
        assert [k for k, _, _ in runner.log] == den.steps_run == plain.steps_run
    assert den.steps_run[:5] == [0, 1, 2, 3, 4]  # t = 0.9, 0.8: the shallow phase, not cached
