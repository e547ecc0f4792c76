"""Device normalisation at the API boundary (issue 9: "cuda" vs "cuda:0" broke graph capture)."""
import pytest
import torch

from duodiff_fast.devices import normalize_device, same_device
from duodiff_fast.samplers import philox


def test_cuda_without_index_gets_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert normalize_device("cuda") == torch.device("cuda:1")
    assert normalize_device(torch.device("cuda")) == torch.device("cuda:1")
    assert normalize_device("cuda:0") == torch.device("cuda:0")  # an explicit index is kept
    assert same_device("cuda", "cuda:1") and not same_device("cuda", "cuda:0")


def test_cpu_none_and_default():
    assert normalize_device(None) == torch.device("cpu")
    assert normalize_device("cpu") == torch.device("cpu")
    assert normalize_device(None, default="meta") == torch.device("meta")
    # the raw comparison is what went wrong: keep it documented by a test
    assert torch.device("cuda") != torch.device("cuda:0")
    with pytest.raises(RuntimeError):
        normalize_device("nonsense")


class _OnCuda0(torch.Tensor):
    """A CPU tensor that reports cuda:0 as its device (to test the comparison without a GPU)."""

    @property
    def device(self):
        return torch.device("cuda:0")


def test_seed_buffer_on_cuda0_is_used_as_is_when_device_is_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    seeds = torch.arange(4, dtype=torch.int64).as_subclass(_OnCuda0)
    assert seeds.device == torch.device("cuda:0")
    # Before the fix "cuda" != "cuda:0" sent the buffer through .tolist() (a host sync inside capture).
    assert philox._seed_tensor(seeds, torch.device("cuda")) is seeds
    assert philox._seed_tensor(seeds, "cuda:0") is seeds


def test_seed_tensor_cpu_is_not_copied_and_noise_device_is_normalised():
    seeds = torch.arange(3, dtype=torch.int64)
    assert philox._seed_tensor(seeds, "cpu") is seeds
    noise = philox.PhiloxNoise(seeds, device=None)
    assert noise.device == torch.device("cpu") and noise.seed_tensor is seeds


def test_graph_sampler_normalises_its_device(monkeypatch):
    from duodiff_fast.runtime.graphs import GraphSampler
    from duodiff_fast.schedules import get_schedule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    gs = GraphSampler(lambda x, t, y=None: x, get_schedule("linear"), (3, 8, 8), device="cuda")
    assert gs.device == torch.device("cuda:0")
    assert GraphSampler(lambda x, t, y=None: x, get_schedule("linear"), (3, 8, 8)).device == torch.device("cpu")
