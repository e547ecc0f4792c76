"""AdaDiff's bucketed exit: shrinking batch padded to a bucket ladder, one host read per layer.

Checked against the simulated exit (the reference) and the shrinking exit on random tiny models,
with random and programmed (``set_synthetic_exit_profile``) exit patterns; plus the bucket ladder,
the stable partition, the padding waste on a case worked out by hand and the host-read count.
"""
import math

import pytest
import torch

from duodiff_fast.methods import AdaDiff, AdaDiffUViT
from duodiff_fast.methods import adadiff as adadiff_module
from duodiff_fast.methods.adadiff import BucketStats, set_synthetic_exit_profile
from duodiff_fast.models import create_model
from duodiff_fast.ops.compaction import bucket_ladder, partition_order
from duodiff_fast.runtime.graphs import choose_bucket
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import get_schedule

from tests.methods.test_adadiff import inputs, make_model  # random-UEM tiny models and their inputs


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one intra-op thread


def mlp_uem_model(seed=5, spread=2.0):
    """A tiny AdaDiff model with two-layer UEMs (the time embedding is carried, not time logits)."""
    torch.manual_seed(seed)
    model = AdaDiffUViT(create_model("tiny"), uem_hidden=8).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for uem in model.uems:
            lin = uem.out_linear
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * spread / math.sqrt(lin.in_features))
    return model


def assert_agree(model, x, ts, y, theta, buckets=None):
    """Bucketed == simulated == shrinking (exits exactly, eps to rounding); returns the exits."""
    stats = BucketStats()
    eps_b, ex_b = model.exit_bucketed(x, ts, y, theta, buckets, stats)
    eps_r, ex_r = model.exit_simulated(x, ts, y, theta)
    eps_s, ex_s = model.exit_shrinking(x, ts, y, theta)
    assert eps_b.shape == x.shape and ex_b.shape == (x.shape[0],)
    assert torch.equal(ex_b, ex_r) and torch.equal(ex_b, ex_s)
    torch.testing.assert_close(eps_b, eps_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_b, eps_s, rtol=1e-5, atol=1e-5)
    assert stats.real_rows == int(ex_b.sum())  # each row ran exactly its exit layers
    assert stats.calls == 1
    return ex_b


# ------------------------------------------------------------------------------ ladder and partition
def test_bucket_ladder():
    assert bucket_ladder(13) == [1, 2, 4, 8, 13]
    assert bucket_ladder(8) == [1, 2, 4, 8]
    assert bucket_ladder(5) == [1, 2, 4, 5]
    assert bucket_ladder(1) == [1]
    assert bucket_ladder(10, [16, 4, 2, 4]) == [2, 4, 10]
    assert bucket_ladder(3, [8]) == [3]
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="batch"):
            bucket_ladder(bad)
    for bad in ([], [0], [2, -1], [1.5], [True]):
        with pytest.raises(ValueError, match="buckets"):
            bucket_ladder(4, bad)


def test_choose_bucket():
    ladder = [1, 2, 4, 8, 13]
    expected = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 13, 12: 13, 13: 13}
    for n, b in expected.items():
        assert choose_bucket(n, ladder) == b
    for n in range(1, 14):  # the smallest bucket that fits, every count
        assert choose_bucket(n, ladder) == min(b for b in ladder if b >= n)
    with pytest.raises(ValueError, match="batch"):
        choose_bucket(0, ladder)


def test_partition_order_is_a_stable_partition():
    g = torch.Generator().manual_seed(0)
    for p in (1, 5, 13, 64):
        stay = torch.rand(p, generator=g) < 0.4
        order = partition_order(stay)
        n = int(stay.sum())
        assert sorted(order.tolist()) == list(range(p))  # a permutation
        assert order[:n].tolist() == stay.nonzero().squeeze(1).tolist()  # stayers first, in order
        assert order[n:].tolist() == (~stay).nonzero().squeeze(1).tolist()
    with pytest.raises(ValueError, match="bool"):
        partition_order(torch.ones(3))


# ------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("name,b", [("tiny", 5), ("tiny", 13), ("tiny-cond", 13)])
def test_bucketed_equals_simulated_and_shrinking_random_patterns(name, b):
    model = make_model(name)
    seen = set()
    for seed in range(2):
        x, ts, y = inputs(model, b, seed)
        with torch.no_grad():
            u = model(x, ts, y).u  # (N, B)
        for q in (0.1, 0.3, 0.5, 0.7):
            theta = float(torch.quantile(u.flatten(), q))
            seen.update(assert_agree(model, x, ts, y, theta).tolist())
    assert len(seen) >= 4 and model.num_layers in seen and min(seen) <= 1  # mixed patterns really ran


def test_custom_ladder_and_mlp_uems():
    model = mlp_uem_model()
    x, ts, y = inputs(model, 13, seed=1)
    with torch.no_grad():
        u = model(x, ts, y).u
    for q in (0.2, 0.5):
        theta = float(torch.quantile(u.flatten(), q))
        assert_agree(model, x, ts, y, theta, buckets=[3])
        assert_agree(model, x, ts, y, theta, buckets=[1, 6, 7])


def test_all_exit_at_layer_zero_and_none_exit():
    model = make_model(bias=0.0, spread=0.0)  # u = 0.5 everywhere
    for b in (5, 13):
        x, ts, y = inputs(model, b)
        stats = BucketStats()
        assert assert_agree(model, x, ts, y, 0.5).tolist() == [0] * b  # everyone at the first head
        model.exit_bucketed(x, ts, y, 0.5, stats=stats)
        assert (stats.real_rows, stats.padded_rows) == (0, 0)  # no layer ran
        assert assert_agree(model, x, ts, y, 0.49).tolist() == [model.num_layers] * b  # nobody exits
        eps, _ = model.exit_bucketed(x, ts, y, 0.49, stats=stats)
        torch.testing.assert_close(eps, model.backbone(x, ts, y), rtol=1e-5, atol=1e-6)  # = plain U-ViT
        assert (stats.real_rows, stats.padded_rows) == (b * model.num_layers, 0)


def synthetic_model(sample_spread=0.0, seed=0):
    schedule = get_schedule("linear")
    torch.manual_seed(seed)
    model = AdaDiffUViT(create_model("tiny")).eval()
    set_synthetic_exit_profile(model, schedule, t_switch=0.6, exit_layer=2, theta=0.07, sample_spread=sample_spread)
    return model, schedule


@pytest.mark.parametrize("b", [1, 5, 13])
def test_synthetic_profile_with_mixed_times(b):
    model, schedule = synthetic_model(sample_spread=3.0, seed=b)
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.rand(b, generator=g)
    ts = schedule.model_input(t).float()
    seen = set()
    for theta in (0.01, 0.07, 0.3, 0.9):
        seen.update(assert_agree(model, x, ts, None, theta).tolist())
    assert {2, model.num_layers} <= seen or b == 1


# ------------------------------------------------------------------------------ padding, by hand
def test_padding_waste_by_hand_and_rows_per_layer():
    # B = 5, ladder [1, 2, 4, 5]. Rows 1 and 3 (t = 0.95) leave before layer 2; rows 0, 2, 4
    # (t = 0.1) run all 5 layers. Layers 0, 1: 5 real rows in bucket 5; layers 2, 3, 4: 3 real
    # rows in bucket 4 (one padding row). Real = 5 + 5 + 3 + 3 + 3 = 19, padded = 3.
    model, schedule = synthetic_model()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.95, 0.1, 0.95, 0.1])
    ts = schedule.model_input(t).float()
    rows = []
    handles = [blk.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
               for blk in model.backbone.layers()]
    head_rows = []  # (head, rows it ran on): heads run only where rows leave, only on those rows
    handles += [head.norm.register_forward_hook(lambda m, args, out, i=i: head_rows.append((i, args[0].shape[0])))
                for i, head in enumerate(model.heads)]
    stats = BucketStats()
    try:
        eps, exits = model.exit_bucketed(x, ts, None, 0.07, stats=stats)
    finally:
        for h in handles:
            h.remove()
    assert exits.tolist() == [5, 2, 5, 2, 5]
    assert rows == [5, 5, 4, 4, 4]
    assert (stats.real_rows, stats.padded_rows, stats.calls) == (19, 3, 1)
    assert stats.waste == pytest.approx(3 / 22)
    assert head_rows == [(2, 2)]  # only head 2 ran, on the 2 leaving rows (bucket 2: no padding)
    assert stats.as_dict() == {"real_rows": 19, "padded_rows": 3, "waste": pytest.approx(3 / 22), "calls": 1,
                               "head_rows": 2, "head_padded_rows": 0}
    eps_r, _ = model.exit_simulated(x, ts, None, 0.07)
    torch.testing.assert_close(eps, eps_r, rtol=1e-5, atol=1e-5)
    # a ladder that fits 3 exactly has no waste
    stats3 = BucketStats()
    model.exit_bucketed(x, ts, None, 0.07, buckets=[3], stats=stats3)
    assert (stats3.real_rows, stats3.padded_rows) == (19, 0)


def test_padding_rows_never_reach_outputs():
    # Whatever the padding slots hold, the real rows' outputs and exits do not change: poison the
    # row a padding slot copies (a row that left) after it left, by making its head output huge.
    model, schedule = synthetic_model()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ts = schedule.model_input(torch.tensor([0.1, 0.95, 0.1, 0.95, 0.1])).float()
    eps_r, ex_r = model.exit_simulated(x, ts, None, 0.07)
    x_poison = x.clone()
    x_poison[1] *= 1e3  # row 1 leaves at layer 2 and is a padding copy afterwards
    eps_p, ex_p = model.exit_bucketed(x_poison, ts, None, 0.07)
    eps_q, _ = model.exit_simulated(x_poison, ts, None, 0.07)
    assert torch.equal(ex_p, ex_r)
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(eps_p[keep], eps_r[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_p, eps_q, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ host reads
_HOST_READS = ("__int__", "__bool__", "__float__", "__index__", "item", "tolist")


def test_at_most_one_host_read_per_layer(monkeypatch):
    model = make_model(seed=2)
    x, ts, y = inputs(model, 13, seed=3)
    with torch.no_grad():
        u = model(x, ts, y).u
    theta = float(torch.quantile(u.flatten(), 0.3))
    counts = {"count": 0, "any": 0}
    real_read = adadiff_module.read_count

    def counted(t):
        counts["count"] += 1
        return real_read(t)

    monkeypatch.setattr(adadiff_module, "read_count", counted)
    for name in _HOST_READS:  # every Python-level read of a tensor's value on the host
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, **k):
            counts["any"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    model.backbone.check_inputs(x, ts, y)  # the per-call input validation reads a few values once
    validation = counts["any"]
    counts["any"] = 0
    _, exits = model.exit_bucketed(x, ts, y, theta)
    monkeypatch.undo()  # restore before the checks below read tensors
    layers_entered = min(int(exits.max()) + 1, model.num_layers)  # exit steps run before layers 0 .. max
    assert 1 <= counts["count"] <= model.num_layers
    assert counts["count"] == layers_entered
    assert counts["any"] == counts["count"] + validation  # no other host read hides in the layer path


# ------------------------------------------------------------------------------ the denoiser
@pytest.mark.parametrize("solver,steps", [("ddim", 4), ("dpm_solver", 4)])
def test_denoiser_bucketed_mode(solver, steps):
    model, schedule = synthetic_model(sample_spread=2.0, seed=7)
    shape = (5, 3, 16, 16)
    outs, dens = [], []
    for mode in ("shrinking", "bucketed"):
        den = AdaDiff(model, schedule, theta=0.07, mode=mode)
        with torch.inference_mode():
            outs.append(sample(den, schedule, shape, solver=solver, num_steps=steps, base_seed=0, progress=False))
        dens.append(den)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert dens[0].bucket_stats is None
    stats = dens[1].bucket_stats
    assert stats.calls >= steps and stats.real_rows > 0 and 0.0 <= stats.waste < 1.0
    with pytest.raises(ValueError, match="buckets"):
        AdaDiff(model, schedule, theta=0.07, mode="bucketed", buckets=[0, 2])
    with pytest.raises(ValueError, match="buckets"):
        AdaDiff(model, schedule, theta=0.07, mode="bucketed", buckets=[])


# ------------------------------------------------------------------------------ the triton backend

def test_bucketed_with_padding_on_triton_matches_reference(triton_device):
    from tests.conftest import backend_dtype, lowp_torch_backend, within_torch_error
    from tests.methods.test_every_backend import _denoiser

    device = triton_device
    schedule = get_schedule("vp-linear")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, 8, 8, generator=g).to(device)
    # rows at t = 0.9, 0.95 leave before layer 2; the 3 others run on in bucket 4 (one padding row)
    t = torch.tensor([0.9, 0.2, 0.5, 0.95, 0.1], dtype=torch.float32, device=device)
    y = torch.tensor([1, 5, 0, 9, 3], device=device)
    lowp = lowp_torch_backend("triton", device)
    outs = {}
    for backend in ("float64", lowp, "triton"):
        den = _denoiser("adadiff-bucketed", backend, schedule, device)
        with torch.no_grad():
            outs[backend] = den(x.double() if backend == "float64" else x, t, y).cpu()
        assert den.last_exits.tolist() == [2, 5, 5, 2, 5]
        assert (den.bucket_stats.real_rows, den.bucket_stats.padded_rows) == (19, 3)
    within_torch_error(outs["triton"], outs[lowp], outs["float64"], backend_dtype("triton", device),
                       f"bucketed AdaDiff on triton ({device.type})")
