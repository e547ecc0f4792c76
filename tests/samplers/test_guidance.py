"""Classifier-free guidance wrapper."""
import pytest
import torch

from duodiff_fast.samplers import ClassifierFreeGuidance


class Recorder:
    """A label-dependent denoiser that records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        return x * (1.0 + y.view(-1, 1, 1, 1).to(x.dtype)) + t.view(-1, 1, 1, 1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 1.0])
    y = torch.tensor([1, 4, 2])
    return x, t, y


def test_one_batched_call_and_formula():
    x, t, y = _inputs()
    rec = Recorder()
    out = ClassifierFreeGuidance(rec, scale=1.5, null_class=9)(x, t, y)
    assert len(rec.calls) == 1
    cx, ct, cy = rec.calls[0]
    assert cx.shape[0] == 6 and torch.equal(cx[:3], x) and torch.equal(cx[3:], x)
    assert torch.equal(ct, torch.cat([t, t]))
    assert cy.tolist() == [1, 4, 2, 9, 9, 9]
    ref = Recorder()
    cond, uncond = ref(x, t, y), ref(x, t, torch.full_like(y, 9))
    torch.testing.assert_close(out, cond + 1.5 * (cond - uncond))
    assert not torch.allclose(out, cond)


def test_scale_zero_returns_cond_with_one_call():
    x, t, y = _inputs()
    rec = Recorder()
    out = ClassifierFreeGuidance(rec, scale=0.0, null_class=9)(x, t, y)
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 3
    torch.testing.assert_close(out, Recorder()(x, t, y))


def test_scalar_t_is_broadcast():
    x, _, y = _inputs()
    rec = Recorder()
    ClassifierFreeGuidance(rec, 2.0, 9)(x, torch.tensor([0.3]), y)
    assert rec.calls[0][1].shape == (6,)


def test_bad_inputs():
    x, t, y = _inputs()
    cfg = ClassifierFreeGuidance(Recorder(), 1.0, 9)
    with pytest.raises(ValueError, match="needs class labels"):
        cfg(x, t, None)
    with pytest.raises(TypeError, match="integer"):
        cfg(x, t, y.float())
    with pytest.raises(ValueError, match=r"\(3,\)"):
        cfg(x, t, y[:2])
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(Recorder(), -1.0, 9)
    with pytest.raises(ValueError, match="null_class"):
        ClassifierFreeGuidance(Recorder(), 1.0, -1)
    with pytest.raises(TypeError, match="callable"):
        ClassifierFreeGuidance(None, 1.0, 9)


def test_sampler_validates_labels_once_before_the_loop():
    """Bad class ids are rejected at sample() entry, through CFG too, before any step runs."""
    from duodiff_fast.methods import ModelDenoiser
    from duodiff_fast.models import create_model
    from duodiff_fast.samplers import sample
    from duodiff_fast.schedules import get_schedule

    sched = get_schedule("linear")
    model = create_model("tiny-cond").eval()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    den = ModelDenoiser(model, sched)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        sample(den, sched, (2, 3, 16, 16), solver="ddim", num_steps=3, y=torch.tensor([0, 11]), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        sample(ClassifierFreeGuidance(den, 1.0, null_class=12), sched, (2, 3, 16, 16), solver="ddim",
               num_steps=3, y=torch.tensor([0, 1]), progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        sample(ModelDenoiser(create_model("tiny"), sched), sched, (1, 3, 16, 16), y=torch.tensor([0]),
               progress=False)
    assert calls == []


class _NoHostRead(torch.Tensor):
    """A tensor whose values cannot be read on the host (as under CUDA graph capture)."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("a device value was read on the host")

    item = tolist = __int__ = __float__ = __bool__ = __index__ = _refuse


@pytest.mark.parametrize("step_time,route", [(0.9, "shallow"), (0.2, "full")])
def test_cfg_around_duodiff_routes_on_the_host_time(step_time, route, monkeypatch):
    """CFG(DuoDiff) inside the sampling runtime: the backbone follows from the step's host time,
    with no row count read from the device, so the call can be captured."""
    from duodiff_fast.methods import DuoDiff
    from duodiff_fast.methods import duodiff as duodiff_module
    from duodiff_fast.models import create_model
    from duodiff_fast.samplers.constants import ConstantTable, bind_host_time, cached_time, static_constants
    from duodiff_fast.schedules import linear_ddpm
    from duodiff_fast.validation import inputs_validated

    torch.manual_seed(0)
    full, shallow = create_model("tiny-cond").eval(), create_model("tiny-cond", depth=0).eval()
    duo = DuoDiff(shallow, full, linear_ddpm(), t_s=300)
    cfg = ClassifierFreeGuidance(duo, 2.0, full.null_class)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([1, 4])
    with torch.no_grad():  # the expected output: the chosen backbone alone, guided by hand
        backbone = shallow if route == "shallow" else full
        t2 = torch.full((4,), step_time)
        both = duo._run(backbone, torch.cat([x, x]), t2, torch.cat([y, torch.full_like(y, full.null_class)]))
        expected = both[:2] + 2.0 * (both[:2] - both[2:])
    monkeypatch.setattr(duodiff_module, "split_rows", lambda *a, **k: pytest.fail("routed on the device"))
    table = ConstantTable()
    with torch.no_grad(), inputs_validated(), static_constants(table):
        t = cached_time(step_time, x, torch.float32).as_subclass(_NoHostRead)
        bind_host_time(t, step_time)
        assert cfg.host_route(t) == route
        out = cfg(x, t, y)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=1e-5, atol=1e-6)
