"""The captured sampler on DiT: the improved-DDPM DDPM (learned variance) and DDIM over respaced
steps, guidance on the first 3 channels. On a CPU the sampler runs its plain loop, checked against a
loop written out here; the loop under the constant table (what capture records) routes every step on
the host and equals it; the capture itself runs on a CUDA device (gpu-marked)."""
import pytest
import torch

from duodiff_fast.methods import DuoDiff, ModelDenoiser
from duodiff_fast.models import DiT
from duodiff_fast.runtime.graphs import GraphSampler
from duodiff_fast.samplers import make_guidance, space_timesteps
from duodiff_fast.samplers.constants import ConstantTable, static_constants
from duodiff_fast.samplers.philox import philox_normal_reference
from duodiff_fast.schedules import linear_ddpm
from tests.conftest import rel_err

STEPS = 4
SCALE = 0.5  # DiT's w = 1.5


def _dit(depth: int, seed: int) -> DiT:
    torch.manual_seed(seed)
    m = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2, num_classes=5)
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero
    return m.eval()


def _by_hand(model: DiT, solver: str, seeds, y) -> torch.Tensor:
    """DiT's respaced DDPM (learned-range variance) / DDIM written out in float64 coefficients, with
    the guided first 3 channels of ``forward_with_cfg`` and the per-sample Philox noise."""
    betas = linear_ddpm().betas.double()
    abar_full = torch.cumprod(1 - betas, 0)
    kept = space_timesteps(1000, str(STEPS))
    ab = abar_full[kept]
    abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    b = 1 - ab / abp
    post_var = b * (1 - abp) / (1 - ab)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    seeds = torch.tensor(seeds)
    B, shape = len(seeds), (4, 4, 4)
    x = philox_normal_reference(seeds, 0, shape)
    for s, k in enumerate(reversed(range(STEPS))):
        ts = torch.full((2 * B,), float(kept[k]))
        with torch.no_grad():
            out = model.forward_with_cfg(torch.cat([x, x]), ts, torch.cat([y, torch.full_like(y, 5)]), 1 + SCALE)[:B]
        eps, v = out[:, :4], out[:, 4:]
        x0 = (1 / ab[k]).sqrt().float() * x - (1 / ab[k] - 1).sqrt().float() * eps
        if solver == "ddim":
            x = x0 * abp[k].sqrt().float() + (1 - abp[k]).sqrt().float() * \
                (((1 / ab[k]).sqrt().float() * x - x0) / (1 / ab[k] - 1).sqrt().float())
            continue
        c1 = (b[k] * abp[k].sqrt() / (1 - ab[k])).float()
        c2 = ((1 - abp[k]) * (1 - b[k]).sqrt() / (1 - ab[k])).float()
        mean = c1 * x0 + c2 * x
        frac = (v + 1) / 2
        log_var = frac * torch.log(b[k]).float() + (1 - frac) * log_post[k].float()
        x = mean + torch.exp(0.5 * log_var) * philox_normal_reference(seeds, s + 1, shape) if k > 0 else mean
    return x


def _guided(denoiser, model):
    return make_guidance(denoiser, SCALE, model.null_class)


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_cpu_fallback_equals_the_loop_written_out(solver):
    model = _dit(2, 0)
    gs = GraphSampler(_guided(ModelDenoiser(model, linear_ddpm()), model), linear_ddpm(), (4, 4, 4),
                      solver=solver, num_steps=STEPS, device="cpu")
    assert not gs.uses_graphs() and not gs.fused  # DiT's improved-DDPM loop has no fused update
    y = torch.tensor([1, 3])
    out = gs([3, 11], y)
    assert rel_err(out, _by_hand(model, solver, [3, 11], y)) < 1e-5
    # each sample depends only on its own seed (what padding a bucket relies on)
    one = gs([11], y[1:])
    assert rel_err(one, out[1:]) < 1e-6 and not torch.equal(out[0], out[1])


@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_the_loop_under_the_constant_table_routes_on_the_host(solver, monkeypatch):
    """What capture records: the loop on static seed/label buffers inside static_constants. DuoDiff
    (under DiT guidance) must know its route at every step without reading the device, and a second
    run that may only look constants up (as capture does) gives the same samples."""
    full, shallow = _dit(2, 0), _dit(1, 1)
    duo = DuoDiff(shallow, full, linear_ddpm(), t_s=500)
    routes = []
    real = DuoDiff.host_route
    monkeypatch.setattr(DuoDiff, "host_route", lambda self, t: routes.append(real(self, t)) or routes[-1])
    gs = GraphSampler(_guided(duo, full), linear_ddpm(), (4, 4, 4), solver=solver, num_steps=STEPS, device="cpu")
    seeds, y = torch.tensor([3, 11]), torch.tensor([1, 3])
    table = ConstantTable()
    with torch.no_grad():
        with static_constants(table, recording=True):
            recorded = gs._body(seeds, y)
        n = len(table)
        routes.clear()
        with static_constants(table, recording=False):
            replayed = gs._body(seeds, y)
    assert len(table) == n > 0
    assert routes and None not in routes and set(routes) == {"shallow", "full"}
    assert torch.equal(recorded, replayed)
    assert rel_err(replayed, gs.plain([3, 11], y)) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["ddpm", "ddim"])
def test_capture_of_the_dit_loop_equals_the_plain_loop(solver):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    dev = torch.device("cuda")
    full, shallow = _dit(2, 0).to(dev), _dit(1, 1).to(dev)
    for den in (ModelDenoiser(full, linear_ddpm()), DuoDiff(shallow, full, linear_ddpm(), t_s=500)):
        gs = GraphSampler(_guided(den, full), linear_ddpm(), (4, 4, 4), solver=solver, num_steps=STEPS,
                          device=dev, buckets=(4,))
        y = torch.tensor([1, 3, 0], device=dev)
        out = gs([3, 11, 5], y)
        assert gs.graphs and not gs.failed, gs.failed
        assert rel_err(out, gs.plain([3, 11, 5], y)) < 1e-5
        again = gs([7, 11, 5], torch.tensor([2, 3, 0], device=dev))  # replay with new seeds and labels
        assert len(gs.graphs) == 1
        assert rel_err(again[1:], out[1:]) < 1e-5 and not torch.allclose(again[0], out[0])


def _dit_tiny(dev="cpu"):
    from duodiff_fast.models import create_model

    torch.manual_seed(0)
    m = create_model("dit-tiny")
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero: every output channel depends on the input
    return m.eval().to(dev)


def _inputs(model, dev, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, model.in_channels, model.config["input_size"], model.config["input_size"], generator=g).to(dev)
    t = torch.rand(3, generator=g).to(dev) * 0.9 + 0.05
    y = torch.randint(0, 10, (3,), generator=g).to(dev)
    return x, t, y


def test_graph_denoiser_output_falls_back_to_the_plain_output_on_cpu():
    """GraphDenoiser.output on dit-tiny: the whole output (eps and the variance value, 2C channels);
    on a CPU the denoiser's own output, and DiT's improved-DDPM sampler through it equals the plain one."""
    from duodiff_fast.runtime.graphs import GraphDenoiser
    from duodiff_fast.samplers.driver import sample

    model = _dit_tiny()
    den = ModelDenoiser(model, linear_ddpm())
    gd = GraphDenoiser(den)
    x, t, y = _inputs(model, "cpu", 0)
    with torch.no_grad():
        full, ref = gd.output(x, t, y), den.output(x, t, y)
        eps = gd(x, t, y)
    assert full.shape[1] == 2 * x.shape[1] and torch.equal(full, ref)
    assert torch.equal(eps, full[:, : x.shape[1]])
    assert not gd.graphs and not gd.failed
    shape = (model.in_channels, model.config["input_size"], model.config["input_size"])
    for solver in ("ddpm", "ddim"):
        with torch.no_grad():
            a = sample(gd, linear_ddpm(), (2,) + shape, solver=solver, num_steps=3, y=y[:2], seeds=[1, 2])
            b = sample(den, linear_ddpm(), (2,) + shape, solver=solver, num_steps=3, y=y[:2], seeds=[1, 2])
        assert torch.equal(a, b)
    # a denoiser without output(): the graph denoiser has none either (the sampler's question)
    assert getattr(GraphDenoiser(lambda x, t, y=None: x), "output", None) is None


@pytest.mark.gpu
def test_graph_denoiser_captures_the_dit_output():
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    from duodiff_fast.runtime.graphs import GraphDenoiser
    from duodiff_fast.samplers.driver import sample

    dev = torch.device("cuda")
    model = _dit_tiny(dev)
    den = ModelDenoiser(model, linear_ddpm())
    gd = GraphDenoiser(den)
    with torch.no_grad():
        for seed in (0, 1):  # the second call replays the first call's graph on new inputs
            x, t, y = _inputs(model, dev, seed)
            full = gd.output(x, t, y)
            assert full.shape[1] == 2 * x.shape[1]
            assert rel_err(full, den.output(x, t, y)) < 1e-5
        assert not gd.failed, gd.failed
        assert [k[0] for k in gd.graphs] == ["output"]
        eps = gd(x, t, y)  # __call__: a graph of its own, the first C channels
        assert rel_err(eps, full[:, : x.shape[1]]) < 1e-5 and len(gd.graphs) == 2
        shape = (model.in_channels, model.config["input_size"], model.config["input_size"])
        a = sample(gd, linear_ddpm(), (3,) + shape, solver="ddpm", num_steps=4, y=y, seeds=[1, 2, 3], device=dev)
        b = sample(den, linear_ddpm(), (3,) + shape, solver="ddpm", num_steps=4, y=y, seeds=[1, 2, 3], device=dev)
    assert rel_err(a, b) < 1e-4
