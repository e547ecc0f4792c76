"""runtime.edm_graphs: EDM's Heun loop on static buffers / CUDA graphs, for SongUNet and the multistage U-Net.

On a CPU the loop runs eagerly on the sampler's static buffers: it is checked against a Heun loop
written here from Karras et al.'s Algorithm 2 (not the package's), against heun_sample, across
buffer reuse, padding buckets, labels and churn. The capture tests need CUDA (gpu marker)."""
import math

import pytest
import torch

from duodiff_fast.edm import HeunConfig, build_edm_net, get_edm_config, heun_sample
from duodiff_fast.edm.backends import prepare_edm_net
from duodiff_fast.edm.flops import heun_eval_sigmas
from duodiff_fast.edm.unet import stage_from_sigma
from duodiff_fast.runtime.edm_graphs import EDMGraphSampler, heun_plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def randomize(net):
    """Random weights everywhere: EDM initialises the output convolution (near) zero, which would make
    F(x) ~ 0 and every test blind to the U-Net."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1) + (p if p.dim() == 1 else 0))
    return net


def _net(name, device="cpu", **over):
    torch.manual_seed(0)
    cfg = get_edm_config(name)
    cfg.update(over)
    return prepare_edm_net(randomize(build_edm_net(cfg)), "reference", torch.device(device))


def _independent_heun(net, latents, n, smin=0.002, smax=80.0, rho=7.0, labels=None):
    """Algorithm 2 of Karras et al. (no churn), written out on Python floats for the grid."""
    sig = [(smax ** (1 / rho) + k / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for k in range(n)] + [0.0]
    x = latents.double() * sig[0]
    for k in range(n):
        s, s1 = sig[k], sig[k + 1]
        d = (x - net(x, torch.tensor(s, dtype=torch.float64), labels).double()) / s
        x1 = x + (s1 - s) * d
        if s1 > 0:
            d1 = (x1 - net(x1, torch.tensor(s1, dtype=torch.float64), labels).double()) / s1
            x1 = x + (s1 - s) * (d + d1) / 2
        x = x1
    return x


@pytest.mark.parametrize("name", ["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"])
@pytest.mark.parametrize("mode", ["whole", "step"])
def test_cpu_fallback_matches_an_independent_heun_loop_and_heun_sample(name, mode):
    net = _net(name)
    cfg = HeunConfig(num_steps=4)
    gs = EDMGraphSampler(net, cfg, mode=mode)
    lat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = gs(lat)
        ref = _independent_heun(net, lat, 4)
        pkg = heun_sample(net, lat, cfg)
    assert out.dtype == torch.float64 and out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(out, pkg)
    assert not gs.uses_graphs() and not gs.failed


def test_buffers_are_reused_and_padding_rows_do_not_change_real_rows():
    net = _net("multistage-tiny-ddpmpp")
    cfg = HeunConfig(num_steps=3)
    gs = EDMGraphSampler(net, cfg, buckets=[4])
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        out_a = gs(a)
        buf = gs.buffers[(4, False)]
        out_b = gs(b)
        assert gs.buffers[(4, False)] is buf and len(gs.buffers) == 1  # same bucket: same static buffers
        again = gs(a)
        exact = EDMGraphSampler(net, cfg)(a)  # no padding
    assert out_a.shape == (3, 3, 8, 8) and out_b.shape == (2, 3, 8, 8)
    assert torch.equal(out_a, again)  # the returned tensor is a copy, not a view of the buffer
    torch.testing.assert_close(out_a, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_b, heun_sample(net, b, cfg), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out_a[:2], out_b)


def test_same_latents_same_images_and_labels_matter():
    net = _net("edm-tiny-ddpmpp", label_dim=4)
    cfg = HeunConfig(num_steps=3)
    gs = EDMGraphSampler(net, cfg)
    lat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([1, 3])
    with torch.no_grad():
        o1, o2 = gs(lat, y), gs(lat.clone(), y.clone())
        o3 = gs(lat, torch.tensor([0, 2]))
        ref = heun_sample(net, lat, cfg, class_labels=y)
    assert torch.equal(o1, o2) and torch.equal(o1, ref)
    assert not torch.allclose(o1, o3)


def test_churn_noise_drawn_in_heun_samples_order():
    net = _net("edm-tiny-ddpmpp")
    cfg = HeunConfig(num_steps=4, S_churn=10.0, S_min=0.05, S_max=50.0)
    lat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    def source():
        g = torch.Generator().manual_seed(11)
        return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)

    gs = EDMGraphSampler(net, cfg)
    assert 0 < len(gs.churn_steps) < 4  # the window keeps some steps, not all
    with torch.no_grad():
        out = gs(lat, randn_like=source())
        ref = heun_sample(net, lat, cfg, randn_like=source())
    assert torch.equal(out, ref)


def test_plan_holds_one_decoder_per_evaluation():
    net = _net("multistage-tiny-ddpmpp")
    cfg = HeunConfig(num_steps=18)
    _, _, evals = heun_plan(net, cfg)
    assert len(evals) == 35
    sig = heun_eval_sigmas(cfg)
    assert [e["sigma"] for e in evals] == pytest.approx(sig, rel=1e-12)
    assert [e["stage"] for e in evals] == [stage_from_sigma(s, net.model.stage_interval) for s in sig]
    assert {e["stage"] for e in evals} == {0, 1, 2}
    single = heun_plan(_net("edm-tiny-ddpmpp"), cfg)[2]
    assert {e["stage"] for e in single} == {None}


def test_bad_inputs_are_refused_before_sampling():
    net = _net("edm-tiny-ddpmpp")
    with pytest.raises(ValueError, match="mode"):
        EDMGraphSampler(net, mode="loop")
    with pytest.raises(TypeError, match="preconditioned"):
        EDMGraphSampler(net.model)
    gs = EDMGraphSampler(net, HeunConfig(num_steps=2))
    with pytest.raises(ValueError, match="latents must be"):
        gs(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="unconditional"):
        gs(torch.randn(1, 3, 8, 8), torch.tensor([0]))
    assert not gs.buffers


# ------------------------------------------------------------------------------ GPU: capture
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"])
@pytest.mark.parametrize("mode", ["whole", "step"])
def test_captured_heun_equals_eager_gpu(name, mode):
    net = _net(name, "cuda")
    cfg = HeunConfig(num_steps=6)
    gs = EDMGraphSampler(net, cfg, mode=mode, buckets=[4])
    g = torch.Generator(device="cuda").manual_seed(1)
    lat = torch.randn(3, 3, 8, 8, device="cuda", generator=g)
    with torch.no_grad():
        out = gs(lat)
        buf = gs.buffers[(4, False)]
        assert not gs.failed, gs.failed
        assert len(buf.graphs) == (1 if mode == "whole" else 6)
        # the eager loop on the same (padded) batch shape: the same convolution algorithms as the graph
        padded = lambda z: torch.cat([z, z.new_zeros(4 - z.shape[0], *z.shape[1:])])  # noqa: E731
        ref = heun_sample(net, padded(lat), cfg)[:3]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        lat2 = torch.randn(2, 3, 8, 8, device="cuda", generator=g)
        graphs = list(buf.graphs)
        out2 = gs(lat2)  # replay, no recapture
        assert buf.graphs == graphs
        torch.testing.assert_close(out2, heun_sample(net, padded(lat2), cfg)[:2], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out[:2], out2)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager-bf16", "torch.compile"])
def test_captured_multistage_on_fast_backends_gpu(backend):
    torch.manual_seed(0)
    base = randomize(build_edm_net(get_edm_config("multistage-tiny-ddpmpp")))
    net = prepare_edm_net(base, backend, torch.device("cuda"))
    cfg = HeunConfig(num_steps=5)
    gs = EDMGraphSampler(net, cfg)
    lat = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        out = gs(lat)
        assert not gs.failed, gs.failed
        ref = heun_sample(net, lat, cfg)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert math.isfinite(float(out.abs().max()))
