"""AdaDiffObjective: the pseudo-uncertainty target of eq. 5 (per-element tanh, then the mean) and
the detached (1 - u) weight of L_UAL, checked by hand on inputs where the variants differ."""
import math

import pytest
import torch

from duodiff_fast.methods.adadiff import AdaDiffObjective, AdaDiffOutputs
from duodiff_fast.schedules import get_schedule


def _case(u=0.3):
    # batch 1, one channel, 1x2 pixels, one head: eps = (0, 0), head = (2, 0), final = (0.5, 0.5)
    noise = torch.zeros(1, 1, 1, 2)
    heads = torch.tensor([2.0, 0.0]).reshape(1, 1, 1, 1, 2).requires_grad_()
    u_t = torch.tensor([[u]], requires_grad=True)
    return AdaDiffOutputs(torch.full((1, 1, 1, 2), 0.5), heads, u_t), noise, u_t


def test_default_target_is_mean_of_elementwise_tanh():
    out, noise, _ = _case()
    t = AdaDiffObjective.losses(out, noise)
    paper = (math.tanh(2.0) + math.tanh(0.0)) / 2  # eq. 5: F = tanh per element, then the mean
    assert t["l_u"].item() == pytest.approx((0.3 - paper) ** 2, rel=1e-6)
    old = math.tanh((2.0 + 0.0) / 2)  # tanh of the mean error: a different number here
    assert abs(paper - old) > 0.25
    t_old = AdaDiffObjective.losses(out, noise, target="tanh_mean")
    assert t_old["l_u"].item() == pytest.approx((0.3 - old) ** 2, rel=1e-6)
    assert t["l_simple"].item() == pytest.approx(0.25)
    assert t["l_ual"].item() == pytest.approx((1 - 0.3) * (4.0 + 0.0) / 2, rel=1e-6)


def test_ual_weight_detached_by_default():
    out, noise, u = _case()
    AdaDiffObjective.losses(out, noise)["l_ual"].backward()
    assert u.grad is None  # only L_u trains the UEMs
    assert out.heads.grad is not None
    out, noise, u = _case()
    AdaDiffObjective.losses(out, noise, detach_ual_weight=False)["l_ual"].backward()
    assert u.grad.item() == pytest.approx(-2.0)  # d/du of (1 - u) * mse, mse = 2


def test_objective_call_uses_the_configured_target():
    class Stub(torch.nn.Module):
        """Heads that miss the noise by a fixed uneven pattern; u = 0.5."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, ts, y=None):
            bias = torch.zeros_like(x)
            bias[..., 0, 0] = 3.0
            return AdaDiffOutputs(x * 0 + self.p, (x * 0 + bias).unsqueeze(0), torch.full((1, x.shape[0]), 0.5) + self.p)

    x0 = torch.randn(3, 1, 2, 2)
    results = {}
    for target in AdaDiffObjective.TARGETS:
        obj = AdaDiffObjective(get_schedule("linear"), target=target)
        _, m = obj(Stub(), x0, None, torch.Generator().manual_seed(4))
        _, noise, _ = obj.base.sample(x0, torch.Generator().manual_seed(4))
        err = torch.zeros_like(noise)
        err[..., 0, 0] = 3.0
        err = err - noise
        u_hat = torch.tanh(err.abs()).flatten(1).mean(1) if target == "mean_tanh" else \
            torch.tanh(err.abs().flatten(1).mean(1))
        torch.testing.assert_close(m["l_u"], (0.5 - u_hat).pow(2).mean())
        results[target] = m["l_u"].item()
    assert results["mean_tanh"] != pytest.approx(results["tanh_mean"])
    with pytest.raises(ValueError, match="target"):
        AdaDiffObjective(get_schedule("linear"), target="tanh")
