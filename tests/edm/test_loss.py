"""EDM's loss (log-normal sigma, EDM weight) and the per-stage multistage loss."""
import math

import pytest
import torch

from duodiff_fast.edm import EDMLoss, EDMMultistageLoss, edm_weight

CIFAR = [[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]


def test_lognormal_moments():
    s = EDMLoss().sample_sigma(200_000, torch.Generator().manual_seed(0))
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.02)


def test_loss_closed_form_with_recorded_draws():
    images = torch.randn(3, 3, 4, 4)
    seen = {}

    def net(x, sigma, labels):
        seen["x"], seen["sigma"] = x, sigma
        return torch.zeros_like(x)

    loss = EDMLoss()(net, images, generator=torch.Generator().manual_seed(1))
    sigma = seen["sigma"].reshape(-1, 1, 1, 1)
    assert torch.allclose(loss, edm_weight(sigma) * images ** 2)
    assert torch.allclose(edm_weight(torch.tensor(0.5)), torch.tensor(2.0 * 0.5 ** 2 / 0.5 ** 4))
    # reproducible
    loss2 = EDMLoss()(net, images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss, loss2)


def test_multistage_batch_is_one_stage_and_stage_mass_matches():
    loss = EDMMultistageLoss(CIFAR)
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    for _ in range(400):
        sig = loss.sample_sigma(8, g)
        stages = {0 if v <= 2.5103 else 1 if v <= 7.6577 else 2 for v in sig.tolist()}
        assert len(stages) == 1
        counts[stages.pop()] += 1
    # stage probability = log-normal mass: Phi((ln 2.5103 + 1.2) / 1.2) ~ 0.93
    p0 = 0.5 * (1 + math.erf((math.log(2.5103) + 1.2) / 1.2 / math.sqrt(2)))
    assert counts[0] / 400 == pytest.approx(p0, abs=0.05)
    assert counts[1] > 0


def test_empty_stage_refused():
    with pytest.raises(ValueError):
        EDMMultistageLoss([])
