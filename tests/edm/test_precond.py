"""EDM/VP/VE preconditioning closed forms against a probe network that records its inputs."""

import pytest
import torch

from duodiff_fast.edm import EDMPrecond, VEPrecond, VPPrecond


class Probe(torch.nn.Module):
    """F(x, c_noise) = x * 2 + c_noise; records its inputs."""

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.clone(), noise_labels.clone(), class_labels)
        return x * 2 + noise_labels.reshape(-1, 1, 1, 1)


def test_edm_closed_form():
    torch.manual_seed(0)
    net = EDMPrecond(Probe(), 4, 3, sigma_data=0.5)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 70.0])
    out = net(x, sigma)
    assert out.dtype == torch.float32
    s = sigma.double().reshape(-1, 1, 1, 1)
    sd = 0.5
    c_in = 1 / (s ** 2 + sd ** 2).sqrt()
    f = 2 * (c_in * x) + (s.log() / 4)
    ref = sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * f
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(net.model.seen[1].double(), sigma.double().log() / 4, atol=1e-6)


def test_scalar_sigma_broadcasts_and_bad_sizes_refused():
    net = EDMPrecond(Probe(), 4, 3)
    x = torch.randn(2, 3, 4, 4)
    a = net(x, torch.tensor(2.0))
    b = net(x, torch.tensor([2.0, 2.0]))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise levels"):
        net(x, torch.tensor([1.0, 2.0, 3.0]))


def test_labels_become_one_hot():
    net = EDMPrecond(Probe(), 4, 3, label_dim=5)
    net(torch.randn(2, 3, 4, 4), torch.tensor([1.0, 1.0]), torch.tensor([4, 0]))
    labels = net.model.seen[2]
    assert labels.shape == (2, 5) and labels[0, 4] == 1 and labels[1, 0] == 1 and labels.sum() == 2
    net(torch.randn(2, 3, 4, 4), torch.tensor([1.0, 1.0]))
    assert torch.equal(net.model.seen[2], torch.zeros(1, 5))


def test_vp_and_ve():
    x = torch.randn(2, 3, 4, 4)
    vp = VPPrecond(Probe(), 4, 3)
    sigma = torch.tensor([0.5, 3.0])
    t = vp.sigma_inv(sigma)
    assert torch.allclose(vp.sigma(t).float(), sigma, rtol=1e-5)
    s = sigma.reshape(-1, 1, 1, 1)
    ref = x - s * (2 * x / (s ** 2 + 1).sqrt() + (999 * t).reshape(-1, 1, 1, 1))
    assert torch.allclose(vp(x, sigma), ref, rtol=1e-4, atol=1e-4)
    assert vp.sigma_min == pytest.approx(float(vp.sigma(1e-5))) and vp.sigma_max == pytest.approx(float(vp.sigma(1.0)))
    ve = VEPrecond(Probe(), 4, 3)
    ref = x + s * (2 * x + (0.5 * s).log())
    assert torch.allclose(ve(x, sigma), ref, rtol=1e-5, atol=1e-5)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


def test_sigma_data_must_be_positive():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(Probe(), 4, 3, sigma_data=0.0)
