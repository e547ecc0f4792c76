"""FORA block caching, Learning-to-Cache routers and ToMe on DiT (dit-tiny) against hand-written
reference loops over the official block arithmetic; DeepCache refused; composition with DuoDiff's
shallow DiT twin; router files in the published DiT layout (with an argparse.Namespace)."""
import argparse

import pytest
import torch

from duodiff_fast.methods.caching import (BlockCachePolicy, CachingDenoiser, DeepCachePolicy, RouterPolicy,
                                          load_router)
from duodiff_fast.methods.caching_dit import DiTRouterPolicy, run_dit
from duodiff_fast.methods.tome import ToMePolicy, bipartite_plan, merge, stride_destinations, unmerge
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm

TIMES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
Y = torch.tensor([3, 7])


def _perturbed(name):
    m = create_model(name).eval()
    for p in m.parameters():  # off the adaLN-Zero init so every branch and gate matters
        p.data.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _perturbed("dit-tiny")  # 4 blocks, 4x4 patch grid, learned sigma


def _inputs(model, k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(2, model.in_chans, model.img_size, model.img_size, generator=g)


def _drive(den, model, times=TIMES):
    with torch.no_grad():
        return [den.output(_inputs(model, k), torch.full((2,), t), Y) for k, t in enumerate(times)]


def _mod(x, shift, scale):  # the official adaLN modulation, written out
    return x * (1 + scale[:, None]) + shift[:, None]


def _branch_reference(model, schedule, recompute):
    """Hand-written reuse loop over the blocks: branch outputs (before the gate) are recomputed when
    recompute(step, block, kind) (always at step 0), else the last ones are reused with this step's gate."""
    cache, outs = {}, []
    with torch.no_grad():
        for k, t in enumerate(TIMES):
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            h = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(ts) + model.y_embedder(Y, False)
            for i, blk in enumerate(model.blocks):
                s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
                if k == 0 or recompute(k, i, "attn"):
                    cache[i, "attn"] = blk.attn(_mod(blk.norm1(h), s1, sc1))
                h = h + g1[:, None] * cache[i, "attn"]
                if k == 0 or recompute(k, i, "mlp"):
                    cache[i, "mlp"] = blk.mlp(_mod(blk.norm2(h), s2, sc2))
                h = h + g2[:, None] * cache[i, "mlp"]
            outs.append(model.decode(h, c))
    return outs


def _record_calls(model):
    log, handles = [], []
    for i, blk in enumerate(model.blocks):
        handles.append(blk.attn.register_forward_hook(lambda *a, i=i: log.append((i, "attn"))))
        handles.append(blk.mlp.register_forward_hook(lambda *a, i=i: log.append((i, "mlp"))))
    return log, handles


def _drive_logged(den, model):
    log, handles = _record_calls(model)
    try:
        return _drive(den, model), log
    finally:
        for h in handles:
            h.remove()


def test_run_dit_is_the_model(model):
    x, ts = _inputs(model, 0), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(run_dit(model, x, ts, Y), model(x, ts, Y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval,layers", [(2, None), (3, [0, 2]), (1, None)])
def test_fora_on_dit_against_reference_loop(model, interval, layers):
    schedule = linear_ddpm()
    got, log = _drive_logged(CachingDenoiser(model, schedule, BlockCachePolicy(interval, layers)), model)
    cached = set(range(model.num_layers)) if layers is None else set(layers)
    recompute = lambda k, i, kind: k % interval == 0 or i not in cached  # noqa: E731
    assert log == [(i, kind) for k in range(len(TIMES)) for i in range(model.num_layers)
                   for kind in ("attn", "mlp") if recompute(k, i, kind)]
    ref = _branch_reference(model, schedule, recompute)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    with torch.no_grad():  # full steps are the plain model; cache steps are not
        x0, ts0 = _inputs(model, 0), schedule.model_input(torch.full((2,), TIMES[0])).float()
        torch.testing.assert_close(got[0], model(x0, ts0, Y), rtol=1e-5, atol=1e-6)
        x1, ts1 = _inputs(model, 1), schedule.model_input(torch.full((2,), TIMES[1])).float()
        assert (interval == 1) == torch.allclose(got[1], model(x1, ts1, Y), rtol=1e-5, atol=1e-6)


def _published_router_file(tmp_path, model, steps, seed=0):
    """A router file in the published DiT layout: {"routers": {"<k>.prob": ...}, "args": Namespace}."""
    g = torch.Generator().manual_seed(seed)
    routers = {f"{k}.prob": 2 * torch.randn(2 * model.num_layers, generator=g) for k in range(steps)}
    path = tmp_path / "DDIM7_router.pt"
    torch.save({"routers": routers, "args": argparse.Namespace(model="DiT-XL/2", num_sampling_steps=steps)}, path)
    return path, torch.stack([routers[f"{k}.prob"] for k in range(steps)])


def test_per_step_router_on_dit_read_from_a_published_layout_file(model, tmp_path):
    schedule = linear_ddpm()
    path, logits = _published_router_file(tmp_path, model, len(TIMES))
    torch.testing.assert_close(load_router(str(path)), logits)
    thr = 0.4
    got, log = _drive_logged(CachingDenoiser(model, schedule, RouterPolicy(load_router(str(path)), thr)), model)
    on = torch.sigmoid(logits) > thr
    recompute = lambda k, i, kind: bool(on[k, 2 * i + (kind == "mlp")])  # noqa: E731
    expect = [(i, kind) for k in range(len(TIMES)) for i in range(model.num_layers)
              for kind in ("attn", "mlp") if k == 0 or recompute(k, i, kind)]
    assert log == expect and 0 < len(expect) < 2 * model.num_layers * len(TIMES)
    ref = _branch_reference(model, schedule, recompute)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    small = torch.zeros(3, 2 * (model.num_layers + 1))
    with pytest.raises(ValueError, match="layers"):
        _drive(CachingDenoiser(model, schedule, RouterPolicy(small, 0.5)), model, TIMES[:1])


def test_published_dit_router_schedule(model, tmp_path):
    """The published DiT schedule: even steps compute everything, odd step k reads router S-1-k."""
    schedule = linear_ddpm()
    S = len(TIMES)
    path, logits = _published_router_file(tmp_path, model, S, seed=5)
    thr = 0.3
    policy = DiTRouterPolicy(load_router(str(path)), thr, str(path))
    got, log = _drive_logged(CachingDenoiser(model, schedule, policy), model)
    on = torch.sigmoid(logits) > thr
    recompute = lambda k, i, kind: k % 2 == 0 or bool(on[S - 1 - k, 2 * i + (kind == "mlp")])  # noqa: E731
    expect = [(i, kind) for k in range(S) for i in range(model.num_layers)
              for kind in ("attn", "mlp") if recompute(k, i, kind)]
    assert log == expect and 0 < len(expect) < 2 * model.num_layers * S
    ref = _branch_reference(model, schedule, recompute)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    frac = [1.0 if k % 2 == 0 else on[S - 1 - k].double().mean().item() for k in range(1, S)]
    assert policy.details()["router_recomputed_fraction"] == pytest.approx(sum(frac) / len(frac))
    with pytest.raises(ValueError, match="trained for"):
        _drive(CachingDenoiser(model, schedule, DiTRouterPolicy(logits[:2], thr)), model, TIMES[:3])


def test_factory_on_dit(tmp_path):
    """l2c on a DiT config gets the published DiT schedule; deepcache is refused before any model is built."""
    from duodiff_fast.eval.sample_cmd import router_mismatch_warning
    from duodiff_fast.methods.factory import MethodWeights, build_method, parse_method
    from duodiff_fast.models import get_spec

    path, _ = _published_router_file(tmp_path, create_model("dit-tiny"), 4)
    spec = parse_method(f"l2c:{path}")[0]
    assert type(spec.policy("dit")) is DiTRouterPolicy and type(spec.policy()) is RouterPolicy
    weights = MethodWeights(random=True)
    schedule = get_spec("dit-tiny").make_schedule()
    built = build_method(spec, "dit-tiny", weights, schedule, "cpu")
    assert type(built.denoiser.policy) is DiTRouterPolicy and built.details["router_layout"].startswith("dit")
    built = build_method(parse_method("fora:3@250")[0], "dit-tiny", weights, schedule, "cpu")
    assert built.denoiser.shallow.depth == get_spec("dit-tiny-shallow").kwargs["depth"]
    with pytest.raises(ValueError, match="no long skips"):
        build_method(parse_method("deepcache:2")[0], "dit-tiny", weights, schedule, "cpu")
    with pytest.warns(UserWarning, match="DiT routers go with DDIM"):
        router_mismatch_warning(4, "dpm_solver++", 4, {"method": "singlestep", "order": 2}, "dit")
    assert router_mismatch_warning(4, "ddim", 4, {}, "dit") is None


class Foreign:
    """A class no router file may unpickle."""


def test_router_file_with_other_pickled_objects_is_refused(tmp_path):
    torch.save({"routers": {"0.prob": torch.zeros(8)}, "args": Foreign()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_router(str(tmp_path / "evil.pt"))


def _tome_reference(model, schedule, ratio, stride, seed):
    """Hand-written ToMe block loop on DiT: merge the modulated attention input, attend, unmerge, gate."""
    g = torch.Generator().manual_seed(seed)
    side = model.img_size // model.patch_size
    r = int(ratio * side * side)
    outs = []
    with torch.no_grad():
        for k, t in enumerate(TIMES):
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            h = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(ts) + model.y_embedder(Y, False)
            for blk in model.blocks:
                s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
                a_in = _mod(blk.norm1(h), s1, sc1)
                plan = bipartite_plan(a_in, stride_destinations(side, side, stride, g), r)
                h = h + g1[:, None] * unmerge(blk.attn(merge(a_in, plan)), plan)
                h = h + g2[:, None] * blk.mlp(_mod(blk.norm2(h), s2, sc2))
            outs.append(model.decode(h, c))
    return outs


@pytest.mark.parametrize("ratio,stride", [(0.5, 2), (0.25, 4)])
def test_tome_on_dit_against_reference_loop(model, ratio, stride):
    schedule = linear_ddpm()
    got = _drive(CachingDenoiser(model, schedule, ToMePolicy(ratio, stride, seed=3)), model)
    ref = _tome_reference(model, schedule, ratio, stride, 3)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    plain = _drive(CachingDenoiser(model, schedule, BlockCachePolicy(1)), model)
    assert not torch.allclose(got[0], plain[0], rtol=1e-4, atol=1e-5)  # merging changes the output


def test_tome_ratio_zero_is_the_model(model):
    schedule = linear_ddpm()
    got = _drive(CachingDenoiser(model, schedule, ToMePolicy(0.0, 2)), model, TIMES[:2])
    with torch.no_grad():
        for k, t in enumerate(TIMES[:2]):
            ts = schedule.model_input(torch.full((2,), t)).float()
            torch.testing.assert_close(got[k], model(_inputs(model, k), ts, Y), rtol=1e-5, atol=1e-6)


def test_deepcache_refused_on_dit(model):
    with pytest.raises(ValueError, match="no long skips"):
        CachingDenoiser(model, linear_ddpm(), DeepCachePolicy(2, 1))
    with pytest.raises(ValueError, match="no long skips"):  # the policy alone refuses too
        DeepCachePolicy(2, 1).forward(model, _inputs(model, 0), torch.tensor([1.0, 1.0]), Y, 0)


def test_duodiff_composition_on_dit(model):
    """The shallow DiT twin serves the noisiest steps uncached; FORA's steps count from the full phase."""
    torch.manual_seed(1)
    shallow = _perturbed("dit-tiny-shallow")
    schedule = linear_ddpm()
    den = CachingDenoiser(model, schedule, BlockCachePolicy(2), shallow=shallow, t_s=250)
    got = _drive(den, model)
    routes = den.routing(TIMES)
    n_shallow = routes.count("shallow")
    assert 0 < n_shallow < len(TIMES) and routes[:n_shallow] == ["shallow"] * n_shallow
    assert den.steps_run == list(range(len(TIMES) - n_shallow))
    with torch.no_grad():
        for k in range(n_shallow):
            ts = schedule.model_input(torch.full((2,), TIMES[k])).float()
            torch.testing.assert_close(got[k], shallow(_inputs(model, k), ts, Y), rtol=1e-5, atol=1e-6)
    # the full phase is FORA from its own step 0: the reference loop over the remaining times
    full_times = TIMES[n_shallow:]
    cache = {}
    with torch.no_grad():
        for j, t in enumerate(full_times):
            k = n_shallow + j
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            h = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(ts) + model.y_embedder(Y, False)
            for i, blk in enumerate(model.blocks):
                s1, sc1, g1, s2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, dim=1)
                if j % 2 == 0:
                    cache[i, "attn"] = blk.attn(_mod(blk.norm1(h), s1, sc1))
                h = h + g1[:, None] * cache[i, "attn"]
                if j % 2 == 0:
                    cache[i, "mlp"] = blk.mlp(_mod(blk.norm2(h), s2, sc2))
                h = h + g2[:, None] * cache[i, "mlp"]
            torch.testing.assert_close(got[k], model.decode(h, c), rtol=1e-5, atol=1e-6, msg=f"step {k}")


def test_fora_under_dit_guidance(model):
    """Classifier-free guidance doubles the batch in one call per step: the cache steps still count
    one per sampling step, and the guided output is DiT's formula on the cached doubled-batch output."""
    from duodiff_fast.samplers.guidance import DiTGuidance

    schedule = linear_ddpm()
    den = CachingDenoiser(model, schedule, BlockCachePolicy(2))
    guided = DiTGuidance(den, 0.5, model.null_class)
    twin = CachingDenoiser(model, schedule, BlockCachePolicy(2))
    with torch.no_grad():
        for k, t in enumerate(TIMES[:4]):
            x, tt = _inputs(model, k), torch.full((2,), t)
            got = guided.output(x, tt, Y)
            both = twin.output(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([Y, torch.full_like(Y, model.null_class)]))
            cond, uncond = both[:2, :3], both[2:, :3]
            torch.testing.assert_close(got, torch.cat([uncond + 1.5 * (cond - uncond), both[:2, 3:]], dim=1))
    assert den.steps_run == [0, 1, 2, 3]


def test_fora_on_dit_with_static_caches_starts_each_trajectory_afresh(model):
    """With the caches in static buffers (the step-graph runner's mode) the buffers outlive a
    trajectory; the second trajectory must recompute its first step, not reuse the first one's."""
    from duodiff_fast.runtime.cache_graphs import CacheStepGraphs

    schedule = linear_ddpm()
    den = CacheStepGraphs().attach(CachingDenoiser(model, schedule, BlockCachePolicy(2)))
    plain = CachingDenoiser(model, schedule, BlockCachePolicy(2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(2):
            for t in TIMES:
                x = torch.randn(2, model.in_chans, model.img_size, model.img_size, generator=g)
                ts = torch.full((2,), t)
                torch.testing.assert_close(den(x, ts, Y), plain(x, ts, Y), rtol=0, atol=0)


@pytest.mark.parametrize("schedule_name,merged", [("F2", {0, 1}), ("R1", None), ("B2", None)])
def test_tome_layer_schedule_on_dit(model, schedule_name, merged):
    """The ASE paper's F<k>/R<k>/B<k> choose the DiT blocks that merge; max_level (U-ViT's long-skip
    levels) is refused on a DiT."""
    from duodiff_fast.methods.tome import tome_layers

    L = model.num_layers
    want = {"F2": {0, 1}, "R1": {L - 1}, "B2": {0, L - 1}}[schedule_name]
    assert set(tome_layers(L, schedule=schedule_name, arch="dit")) == want
    schedule = linear_ddpm()
    attn_inputs = []
    handles = [blk.attn.register_forward_hook(lambda m, a, o, i=i: attn_inputs.append((i, a[0].shape[1])))
               for i, blk in enumerate(model.blocks)]
    try:
        _drive(CachingDenoiser(model, schedule, ToMePolicy(0.5, 2, seed=3, schedule=schedule_name)), model, TIMES[:1])
    finally:
        for h in handles:
            h.remove()
    tokens = model.num_patches
    assert {i for i, n in attn_inputs if n < tokens} == want  # only the scheduled blocks attend over fewer tokens
    with pytest.raises(ValueError, match="a DiT has none"):
        _drive(CachingDenoiser(model, schedule, ToMePolicy(0.5, 2, max_level=1)), model, TIMES[:1])


def test_dit_step_patterns_follow_the_cache(model):
    """The step pattern the graph runner keys its graphs by (``pattern``) must match what the DiT
    forward does: after a full step, FORA's next step reuses every branch."""
    schedule = linear_ddpm()
    policy = BlockCachePolicy(2)
    _drive(CachingDenoiser(model, schedule, policy), model, TIMES[:1])
    L = model.num_layers
    assert policy.pattern(model, 1) == ((False, False),) * L
    assert policy.pattern(model, 2) == ((True, True),) * L
