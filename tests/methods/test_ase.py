"""ASE: dropping schedules, the truncated forward, the denoiser, fine-tuning."""
import pytest
import torch

from duodiff_fast.methods.ase import (
    PAPER_SCHEDULES, PAPER_SPEEDUP_PCT, ASEDenoiser, ASEUViT, DroppingSchedule, ase_forward,
    get_dropping_schedule,
)
from duodiff_fast.methods.ase_training import ASEObjective, ase_finetune_config, finetune_ase
from duodiff_fast.models import create_model, load_weights
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import linear_ddpm, vp_linear
from duodiff_fast.training import SyntheticDataset, TrainConfig


def _model(depth=4, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("tiny", depth=depth, **kw).eval()


def _inputs(b=3, seed=1, c=3, s=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g), torch.rand(b, generator=g) * 999


# ------------------------------------------------------------------------------ schedules
def test_paper_table_2_u_vit_schedules():
    assert PAPER_SCHEDULES["D1"] == (6, 5, 4, 3, 2)
    assert PAPER_SCHEDULES["D6"] == (5, 3, 2, 1, 1)
    assert set(PAPER_SPEEDUP_PCT) == set(PAPER_SCHEDULES)
    d3 = get_dropping_schedule("D3-U-ViT")
    # fifth 0 is t in [0, 0.2) (data side, most blocks); an edge goes to the noisier fifth.
    t = torch.tensor([0.0, 0.1, 0.2, 0.39, 0.4, 0.6, 0.8, 0.95, 1.0], dtype=torch.float64)
    assert d3.kept_blocks(t).tolist() == [6, 6, 4, 4, 3, 2, 1, 1, 1]
    assert d3.mean_kept() == pytest.approx((6 + 4 + 3 + 2 + 1) / 5)


def test_custom_schedule_and_rescale():
    s = DroppingSchedule([2, 1, 0], boundaries=[0.3, 0.9])
    assert s.kept_blocks(torch.tensor([0.29, 0.3, 0.89, 0.9, 1.0])).tolist() == [2, 1, 1, 0, 0]
    assert get_dropping_schedule([3, 1]).kept == (3, 1)
    assert get_dropping_schedule("D1").rescaled(2).kept == (2, 2, 1, 1, 1)


@pytest.mark.parametrize("kept,bounds,msg", [
    ([], None, "at least one"), ([2, -1], None, ">= 0"), ([2, 1.5], None, "ints"),
    ([2, 1, 0], [0.5, 0.4], "increasing"), ([2, 1], [1.2], "increasing"), ([2, 1], [0.2, 0.4], "boundaries"),
])
def test_bad_schedules_rejected(kept, bounds, msg):
    with pytest.raises(ValueError, match=msg):
        DroppingSchedule(kept, bounds)


def test_schedule_asking_for_too_many_blocks_rejected():
    with pytest.raises(ValueError, match="keeps up to 6 out-blocks but the model has only 2"):
        ASEDenoiser(_model(), linear_ddpm(), "D1")
    with pytest.raises(ValueError, match="unknown dropping schedule"):
        get_dropping_schedule("D9")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        ase_forward(_model(), *_inputs(), None, keep=3)


# ----------------------------------------------------------------------- truncated forward
def test_keep_all_is_the_plain_forward_bit_for_bit():
    m = _model()
    x, ts = _inputs()
    with torch.no_grad():
        ref = m(x, ts)
        assert torch.equal(ase_forward(m, x, ts, None, keep=2), ref)
        assert torch.equal(ase_forward(m, x, ts, None, keep=torch.full((3,), 2)), ref)
        assert torch.equal(ASEUViT.from_uvit(m).eval()(x, ts), ref)


def _hand_reference(m, x, ts, keep):
    """Hand-built U-ViT with out-blocks >= keep reduced to skip_linear(cat[x, skip])."""
    h = m.embed(x, ts, None)
    h0 = m.in_blocks[0](h)
    h1 = m.in_blocks[1](h0)
    h = m.mid_block(h1)
    for j, (blk, skip) in enumerate(zip(m.out_blocks, [h1, h0])):
        h = blk.skip_linear(torch.cat([h, skip], dim=-1))
        if j < keep:
            h = h + blk.attn(blk.norm1(h))
            h = h + blk.mlp(blk.norm2(h))
    return m.decode(h)


@pytest.mark.parametrize("keep", [0, 1])
def test_dropped_block_still_applies_skip_linear(keep):
    m = _model()
    x, ts = _inputs()
    with torch.no_grad():
        out = ase_forward(m, x, ts, None, keep=keep)
        torch.testing.assert_close(out, _hand_reference(m, x, ts, keep), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(out, m(x, ts), atol=1e-4)  # dropping changes the output
        # Without the skip merge the result would differ: the skip is really used.
        m2 = _model()
        m2.load_state_dict(m.state_dict())
        m2.out_blocks[1].skip_linear.weight.data[:, 64:] = 0
        assert not torch.allclose(ase_forward(m2, x, ts, None, keep=keep), out, atol=1e-5)


def test_per_row_keep_matches_rowwise_runs():
    m = _model()
    x, ts = _inputs(b=4)
    keep = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        out = ase_forward(m, x, ts, None, keep=keep)
        for i in range(4):
            torch.testing.assert_close(out[i:i + 1], ase_forward(m, x[i:i + 1], ts[i:i + 1], None, int(keep[i])),
                                       rtol=1e-5, atol=1e-6)


def test_dropped_blocks_get_no_gradient_but_skip_linear_does():
    m = ASEUViT.from_uvit(_model()).train()
    x, ts = _inputs()
    m(x, ts, keep=torch.zeros(3, dtype=torch.long)).pow(2).mean().backward()
    for blk in m.out_blocks:
        assert blk.attn.qkv.weight.grad is None and blk.mlp.fc1.weight.grad is None
        assert blk.skip_linear.weight.grad is not None
    assert m.in_blocks[0].attn.qkv.weight.grad is not None


# ------------------------------------------------------------------------- denoiser + work
def _count_work(m):
    """Patch every out-block: count rows through attention+MLP and skip merges."""
    counts = {"transform_rows": 0, "transform_calls": 0, "skip_calls": 0}
    for blk in m.out_blocks:
        orig = blk.transform

        def transform(x, orig=orig):
            counts["transform_rows"] += x.shape[0]
            counts["transform_calls"] += 1
            return orig(x)

        blk.transform = transform
        blk.skip_linear.register_forward_hook(lambda *a: counts.__setitem__("skip_calls", counts["skip_calls"] + 1))
    return counts


def test_denoiser_skips_dropped_blocks_for_the_whole_batch():
    m = _model()
    sched = linear_ddpm()
    den = ASEDenoiser(m, sched, DroppingSchedule([2, 1, 0]))
    counts = _count_work(m)
    seen = []

    def spy(x, t, y=None):
        seen.append(float(t.reshape(-1)[0]))
        return den(x, t, y)

    spy.check = den.check
    sample(spy, sched, (3, 3, 16, 16), solver="ddim", num_steps=12, progress=False)
    kept = den.dropping.kept_blocks(torch.tensor(seen, dtype=torch.float64))
    assert counts["transform_calls"] == int(kept.sum())  # one call per kept block per step
    assert counts["transform_rows"] == 3 * int(kept.sum())  # ... over the whole batch
    assert counts["skip_calls"] == 2 * len(seen)  # every out-block merges its skip at every step
    assert 0 < int(kept.sum()) < 2 * len(seen)


def test_denoiser_with_all_blocks_equals_model_denoiser():
    from duodiff_fast.methods import ModelDenoiser

    m = _model()
    sched = vp_linear()
    a = sample(ASEDenoiser(m, sched, [2]), sched, (2, 3, 16, 16), solver="dpm_solver", num_steps=6, progress=False)
    b = sample(ModelDenoiser(m, sched), sched, (2, 3, 16, 16), solver="dpm_solver", num_steps=6, progress=False)
    assert torch.equal(a, b)


def _explicit_ase(m, x, ts, y, keep: int):
    """An independent U-ViT forward written out block by block, out-blocks >= keep reduced to
    their skip merge (any depth)."""
    from tests.methods import explicit

    h = explicit.embed(m, x, ts, y)
    skips = []
    for blk in m.in_blocks:
        h = explicit.block(blk, h)
        skips.append(h)
    h = explicit.block(m.mid_block, h)
    for j, blk in enumerate(m.out_blocks):
        h = explicit.block(blk, h, skips.pop(), transform=j < keep)
    return explicit.final(m, m.extras, m.in_chans, h)


class _ExplicitASE:
    """Reference denoiser: each row through :func:`_explicit_ase` with its own kept count."""

    def __init__(self, m, sched, dropping):
        self.m, self.sched, self.dropping = m, sched, dropping

    def __call__(self, x, t, y=None):
        t = t.reshape(-1).expand(x.shape[0])
        ts = self.sched.model_input(t).float()
        keep = self.dropping.kept_blocks(t)
        rows = [_explicit_ase(self.m, x[i:i + 1], ts[i:i + 1], None if y is None else y[i:i + 1], int(keep[i]))
                for i in range(x.shape[0])]
        return torch.cat(rows)


@pytest.mark.parametrize("solver,steps", [("ddpm", 8), ("ddim", 8), ("dpm_solver", 6)])
def test_samples_with_every_solver(solver, steps):
    m = _model(depth=12)
    sched = linear_ddpm()
    den = ASEDenoiser(m, sched, "D4")
    with torch.no_grad():
        out = sample(den, sched, (2, 3, 16, 16), solver=solver, num_steps=steps, progress=False, spacing=None,
                     base_seed=5)
        ref = sample(_ExplicitASE(m, sched, den.dropping), sched, (2, 3, 16, 16), solver=solver, num_steps=steps,
                     progress=False, spacing=None, base_seed=5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_conditional_model():
    torch.manual_seed(0)
    m = create_model("tiny-cond").eval()
    sched = linear_ddpm()
    den = ASEDenoiser(m, sched, [2, 1])
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.9, 0.2, 0.6], dtype=torch.float64), torch.tensor([1, 10, 3])
    with torch.no_grad():
        out = den(x, t, y)
        ref = _ExplicitASE(m, sched, den.dropping)(x, t, y)
    assert den.dropping.kept_blocks(t).tolist() == [1, 2, 1]  # rows really keep different blocks
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ fine-tuning
def test_finetune_loss_falls_and_weights_round_trip(tmp_path):
    data = SyntheticDataset(32, 16, 3, seed=0)
    base = TrainConfig(model="tiny", data="synthetic", batch_size=8, steps=20, log_every=4, save_every=0,
                       out_dir=str(tmp_path / "run"), progress=False, device="cpu", seed=0)
    cfg = ase_finetune_config(base, lr=3e-3)  # a fast rate for a from-scratch toy run
    assert ase_finetune_config(base).lr == 2e-5 and ase_finetune_config(base).ema_decay == 0.9999
    trainer = finetune_ase(cfg, [2, 1, 0], dataset=data)
    losses = [r["loss"] for r in trainer.history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(0 <= r["mean_kept"] <= 2 for r in trainer.history)
    path = tmp_path / "ema.pt"
    trainer.export_weights(str(path))
    plain = create_model("tiny")
    load_weights(plain, path)  # the export records the model config beside the state dict
    den = ASEDenoiser(plain.eval(), linear_ddpm(), [2, 1, 0])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5], dtype=torch.float64)
    ref = ASEDenoiser(trainer.ema.module.eval(), linear_ddpm(), [2, 1, 0])(x, t)
    assert torch.equal(den(x, t), ref)


def test_objective_draws_from_generator_only():
    m = ASEUViT.from_uvit(_model())
    obj = ASEObjective(linear_ddpm(), [2, 1], num_classes=0)
    x0 = torch.randn(4, 3, 16, 16)
    l1, _ = obj(m, x0, None, torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    l2, _ = obj(m, x0, None, torch.Generator().manual_seed(3))
    assert torch.equal(l1, l2)
