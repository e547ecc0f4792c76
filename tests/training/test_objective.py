"""Noise-prediction objective and classifier-free-guidance label dropout."""
import pytest
import torch
import torch.nn as nn

from duodiff_fast.schedules import get_schedule
from duodiff_fast.training import DiffusionObjective, drop_labels


class Recorder(nn.Module):
    """Same forward signature as UViT; returns a fixed fraction of x_t and records its inputs."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, timesteps, y=None):
        self.calls.append((x.clone(), timesteps.clone(), None if y is None else y.clone()))
        return self.scale * x


def test_drop_labels_rate_and_null_class():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (40000,), generator=g)
    out = drop_labels(y, 0.1, null_class=10, generator=g)
    dropped = out != y
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert bool((out[dropped] == 10).all())
    assert bool((out[~dropped] == y[~dropped]).all())
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert bool((drop_labels(y, 1.0, 10) == 10).all())
    with pytest.raises(ValueError):
        drop_labels(y, 1.5, 10)


@pytest.mark.parametrize("schedule_name", ["linear", "vp-linear"])
def test_loss_is_mse_against_the_drawn_noise(schedule_name):
    schedule = get_schedule(schedule_name)
    objective = DiffusionObjective(schedule, num_classes=0)
    model = Recorder()
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    loss, metrics = objective(model, x0, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(3))

    # Replay the same draws: t, then the noise, from a generator in the same state.
    g = torch.Generator().manual_seed(3)
    t = schedule.sample_training_t(6, x0.device, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = schedule.add_noise(x0, noise, t)
    x_seen, ts_seen, y_seen = model.calls[0]
    assert y_seen is None  # unconditional models get no labels
    torch.testing.assert_close(x_seen, x_t)
    torch.testing.assert_close(ts_seen, schedule.model_input(t).float())
    torch.testing.assert_close(loss, ((0.5 * x_t - noise) ** 2).mean())
    assert metrics["loss"].item() == pytest.approx(loss.item())
    loss.backward()
    assert model.scale.grad is not None


def test_conditional_labels_dropped_to_null_class():
    objective = DiffusionObjective(get_schedule("linear"), num_classes=11, p_uncond=0.15)
    model = Recorder()
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(1))
    objective(model, torch.zeros(20000, 1, 1, 1), y, torch.Generator().manual_seed(2))
    y_seen = model.calls[0][2]
    dropped = y_seen != y
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    assert bool((y_seen[dropped] == 10).all())
    with pytest.raises(ValueError, match="class-conditional"):
        objective(model, torch.zeros(2, 1, 1, 1), None, None)
