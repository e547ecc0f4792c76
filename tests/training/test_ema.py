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
