import pytest
import torch

from duodiff_fast.methods import DuoDiff, ModelDenoiser
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm, vp_linear


class Recorder(torch.nn.Module):
    """A backbone stand-in that records which rows it saw and returns a constant marker."""

    def __init__(self, marker: float, in_chans=3, img_size=8, num_classes=-1):
        super().__init__()
        self.marker, self.in_chans, self.img_size, self.patch_size = marker, in_chans, img_size, 2
        self.num_classes = num_classes
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, timesteps, y=None):
        self.calls.append(timesteps.clone())
        return torch.full_like(x, self.marker)


def _pair(**kw):
    return Recorder(1.0, **kw), Recorder(2.0, **kw)


def _grid_t(schedule, i):
    """Continuous time of discrete step index i."""
    return torch.full((1,), (i + 1) / schedule.num_timesteps, dtype=torch.float64)


@pytest.mark.parametrize("t_s", [0, 1, 300, 500, 999, 1000])
def test_ddpm_routing_counts_exactly_t_s_steps(t_s):
    sched = linear_ddpm()
    shallow, full = _pair()
    duo = DuoDiff(shallow, full, sched, t_s)
    t_all = torch.tensor([(i + 1) / 1000 for i in range(1000)], dtype=torch.float64)
    routed = duo.uses_shallow(t_all)
    assert int(routed.sum()) == t_s
    # the shallow steps are the noisiest ones: indices 1000 - t_s ... 999
    if t_s:
        assert routed[1000 - t_s:].all() and not routed[: 1000 - t_s].any()


def test_ddpm_boundary_indices_in_network_call():
    sched = linear_ddpm()
    shallow, full = _pair()
    duo = DuoDiff(shallow, full, sched, 300)
    x = torch.zeros(1, 3, 8, 8)
    assert duo(x, _grid_t(sched, 700)).max() == 1.0  # index 700: 300th step of the reverse process
    assert duo(x, _grid_t(sched, 699)).max() == 2.0  # index 699: first full-model step
    # the network is fed the step index
    assert shallow.calls[-1].item() == 700 and full.calls[-1].item() == 699


def test_continuous_schedule_routing():
    sched = vp_linear()
    duo = DuoDiff(*_pair(), sched, 400)
    t = torch.tensor([1.0, 0.61, 0.6, 0.59, 0.01], dtype=torch.float64)
    assert duo.uses_shallow(t).tolist() == [True, True, False, False, False]


def test_mixed_batch_splits_rows():
    sched = linear_ddpm()
    shallow, full = _pair(num_classes=5)
    duo = DuoDiff(shallow, full, sched, 500)
    x = torch.zeros(4, 3, 8, 8)
    t = torch.tensor([0.9, 0.1, 0.6, 0.3], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    out = duo(x, t, y)
    assert out[:, 0, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]


def test_t_s_zero_is_base_model_bitwise():
    torch.manual_seed(0)
    full = create_model("tiny").eval()
    shallow = create_model("tiny-shallow").eval()
    sched = linear_ddpm()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.95, 0.95], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(DuoDiff(shallow, full, sched, 0)(x, t), ModelDenoiser(full, sched)(x, t))
        assert torch.equal(DuoDiff(shallow, full, sched, 1000)(x, t), ModelDenoiser(shallow, sched)(x, t))


def test_routing_list_for_ddim_style_grid():
    sched = linear_ddpm()
    duo = DuoDiff(*_pair(), sched, 300)
    ts = [(i + 1) / 1000 for i in range(980, -1, -20)]  # 50 steps, indices 980 ... 0
    names = duo.routing(ts)
    assert names.count("shallow") == 15 and names[:15] == ["shallow"] * 15


class TestBadInput:
    def test_t_s_out_of_range(self):
        with pytest.raises(ValueError, match=r"\[0, 1000\].*1001"):
            DuoDiff(*_pair(), linear_ddpm(), 1001)
        with pytest.raises(ValueError, match=r"\[0, 1000\]"):
            DuoDiff(*_pair(), linear_ddpm(), -1)

    def test_t_s_not_integer(self):
        with pytest.raises(TypeError, match="integer"):
            DuoDiff(*_pair(), linear_ddpm(), 300.5)

    def test_backbones_disagree(self):
        with pytest.raises(ValueError, match="img_size"):
            DuoDiff(Recorder(1.0, img_size=8), Recorder(2.0, img_size=16), linear_ddpm(), 10)

    def test_time_out_of_range(self):
        duo = DuoDiff(*_pair(), linear_ddpm(), 10)
        with pytest.raises(ValueError, match="t"):
            duo(torch.zeros(1, 3, 8, 8), torch.tensor([1.5]))

    def test_wrong_image_shape(self):
        duo = DuoDiff(*_pair(), linear_ddpm(), 10)
        with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
            duo(torch.zeros(1, 3, 9, 9), torch.tensor([0.5]))
