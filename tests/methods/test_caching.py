"""Training-free caching on U-ViT (DeepCache-style skips, FORA blocks, Learning-to-Cache routers)
against hand-written reference loops over the model's blocks, and the factory/CLI plumbing."""
import pytest
import torch

from duodiff_fast.methods.caching import (BlockCachePolicy, CachingDenoiser, DeepCachePolicy, RouterPolicy,
                                          load_router, run_uvit)
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm
from tests.methods import explicit

TIMES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("tiny", depth=6).eval()  # 3 in-blocks, mid, 3 out-blocks
    for p in m.parameters():  # off the zero init so every branch matters
        p.data.add_(0.02 * torch.randn_like(p))
    return m


def _inputs(model, k):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(2, model.in_chans, model.img_size, model.img_size, generator=g)


def _drive(den, model, times=TIMES):
    outs = []
    with torch.no_grad():
        for k, t in enumerate(times):
            outs.append(den(_inputs(model, k), torch.full((2,), t), None))
    return outs


def _layers(m):
    return [*m.in_blocks, m.mid_block, *m.out_blocks]


def test_run_uvit_is_the_model(model):
    x, ts = _inputs(model, 0), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(run_uvit(model, x, ts, None), model(x, ts, None), rtol=0, atol=0)


@pytest.mark.parametrize("interval,depth", [(2, 1), (3, 2), (1, 1), (2, 3)])
def test_deepcache_against_reference_loop(model, interval, depth):
    schedule = linear_ddpm()
    den = CachingDenoiser(model, schedule, DeepCachePolicy(interval, depth))
    got = _drive(den, model)
    n = len(model.in_blocks)
    inner = None
    with torch.no_grad():
        for k, t in enumerate(TIMES):
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            want, inner = explicit.deepcache_step(model, x, ts, None, k % interval == 0, depth, inner)
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=f"step {k}")
            if k % interval == 0:  # a full step is the plain model
                torch.testing.assert_close(got[k], model(x, ts, None), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        _drive(CachingDenoiser(model, schedule, DeepCachePolicy(2, n + 1)), model, TIMES[:1])


def _record_calls(model):
    """Forward hooks recording (layer, 'attn'|'mlp') per call; returns (log, handles)."""
    log = []
    handles = []
    for i, blk in enumerate(_layers(model)):
        handles.append(blk.attn.register_forward_hook(lambda *a, i=i: log.append((i, "attn"))))
        handles.append(blk.mlp.register_forward_hook(lambda *a, i=i: log.append((i, "mlp"))))
    return log, handles


def _branch_reference(model, schedule, recompute):
    """Hand-written reuse loop: recompute(step, layer, kind) -> bool; otherwise the last output."""
    cache, outs = {}, []
    with torch.no_grad():
        for k, t in enumerate(TIMES):
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            h = model.embed(x, ts, None)
            skips = []
            n = len(model.in_blocks)
            for i, blk in enumerate(_layers(model)):
                if i > n:
                    h = blk.skip_linear(torch.cat([h, skips.pop()], dim=-1))
                if k == 0 or recompute(k, i, "attn"):
                    cache[i, "attn"] = blk.attn(blk.norm1(h))
                h = h + cache[i, "attn"]
                if k == 0 or recompute(k, i, "mlp"):
                    cache[i, "mlp"] = blk.mlp(blk.norm2(h))
                h = h + cache[i, "mlp"]
                if i < n:
                    skips.append(h)
            outs.append(model.decode(h))
    return outs


@pytest.mark.parametrize("layers", [None, [0, 3, 6]])
def test_fora_reuse_pattern_and_values(model, layers):
    schedule = linear_ddpm()
    den = CachingDenoiser(model, schedule, BlockCachePolicy(3, layers))
    log, handles = _record_calls(model)
    try:
        got = _drive(den, model)
    finally:
        for h in handles:
            h.remove()
    n_layers = model.num_layers
    cached = set(range(n_layers)) if layers is None else set(layers)
    expect = []
    for k in range(len(TIMES)):
        for i in range(n_layers):
            if k % 3 == 0 or i not in cached:
                expect += [(i, "attn"), (i, "mlp")]
    assert log == expect
    ref = _branch_reference(model, schedule, lambda k, i, kind: k % 3 == 0 or i not in cached)
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")


def _router_file(tmp_path, model, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {f"{k}.prob": 2 * torch.randn(2 * model.num_layers, generator=g) for k in range(steps)}
    path = tmp_path / "router.pth"
    torch.save(sd, path)
    return path, torch.stack([sd[f"{k}.prob"] for k in range(steps)])


def test_l2c_router_choice(model, tmp_path):
    schedule = linear_ddpm()
    path, logits = _router_file(tmp_path, model, len(TIMES))
    torch.testing.assert_close(load_router(str(path)), logits)
    thr = 0.4
    den = CachingDenoiser(model, schedule, RouterPolicy(load_router(str(path)), thr))
    log, handles = _record_calls(model)
    try:
        got = _drive(den, model)
    finally:
        for h in handles:
            h.remove()
    on = torch.sigmoid(logits) > thr
    expect = []
    for k in range(len(TIMES)):
        for i in range(model.num_layers):
            expect += [(i, kind) for j, kind in ((2 * i, "attn"), (2 * i + 1, "mlp")) if k == 0 or bool(on[k, j])]
    assert log == expect
    assert 0 < len(expect) < 2 * model.num_layers * len(TIMES)  # the router really skips some branches
    ref = _branch_reference(model, schedule, lambda k, i, kind: bool(on[k, 2 * i + (kind == "mlp")]))
    for k, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {k}")


def test_l2c_refusals(model, tmp_path):
    torch.save({"0.prob": torch.zeros(4), "2.prob": torch.zeros(4)}, tmp_path / "gap.pth")
    with pytest.raises(ValueError, match="0..S-1"):
        load_router(str(tmp_path / "gap.pth"))
    torch.save({"0.weight": torch.zeros(4)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="<step>.prob"):
        load_router(str(tmp_path / "bad.pth"))
    path, _ = _router_file(tmp_path, model, 2)
    den = CachingDenoiser(model, linear_ddpm(), RouterPolicy(load_router(str(path)), 0.5))
    with pytest.raises(ValueError, match="trained for"):
        _drive(den, model, TIMES[:3])
    small = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="layers"):
        _drive(CachingDenoiser(model, linear_ddpm(), RouterPolicy(small, 0.5)), model, TIMES[:1])
    from duodiff_fast.eval.sample_cmd import router_mismatch_warning

    with pytest.warns(UserWarning, match="20 steps, this run makes 10"):
        router_mismatch_warning(20, "dpm_solver++", 10, {"method": "singlestep", "order": 2})
    with pytest.warns(UserWarning, match="singlestep DPM-Solver"):
        router_mismatch_warning(20, "ddim", 20, {})
    assert router_mismatch_warning(20, "dpm_solver++", 20, {"method": "singlestep", "order": 2}) is None


def test_trajectory_restart_clears_the_cache(model):
    den = CachingDenoiser(model, linear_ddpm(), DeepCachePolicy(10, 1))
    _drive(den, model, TIMES[:3])
    _drive(den, model, TIMES[:2])  # t rises again: a new trajectory starts at step 0
    assert den.steps_run == [0, 1, 2, 0, 1]


def test_duodiff_composition(model):
    # The shallow phase runs the shallow backbone uncached; the caching counts the full phase's steps.
    torch.manual_seed(1)
    shallow = create_model("tiny-shallow").eval() if _has("tiny-shallow") else create_model("tiny", depth=2).eval()
    schedule = linear_ddpm()
    den = CachingDenoiser(model, schedule, DeepCachePolicy(2, 1), shallow=shallow, t_s=300)
    got = _drive(den, model)
    assert den.steps_run == [0, 1, 2, 3, 4]  # t = 0.9, 0.8 are in the shallow phase (positions > 700)
    with torch.no_grad():
        x0 = _inputs(model, 0)
        plain = shallow(x0, schedule.model_input(torch.full((2,), 0.9)).float(), None)
    torch.testing.assert_close(got[0], plain, rtol=1e-5, atol=1e-6)


def _has(name):
    from duodiff_fast.models import get_spec

    try:
        get_spec(name)
        return True
    except ValueError:
        return False


def test_factory_specs_and_refusals(tmp_path):
    from duodiff_fast.methods.factory import MethodSpec, MethodWeights, build_method, parse_method_grid

    specs = parse_method_grid("base,deepcache,fora:3@300,tome:0.25", caching_options={"deepcache": {"depth": 1}})
    assert [s.label for s in specs] == ["base", "deepcache 3 depth=1", "fora 3 +duodiff t_s=300", "tome 0.25"]
    with pytest.raises(ValueError, match="router file"):
        parse_method_grid("l2c")
    with pytest.raises(ValueError, match="not found"):
        parse_method_grid("l2c:/nonexistent/router.pth")
    with pytest.raises(ValueError, match="ratio"):
        parse_method_grid("tome:1.5")
    with pytest.raises(ValueError, match="interval"):
        parse_method_grid("fora:0")
    with pytest.raises(ValueError, match="caching"):
        MethodSpec("ase", ase_schedule="D1", value="3")
    weights = MethodWeights(random=True)
    with pytest.raises(ValueError, match="backend 'torch.compile'"):
        build_method(specs[1], "tiny", weights, linear_ddpm(), "cpu", "torch.compile")
    built = build_method(specs[2], "tiny", weights, linear_ddpm(), "cpu")
    assert built.details == {"cache_interval": 3, "fora_layers": "all"} and built.denoiser.t_s == 300


def test_sample_cli_method_flags():
    from duodiff_fast.cli import build_parser
    from duodiff_fast.eval.sample_cmd import method_spec_from_args

    def spec(*extra):
        return method_spec_from_args(build_parser().parse_args(["sample", "--config", "tiny", *extra]))

    assert spec("--method", "fora", "--cache-interval", "4", "--t-s", "200").label == "fora 4 +duodiff t_s=200"
    assert spec("--method", "deepcache", "--deepcache-depth", "2").label == "deepcache 3 depth=2"
    assert spec("--method", "tome", "--tome-ratio", "0.3", "--tome-stride", "4").label == "tome 0.3 stride=4"
    with pytest.raises(ValueError, match="--tome-ratio applies"):
        spec("--method", "fora", "--tome-ratio", "0.3")
    with pytest.raises(ValueError, match="--t-s"):
        spec("--method", "ase", "--ase-schedule", "D1", "--t-s", "300")


def test_nonuniform_full_steps_by_hand():
    from duodiff_fast.methods.caching import nonuniform_full_steps

    # S=10, N=3: K=4, c=round(4.5)=5 (halves up), p=1.4: u = -5^(1/p) .. 4^(1/p) in 4 even steps
    # -> 5 - 5, 5 - 1.207^1.4 = 3.70, 5 + 0.742^1.4 = 5.66, 5 + 4 -> steps 0, 4, 6, 9
    assert nonuniform_full_steps(10, 3, 0.5, 1.4) == [0, 4, 6, 9]
    # c = 0: u = 0 .. 6^(1/1.4) = 3.597 -> 0, 1.199^1.4 = 1.29, 2.398^1.4 = 3.40, 6
    assert nonuniform_full_steps(7, 2, 0.0, 1.4) == [0, 1, 3, 6]
    # p = 3 at c = 2 rounds two points onto step 2 (2 - 0.311^3, 2 + 0.638^3): p is lowered until 4 remain
    assert nonuniform_full_steps(7, 2, 0.3, 3.0) == [0, 2, 3, 6]
    assert nonuniform_full_steps(7, 2, 0.3, 1.0) == [0, 2, 4, 6]  # p = 1: evenly spaced
    for S, N in [(50, 5), (50, 2), (250, 10), (3, 5), (13, 1), (1, 1)]:
        got = nonuniform_full_steps(S, N)
        K = -(-S // N)
        assert len(got) == K and got[0] == 0 and got == sorted(set(got))
        assert got[-1] == (S - 1 if K > 1 else 0)
    # crowded around the centre: the gaps grow away from c
    got = nonuniform_full_steps(100, 5, 0.5, 2.0)
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert min(gaps) < max(gaps) and gaps[0] > gaps[len(gaps) // 2]
    for bad, match in [((0, 2), "step count"), ((10, 0), "interval"), ((10, 2, 1.5), "center"),
                       ((10, 2, 0.5, 0.5), "power")]:
        with pytest.raises(ValueError, match=match):
            nonuniform_full_steps(*bad)


def test_deepcache_nonuniform_against_reference_loop(model):
    schedule = linear_ddpm()
    S, depth = len(TIMES), 1
    policy = DeepCachePolicy(3, depth, num_steps=S, center=0.0, power=1.4)
    from duodiff_fast.methods.caching import nonuniform_full_steps

    full = set(nonuniform_full_steps(S, 3, 0.0, 1.4))
    # by hand: u = 0, 1.7985, 3.597 -> 0, 1.7985^1.4 = 2.275 -> 2, 6
    assert full == {0, 2, 6}
    den = CachingDenoiser(model, schedule, policy)
    got = _drive(den, model)
    inner = None
    with torch.no_grad():
        for k, t in enumerate(TIMES):
            x, ts = _inputs(model, k), schedule.model_input(torch.full((2,), t)).float()
            want, inner = explicit.deepcache_step(model, x, ts, None, k in full, depth, inner)
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    assert policy.details()["deepcache_schedule"] == "nonuniform"
    with pytest.raises(ValueError, match="asked for step 7"):
        _drive(den, model, TIMES + [0.2])


def test_factory_nonuniform_deepcache_and_tome_layers():
    from duodiff_fast.methods.factory import parse_method_grid

    specs = parse_method_grid("deepcache:2,tome:0.5", caching_options={
        "deepcache": {"steps": 10, "center": 0.5, "power": 1.4}, "tome": {"schedule": "R2"}})
    dc, tome = specs[0].policy(), specs[1].policy()
    assert len(dc.full_steps) == 5
    from duodiff_fast.methods.caching import nonuniform_full_steps

    assert sorted(dc.full_steps) == nonuniform_full_steps(10, 2, 0.5, 1.4)
    assert tome.schedule == "R2" and tome.max_level is None
    assert parse_method_grid("tome", caching_options={"tome": {"max_level": 2}})[0].policy().max_level == 2
    with pytest.raises(ValueError, match="not both"):
        parse_method_grid("tome", caching_options={"tome": {"max_level": 2, "schedule": "F2"}})


def test_sample_cli_nonuniform_deepcache_and_tome_layers():
    from duodiff_fast.cli import build_parser
    from duodiff_fast.eval.sample_cmd import method_spec_from_args

    def spec(*extra):
        return method_spec_from_args(build_parser().parse_args(["sample", "--config", "tiny", *extra]))

    dc = spec("--method", "deepcache", "--cache-interval", "2", "--deepcache-steps", "10", "--deepcache-center",
              "0.5", "--deepcache-power", "1.4").policy()
    from duodiff_fast.methods.caching import nonuniform_full_steps

    assert sorted(dc.full_steps) == nonuniform_full_steps(10, 2, 0.5, 1.4) and dc.num_steps == 10
    assert spec("--method", "deepcache").policy().full_steps is None  # uniform by default
    assert spec("--method", "tome", "--tome-max-level", "1").policy().max_level == 1
    assert spec("--method", "tome", "--tome-schedule", "B4").policy().schedule == "B4"
    with pytest.raises(ValueError, match="power"):
        spec("--method", "deepcache", "--deepcache-steps", "10", "--deepcache-power", "0.5")
