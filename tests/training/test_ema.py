"""EMA: update formula on parameters and buffers, wrappers, state dict keys."""
import pytest
import torch
import torch.nn as nn

from duodiff_fast.training import EMA, unwrap_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_update_formula():
    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.running.fill_(1.0)
        model.count.fill_(5)
    ema.update(model)
    for name, p in model.state_dict().items():
        got = ema.state_dict()[name]
        if p.is_floating_point():
            torch.testing.assert_close(got, 0.9 * before[name] + 0.1 * p, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, p)  # integer buffers are copied
    assert ema.num_updates == 1
    assert set(ema.state_dict()) == set(model.state_dict())
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_decay_zero_copies_and_one_freezes():
    model = Net()
    e0, e1 = EMA(model, 0.0), EMA(model, 1.0)
    start = {k: v.clone() for k, v in e1.state_dict().items()}
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    e0.update(model)
    e1.update(model)
    assert torch.equal(e0.module.lin.weight, model.lin.weight)
    assert torch.equal(e1.module.lin.weight, start["lin.weight"])
    with pytest.raises(ValueError):
        EMA(model, 1.5)


def test_ema_of_wrapped_model_tracks_inner_module():
    model = Net()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    ema = EMA(wrapped, 0.5)
    assert set(ema.state_dict()) == set(model.state_dict())  # no "module." prefix
    start = ema.module.lin.bias.clone()
    with torch.no_grad():
        model.lin.bias.fill_(2.0)
    ema.update(wrapped)
    torch.testing.assert_close(ema.module.lin.bias, 0.5 * start + 0.5 * torch.full((2,), 2.0))


def test_warmup_matches_its_closed_form():
    """decay_t = min(decay, (1 + t) / (10 + t)); on a constant target the initial weights' share
    after T updates is prod_t decay_t, and for t with (1 + t)/(10 + t) < decay that product
    telescopes to 9! T! / (T + 9)! = 1 / C(T + 9, 9)."""
    from math import comb, prod

    torch.manual_seed(0)
    model = Net()
    ema = EMA(model, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    init = ema.module.lin.weight.detach().clone()
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # a fixed target: EMA = target - share * (target - init)
    target = model.lin.weight.detach().clone()
    decays = []
    for t in range(40):
        decays.append(ema.current_decay())
        ema.update(model)
    assert decays == [pytest.approx(min(0.999, (1 + t) / (10 + t))) for t in range(40)]
    share = prod(decays)
    assert share == pytest.approx(1 / comb(40 + 9, 9), rel=1e-9)
    torch.testing.assert_close(ema.module.lin.weight, target - share * (target - init), rtol=0, atol=1e-6)
    # The cap: far into the run the decay is the configured one.
    ema.num_updates = 10 ** 6
    assert ema.current_decay() == 0.999
    assert EMA(model, decay=0.999).current_decay() == 0.999  # no warm-up: decay from the start
    assert ema.meta()["warmup"] is True


def test_warmup_makes_a_short_runs_ema_forget_the_init():
    """The issue's numbers: 2,500 updates at 0.9999 keep 78% of the initial weights without warm-up."""
    from math import prod

    without = 0.9999 ** 2500
    with_warmup = prod(min(0.9999, (1 + t) / (10 + t)) for t in range(2500))
    assert without == pytest.approx(0.78, abs=0.005) and with_warmup < 0.004
