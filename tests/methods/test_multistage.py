"""Multistage U-ViT: construction checks, routing, training per stage, save/load."""
import pytest
import torch

from duodiff_fast.io_utils import atomic_torch_save
from duodiff_fast.methods.multistage import (
    CIFAR10_BOUNDARIES, MultistageDenoiser, MultistageUViT, load_multistage, save_multistage, stage_of,
)
from duodiff_fast.methods.multistage_training import MultistageObjective
from duodiff_fast.models import create_model, get_config
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import linear_ddpm, vp_linear
from duodiff_fast.training import SyntheticDataset, TrainConfig, train


def _ms(widths=(96, 64, 8), seed=0, name="tiny", **kw):
    torch.manual_seed(seed)
    return MultistageUViT(CIFAR10_BOUNDARIES, stage_widths=list(widths), **get_config(name), **kw).eval()


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, generator=g) * 999


@pytest.mark.parametrize("bounds,msg", [
    ((0.631, 0.442), "increasing"), ((0.4, 0.4), "increasing"), ((0.0, 0.5), r"inside \(0, 1\)"),
    ((0.5, 1.0), r"inside \(0, 1\)"), ((-0.1,), r"inside \(0, 1\)"), ((float("nan"),), r"inside"),
])
def test_bad_boundaries_rejected(bounds, msg):
    with pytest.raises(ValueError, match=msg):
        MultistageUViT(bounds, **get_config("tiny"))
    with pytest.raises(ValueError, match=msg):
        MultistageObjective(linear_ddpm(), bounds)


def test_stage_without_decoder_rejected():
    with pytest.raises(ValueError, match="every stage needs its own decoder"):
        MultistageUViT((0.442, 0.631), stage_widths=[64, 64], **get_config("tiny"))
    with pytest.raises(ValueError, match="divisible"):
        MultistageUViT((0.5,), stage_widths=[64, 30], stage_num_heads=[4, 4], **get_config("tiny"))
    m = _ms()
    with pytest.raises(ValueError, match="needs stage="):
        m(*_inputs())
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        m(*_inputs(), stage=3)
    with pytest.raises(ValueError, match="holds no time"):
        MultistageObjective(linear_ddpm(), (0.5001, 0.5009))  # no grid time in [0.5001, 0.5009)


def test_stage_routing_on_the_time_axis():
    # (t_i, t_{i+1}]: a boundary belongs to the earlier stage, as in the authors' code.
    t = torch.tensor([0.0, 0.441, 0.442, 0.5, 0.6308, 0.631, 0.9, 1.0], dtype=torch.float64)
    assert stage_of(t, CIFAR10_BOUNDARIES).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert stage_of(t.float(), CIFAR10_BOUNDARIES).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_structure_shared_encoder_and_per_stage_decoders():
    """The "projected" layout (the authors' layout is checked in test_multistage_authors.py)."""
    m = _ms(layout="projected")
    keys = m.state_dict().keys()
    assert any(k.startswith("shared.in_blocks.0.") for k in keys) and "shared.mid_block.norm1.weight" in keys
    assert not any(k.startswith("shared.out_blocks") or k.startswith("shared.norm.") for k in keys)
    for i, w in enumerate((96, 64, 8)):
        st = m.stages[i]
        assert st.norm.weight.shape == (w,) and st.decoder_pred.in_features == w
        assert len(st.out_blocks) == 2
        assert st.out_blocks[0].skip_linear.in_features == w + (64 if w != 64 else 64)
        assert isinstance(st.proj_in, torch.nn.Identity) == (w == 64)


def test_from_uvit_every_stage_equals_the_plain_model():
    torch.manual_seed(0)
    base = create_model("tiny").eval()
    ms = MultistageUViT.from_uvit(base).eval()
    x, ts = _inputs()
    with torch.no_grad():
        ref = base(x, ts)
        for i in range(3):
            assert torch.equal(ms(x, ts, stage=i), ref)


def test_mixed_stage_batch_matches_per_row_runs():
    m = _ms()
    x, ts = _inputs(b=4)
    stage = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        out = m(x, ts, stage=stage)
        for i in range(4):
            torch.testing.assert_close(out[i:i + 1], m(x[i:i + 1], ts[i:i + 1], stage=int(stage[i])),
                                       rtol=1e-5, atol=1e-6)
        assert not torch.allclose(m(x, ts, stage=0), m(x, ts, stage=1))


def test_denoiser_routes_each_step_to_its_stage():
    m = _ms()
    sched = linear_ddpm()
    den = MultistageDenoiser(m, sched)
    calls = []
    orig = m.decode_stage
    m.decode_stage = lambda i, h, skips, *rest: (calls.append((i, h.shape[0])), orig(i, h, skips, *rest))[1]
    seen = []

    def spy(x, t, y=None):
        seen.append(float(t.reshape(-1)[0]))
        return den(x, t, y)

    spy.check = den.check
    sample(spy, sched, (3, 3, 16, 16), solver="ddim", num_steps=10, progress=False)
    expected = den.routing(seen)
    assert [c[0] for c in calls] == expected and all(c[1] == 3 for c in calls)
    assert set(expected) == {0, 1, 2}


def _explicit_stage(m, x, ts, y, i):
    """An independent forward of stage i, written out module by module."""
    from tests.methods import explicit

    s, st = m.shared, m.stages[i]
    h = explicit.embed(s, x, ts, y)
    skips = []
    for blk in s.in_blocks:
        h = explicit.block(blk, h)
        skips.append(h)
    h = st.proj_in(explicit.block(s.mid_block, h))
    for blk in st.out_blocks:
        h = explicit.block(blk, h, skips.pop())
    return explicit.final(st, s.extras, s.in_chans, h)


class _ExplicitMultistage:
    """Reference denoiser: each row through its own stage, by :func:`_explicit_stage`."""

    def __init__(self, m, sched):
        self.m, self.sched = m, sched

    def __call__(self, x, t, y=None):
        t = t.reshape(-1).expand(x.shape[0])
        ts = self.sched.model_input(t).float()
        stage = self.m.stage_of(t)
        return torch.cat([_explicit_stage(self.m, x[i:i + 1], ts[i:i + 1], None if y is None else y[i:i + 1],
                                          int(stage[i])) for i in range(x.shape[0])])


@pytest.mark.parametrize("solver,steps", [("ddpm", 8), ("ddim", 8), ("dpm_solver", 6)])
def test_samples_with_every_solver(solver, steps):
    sched = vp_linear()
    m = _ms()
    with torch.no_grad():
        out = sample(MultistageDenoiser(m, sched), sched, (2, 3, 16, 16), solver=solver, num_steps=steps,
                     progress=False, base_seed=3)
        ref = sample(_ExplicitMultistage(m, sched), sched, (2, 3, 16, 16), solver=solver, num_steps=steps,
                     progress=False, base_seed=3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_conditional_multistage():
    torch.manual_seed(0)
    m = MultistageUViT((0.5,), stage_widths=[64, 32], **get_config("tiny-cond")).eval()
    den = MultistageDenoiser(m, linear_ddpm())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.8], dtype=torch.float64), torch.tensor([1, 10])
    with torch.no_grad():
        out = den(x, t, y)
        torch.testing.assert_close(out, _ExplicitMultistage(m, linear_ddpm())(x, t, y), rtol=1e-5, atol=1e-6)


def test_classifier_free_guidance_uses_the_null_class():
    from duodiff_fast.samplers import ClassifierFreeGuidance

    torch.manual_seed(0)
    m = MultistageUViT((0.5,), stage_widths=[64, 32], **get_config("tiny-cond")).eval()
    assert m.null_class == get_config("tiny-cond")["num_classes"] - 1
    den = MultistageDenoiser(m, linear_ddpm())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.8], dtype=torch.float64), torch.tensor([1, 4])
    with torch.no_grad():
        out = ClassifierFreeGuidance(den, 1.5, m.null_class)(x, t, y)
        cond, uncond = den(x, t, y), den(x, t, torch.full_like(y, m.null_class))
    torch.testing.assert_close(out, cond + 1.5 * (cond - uncond), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- training
@pytest.mark.parametrize("sched", [linear_ddpm(), vp_linear()])
def test_objective_draws_one_stage_per_batch_inside_its_interval(sched):
    obj = MultistageObjective(sched, CIFAR10_BOUNDARIES)
    g = torch.Generator().manual_seed(0)
    seen = set()
    edges = (0.0,) + CIFAR10_BOUNDARIES + (1.0,)
    for step in range(60):
        obj.on_step(step)
        i, t = obj.sample_stage_t(16, "cpu", g)
        seen.add(i)
        assert stage_of(t, CIFAR10_BOUNDARIES).tolist() == [i] * 16
        assert float(t.min()) >= max(edges[i], sched.t_min) - 1e-7 and float(t.max()) <= edges[i + 1] + 1e-7
    assert seen == {0, 1, 2}
    a = obj.sample_stage_t(8, "cpu", torch.Generator().manual_seed(5))
    b = obj.sample_stage_t(8, "cpu", torch.Generator().manual_seed(5))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_update_touches_shared_part_and_one_decoder_only():
    m = _ms().train()
    obj = MultistageObjective(linear_ddpm(), CIFAR10_BOUNDARIES)
    loss, metrics = obj(m, torch.randn(4, 3, 16, 16), None, torch.Generator().manual_seed(1))
    loss.backward()
    i = int(metrics["stage"])
    assert m.shared.in_blocks[0].attn.qkv.weight.grad is not None
    assert m.shared.mid_block.mlp.fc1.weight.grad is not None
    for j, st in enumerate(m.stages):
        has = st.decoder_pred.weight.grad is not None
        assert has == (j == i)


def test_training_loss_falls_and_checkpoint_holds_the_whole_model(tmp_path):
    torch.manual_seed(0)
    m = _ms(widths=(64, 48, 16))
    cfg = TrainConfig(model="tiny", batch_size=8, steps=24, lr=3e-3, warmup_steps=0, log_every=4,
                      save_every=0, out_dir=str(tmp_path / "run"), progress=False, device="cpu", seed=0)
    trainer = train(cfg, model=m, loss_fn=MultistageObjective(linear_ddpm(), CIFAR10_BOUNDARIES),
                    dataset=SyntheticDataset(32, 16, 3, seed=0))
    losses = [r["loss"] for r in trainer.history]
    assert losses[-1] < 0.85 * losses[0], losses
    ckpt = torch.load(trainer.checkpoints.latest(), weights_only=True)
    assert set(ckpt["model_state_dict"]) == set(m.state_dict())


def test_save_load_round_trip(tmp_path):
    m = _ms()
    path = tmp_path / "ms.pt"
    save_multistage(m, str(path))
    m2 = load_multistage(str(path)).eval()
    x, ts = _inputs()
    with torch.no_grad():
        for i in range(3):
            assert torch.equal(m2(x, ts, stage=i), m(x, ts, stage=i))
    # A plain state dict through the atomic helper loads with weights_only too.
    atomic_torch_save(m.state_dict(), tmp_path / "sd.pt")
    m3 = _ms(seed=7)
    m3.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(m3(x, ts, stage=2), m(x, ts, stage=2))
    with pytest.raises(ValueError, match="not a multistage checkpoint"):
        atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "bad.pt")
        load_multistage(str(tmp_path / "bad.pt"))
