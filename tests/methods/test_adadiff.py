"""AdaDiff: shrinking batch == simulated exit, real work reduction, the paper's losses, training."""
import math

import pytest
import torch

from duodiff_fast.analysis import ExitRecorder
from duodiff_fast.methods import AdaDiff, AdaDiffObjective, AdaDiffUViT
from duodiff_fast.methods.adadiff import AdaDiffOutputs, check_theta, set_synthetic_exit_profile
from duodiff_fast.models import create_model
from duodiff_fast.models.uvit import timestep_embedding
from duodiff_fast.samplers import ClassifierFreeGuidance, sample
from duodiff_fast.schedules import get_schedule
from tests.methods import explicit


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one intra-op thread


def make_model(name="tiny", seed=0, spread=2.0, bias=0.0):
    """A tiny AdaDiff model whose UEMs give widely spread u (random exit patterns)."""
    torch.manual_seed(seed)
    model = AdaDiffUViT(create_model(name)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for uem in model.uems:
            lin = uem.out_linear
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * spread / math.sqrt(lin.in_features))
            lin.bias.fill_(bias)
    return model


def inputs(model, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.in_chans, model.img_size, model.img_size, generator=g)
    ts = torch.rand(b, generator=g) * 999
    y = torch.randint(0, model.num_classes, (b,), generator=g) if model.is_conditional else None
    return x, ts, y


def assert_agree(model, x, ts, y, theta):
    eps_s, ex_s = model.exit_shrinking(x, ts, y, theta)
    eps_r, ex_r = model.exit_simulated(x, ts, y, theta)
    assert torch.equal(ex_s, ex_r)
    torch.testing.assert_close(eps_s, eps_r, rtol=1e-5, atol=1e-5)
    return ex_s


def exit_by_hand(model, x, ts, y, theta):
    """The early exit written out one sample at a time, sharing no code with the layer program:
    before layer i the UEM (mean patch token, LayerNorm, concat the time sinusoid, Linear, sigmoid);
    the sample leaves at the first u_i <= theta through head i, else through the backbone's final
    layer. Returns eps (B, C, H, W) and exit layers (B,)."""
    bb = model.backbone
    layers = [(blk, "in") for blk in bb.in_blocks] + [(bb.mid_block, "mid")] + [(blk, "out") for blk in bb.out_blocks]
    eps, exits = [], []
    for b in range(x.shape[0]):
        xb, tb, yb = x[b:b + 1], ts[b:b + 1], None if y is None else y[b:b + 1]
        h, skips = explicit.embed(bb, xb, tb, yb), []
        temb = timestep_embedding(tb, bb.embed_dim)
        for i, (blk, kind) in enumerate(layers):
            uem = model.uems[i]
            feats = torch.cat([uem.norm(h[:, bb.extras:, :].mean(dim=1)), temb], dim=-1)
            if float(torch.sigmoid(uem.mlp(feats))) <= theta:
                eps.append(explicit.final(model.heads[i], bb.extras, bb.in_chans, h))
                exits.append(i)
                break
            h = explicit.block(blk, h, skips.pop() if kind == "out" else None)
            if kind == "in":
                skips.append(h)
        else:
            eps.append(explicit.final(bb, bb.extras, bb.in_chans, h))
            exits.append(len(layers))
    return torch.cat(eps), torch.tensor(exits)


@pytest.mark.parametrize("name", ["tiny", "tiny-cond"])
def test_every_exit_mode_matches_a_per_sample_loop(name):
    model = make_model(name)
    x, ts, y = inputs(model, 6, seed=5)
    with torch.no_grad():
        u = model(x, ts, y).u.flatten().sort().values
        seen = set()
        for q in (0.2, 0.5, 0.8):  # theta halfway between two u values: no rounding-borderline rows
            k = int(q * (u.numel() - 1))
            theta = float((u[k] + u[k + 1]) / 2)
            eps_h, ex_h = exit_by_hand(model, x, ts, y, theta)
            for mode in ("exit_simulated", "exit_shrinking", "exit_bucketed"):
                eps, ex = getattr(model, mode)(x, ts, y, theta)
                assert torch.equal(ex, ex_h), (mode, ex.tolist(), ex_h.tolist())
                torch.testing.assert_close(eps, eps_h, rtol=1e-5, atol=1e-5)
            seen.update(ex_h.tolist())
    assert len(seen) >= 3  # early, middle and late exits really occur


@pytest.mark.parametrize("name", ["tiny", "tiny-cond"])
def test_shrinking_equals_simulated_random_patterns(name):
    model = make_model(name)
    seen = set()
    for seed in range(3):
        x, ts, y = inputs(model, 13, seed)
        with torch.no_grad():
            u = model(x, ts, y).u  # (N, B)
        for q in (0.1, 0.3, 0.5, 0.7):
            theta = float(torch.quantile(u.flatten(), q))
            exits = assert_agree(model, x, ts, y, theta)
            seen.update(exits.tolist())
    # the patterns really mix early, middle and no exits
    assert len(seen) >= 4 and model.num_layers in seen and min(seen) <= 1


def test_every_sample_exits_none_exits_one_sample():
    model = make_model(bias=0.0, spread=0.0)  # u = 0.5 everywhere
    x, ts, y = inputs(model, 5)
    assert assert_agree(model, x, ts, y, 0.5).tolist() == [0] * 5  # everyone at the first head
    assert assert_agree(model, x, ts, y, 0.49).tolist() == [model.num_layers] * 5  # nobody exits
    eps, _ = model.exit_shrinking(x, ts, y, 0.49)
    torch.testing.assert_close(eps, model.backbone(x, ts, y), rtol=1e-5, atol=1e-6)  # = plain U-ViT
    model = make_model(seed=3)
    for theta in (0.2, 0.5, 0.8):
        x1, ts1, _ = inputs(model, 1, seed=int(theta * 10))
        assert_agree(model, x1, ts1, None, theta)
    # all exit, but at a middle layer
    with torch.no_grad():
        for i, uem in enumerate(model.uems):
            uem.out_linear.weight.zero_()
            uem.out_linear.bias.fill_(-5.0 if i == 3 else 5.0)
    assert assert_agree(model, x, ts, y, 0.1).tolist() == [3] * 5


def test_shrinking_batch_reduces_rows_per_layer():
    model = make_model(seed=1)
    x, ts, y = inputs(model, 16, seed=2)
    with torch.no_grad():
        u = model(x, ts, y).u
    theta = float(torch.quantile(u.flatten(), 0.3))
    rows = []
    handles = [blk.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
               for blk in model.backbone.layers()]
    try:
        _, exits = model.exit_shrinking(x, ts, y, theta)
    finally:
        for h in handles:
            h.remove()
    expected = [int((exits > i).sum()) for i in range(model.num_layers)]
    expected = [n for n in expected if n > 0]  # layers after everyone left are not called
    assert rows == expected
    assert sum(rows) < 16 * model.num_layers  # genuinely less work than the simulated path
    assert sum(rows) == int(exits.sum())  # work = sum of exit layers


@pytest.mark.parametrize("solver,steps", [("ddpm", 6), ("ddim", 5), ("dpm_solver", 6)])
def test_denoiser_with_every_solver_and_recorder(solver, steps):
    model = make_model(seed=2)
    schedule = get_schedule("linear")
    shape = (3, 3, 16, 16)
    outs, recs = [], []
    for mode in ("shrinking", "simulated"):
        rec = ExitRecorder(model.num_layers)
        den = AdaDiff(model, schedule, theta=0.45, mode=mode, recorder=rec)
        with torch.inference_mode():
            outs.append(sample(den, schedule, shape, solver=solver, num_steps=steps, base_seed=0, progress=False))
        recs.append(rec)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    t0, e0 = recs[0].tensors()
    t1, e1 = recs[1].tensors()
    assert len(recs[0]) > 0 and torch.equal(e0, e1) and torch.equal(t0, t1)


def test_cfg_rows_exit_independently():
    model = make_model("tiny-cond", seed=4)
    schedule = get_schedule("linear")
    x, _, y = inputs(model, 4, seed=5)
    t = torch.full((4,), 0.5)
    y = y.clamp(max=model.null_class - 1)
    den = AdaDiff(model, schedule, theta=0.5)
    guided = ClassifierFreeGuidance(den, 1.5, model.null_class)
    out = guided(x, t, y)
    exits = den.last_exits
    assert exits.shape == (8,)  # cond and uncond rows each have their own exit
    ts = schedule.model_input(t).float()
    cond, ec = model.exit_simulated(x, ts, y, 0.5)
    unc, eu = model.exit_simulated(x, ts, torch.full_like(y, model.null_class), 0.5)
    assert torch.equal(exits, torch.cat([ec, eu]))
    torch.testing.assert_close(out, cond + 1.5 * (cond - unc), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("theta", [-0.01, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_theta_rejected(theta):
    model = make_model()
    with pytest.raises(ValueError, match="theta"):
        AdaDiff(model, get_schedule("linear"), theta=theta)
    x, ts, y = inputs(model, 2)
    with pytest.raises(ValueError, match="theta"):
        model.exit_shrinking(x, ts, y, theta)
    with pytest.raises(ValueError, match="mode"):
        AdaDiff(model, get_schedule("linear"), theta=0.1, mode="fast")
    assert check_theta(0) == 0.0 and check_theta(1) == 1.0


def test_structure_and_documented_numbering():
    model = AdaDiffUViT(create_model("tiny"))
    n = model.backbone.num_layers
    assert model.num_layers == n == 5 and model.num_exits == n + 1
    assert len(model.heads) == len(model.uems) == n
    x, ts, y = inputs(model, 2)
    out = model(x, ts, y)
    assert out.final.shape == (2, 3, 16, 16) and out.heads.shape == (n, 2, 3, 16, 16) and out.u.shape == (n, 2)
    assert bool(((out.u >= 0) & (out.u <= 1)).all())
    torch.testing.assert_close(out.final, model.backbone(x, ts, y))


def test_heads_start_as_copies_of_the_final_layer():
    torch.manual_seed(0)
    backbone = create_model("tiny")
    with torch.no_grad():  # a final layer far from its default init, so a copy is recognisable
        for p in (*backbone.norm.parameters(), *backbone.decoder_pred.parameters(),
                  *backbone.final_layer.parameters()):
            p.normal_()
    model = AdaDiffUViT(backbone).eval()
    final = {k: v for k, v in backbone.state_dict().items()
             if k.split(".")[0] in ("norm", "decoder_pred", "final_layer")}
    for head in model.heads:
        assert head.state_dict().keys() == final.keys()
        for k, v in head.state_dict().items():
            assert torch.equal(v, final[k]), k
            assert v.data_ptr() != final[k].data_ptr()  # a copy, not shared parameters
    x, ts, y = inputs(model, 2)
    with torch.no_grad():
        out = model(x, ts, y)
        tokens = backbone.embed(x, ts, y)
        # head 0 sees the embedded tokens: it must equal the backbone's own final layer on them
        torch.testing.assert_close(out.heads[0], backbone.decode(tokens))
    fresh = AdaDiffUViT(backbone, init_heads_from_final=False)
    assert not torch.equal(fresh.heads[0].decoder_pred.weight, backbone.decoder_pred.weight)


class _StubModel(torch.nn.Module):
    """Fixed outputs: every head predicts zero, u = c, final predicts zero."""

    def __init__(self, n, c):
        super().__init__()
        self.n, self.c = n, c
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, y=None):
        b = x.shape[0]
        zeros = torch.zeros_like(x) + 0 * self.p
        return AdaDiffOutputs(zeros, zeros.unsqueeze(0).expand(self.n, *x.shape),
                              torch.full((self.n, b), self.c) + 0 * self.p)


def test_losses_closed_form():
    schedule = get_schedule("linear")
    n, c = 3, 0.25
    obj = AdaDiffObjective(schedule, lam=0.5, beta=2.0)
    x0 = torch.randn(4, 3, 2, 2)
    loss, metrics = obj(_StubModel(n, c), x0, None, torch.Generator().manual_seed(7))
    # the same noise again from the same seed
    _, noise, _ = obj.base.sample(x0, torch.Generator().manual_seed(7))
    u_hat = torch.tanh(noise.abs()).flatten(1).mean(1)  # (B,): the default per-element tanh
    mse = noise.pow(2).flatten(1).mean(1)
    l_simple = noise.pow(2).mean()
    l_u = n * (c - u_hat).pow(2).mean()
    l_ual = n * ((1 - c) * mse).mean()
    torch.testing.assert_close(metrics["l_simple"], l_simple)
    torch.testing.assert_close(metrics["l_u"], l_u)
    torch.testing.assert_close(metrics["l_ual"], l_ual)
    torch.testing.assert_close(loss, l_simple + 0.5 * l_u + 2.0 * l_ual)


def test_loss_terms_on_a_hand_made_case():
    # one pixel, two heads, batch 1: eps = 1; head errors -1 and 0.5; u = (0.2, 0.9); final = 0.7
    noise = torch.ones(1, 1, 1, 1)
    out = AdaDiffOutputs(torch.full((1, 1, 1, 1), 0.7), torch.tensor([0.0, 1.5]).reshape(2, 1, 1, 1, 1),
                         torch.tensor([[0.2], [0.9]]))
    t = AdaDiffObjective.losses(out, noise)
    assert t["l_simple"].item() == pytest.approx(0.09)
    assert t["l_u"].item() == pytest.approx((0.2 - math.tanh(1.0)) ** 2 + (0.9 - math.tanh(0.5)) ** 2)
    assert t["l_ual"].item() == pytest.approx(0.8 * 1.0 + 0.1 * 0.25)


def test_training_with_frozen_backbone(tmp_path):
    from duodiff_fast.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = AdaDiffUViT(create_model("tiny"), freeze_backbone=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    cfg = TrainConfig(model="tiny", schedule="linear", data={"source": "synthetic", "num_samples": 8, "seed": 0},
                      batch_size=4, steps=2, lr=1e-3, warmup_steps=1, out_dir=str(tmp_path / "run"),
                      save_every=0, log_every=1, device="cpu", progress=False, resume=None)
    objective = AdaDiffObjective(get_schedule("linear"))
    trainer = Trainer(cfg, model=model, loss_fn=objective)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert len(trainer.params) == sum(1 for _ in model.heads.parameters()) + sum(1 for _ in model.uems.parameters())
    trainer.fit()
    rec = trainer.history[-1]
    assert {"l_simple", "l_u", "l_ual", "loss"} <= set(rec)
    assert all(math.isfinite(rec[k]) for k in ("l_simple", "l_u", "l_ual", "loss"))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, heads_before[k]) for k, v in model.heads.state_dict().items())
    path = trainer.save()
    assert path is not None
    trainer.close()


def test_unfrozen_training_step_updates_backbone(tmp_path):
    from duodiff_fast.training import TrainConfig, Trainer

    torch.manual_seed(0)
    model = AdaDiffUViT(create_model("tiny"))
    before = model.backbone.mid_block.mlp.fc1.weight.clone()
    cfg = TrainConfig(model="tiny", schedule="linear", data={"source": "synthetic", "num_samples": 8, "seed": 0},
                      batch_size=4, steps=1, lr=1e-3, warmup_steps=1, out_dir=str(tmp_path / "run"),
                      save_every=0, log_every=1, device="cpu", progress=False, resume=None)
    trainer = Trainer(cfg, model=model, loss_fn=AdaDiffObjective(get_schedule("linear")))
    trainer.fit()
    assert not torch.equal(model.backbone.mid_block.mlp.fc1.weight, before)
    trainer.close()


def test_synthetic_profile_is_time_dependent():
    schedule = get_schedule("linear")
    model = set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")).eval(), schedule, t_switch=0.6,
                                       exit_layer=2, theta=0.07)
    x = torch.randn(6, 3, 16, 16)
    early = model.exit_shrinking(x, schedule.model_input(torch.full((6,), 0.95)).float(), None, 0.07)[1]
    late = model.exit_shrinking(x, schedule.model_input(torch.full((6,), 0.2)).float(), None, 0.07)[1]
    assert early.tolist() == [2] * 6 and late.tolist() == [model.num_layers] * 6


def test_latency_benchmark_rows(tmp_path):
    from duodiff_fast.bench.latency import main

    out = tmp_path / "lat.json"
    result = main(["--configs", "tiny", "--solvers", "ddim", "--ddim-steps", "2", "--backends", "reference",
                   "--t-s", "0", "--repeats", "1", "--warmup", "1", "--device", "cpu",
                   "--adadiff-thetas", "0.05,0.09", "--methods", "", "--no-progress", "--out", str(out)])
    assert out.is_file()
    ada = [r for r in result["rows"] if r.get("theta") is not None]
    # measured rows (timed interleaved with the base), then the paper's estimates (not measured)
    assert [r["exit_mode"] for r in ada] == ["shrinking", "simulated", "bucketed"] * 2 + ["paper-estimate"] * 2
    base = next(r for r in result["rows"] if r["t_s"] == 0)["per_sample"]["median_s"]
    for r in ada:
        assert 0 <= r["mean_exit_layer"] <= r["num_layers"] == 5
        if r["exit_mode"] == "paper-estimate":
            assert r["status"] == "estimate" and r["per_sample"] is None
            assert r["estimate_per_sample_s"] == pytest.approx(base * r["mean_exit_layer"] / 5)
        else:
            assert "PROGRAMMED" in r["uem_profile"] and r["status"] == "ok"
            assert r["per_sample"]["median_s"] > 0 and r["speedup"]["over"] == "base"
        if r["exit_mode"] == "bucketed":
            pad = r["bucket_padding"]
            assert pad["calls"] > 0 and pad["real_rows"] > 0 and 0.0 <= pad["waste"] < 1.0
            assert r["speedup_efficiency"] == pytest.approx(r["realised_speedup"] / r["allowed_speedup"])
        else:
            assert "bucket_padding" not in r
        if r["exit_mode"] in ("shrinking", "bucketed"):  # the true exit against the simulated one
            sim = next(s for s in ada if s["exit_mode"] == "simulated" and s["theta"] == r["theta"])
            assert r["speedup_over_simulated"] == pytest.approx(
                sim["per_sample"]["median_s"] / r["per_sample"]["median_s"])


def test_synthetic_exit_profile_schedule_defaults_to_linear_and_checks_arguments():
    from duodiff_fast.methods import AdaDiffUViT
    from duodiff_fast.models import create_model
    from duodiff_fast.schedules import get_schedule

    torch.manual_seed(0)
    a = set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")))
    torch.manual_seed(0)
    b = set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")), get_schedule("linear"))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(TypeError, match="schedule"):
        set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")), "linear")
    with pytest.raises(ValueError, match="exit_layer"):
        set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")), exit_layer=99)
    with pytest.raises(ValueError, match="t_switch"):
        set_synthetic_exit_profile(AdaDiffUViT(create_model("tiny")), t_switch=1.5)
