"""The sample() / generate() entry points."""
import pytest
import torch

from duodiff_fast.samplers import SOLVERS, generate, sample, seeds_for
from duodiff_fast.schedules import linear_ddpm, vp_linear


class CountingDenoiser:
    def __init__(self):
        self.calls = 0
        self.ts = []

    def __call__(self, x, t, y):
        self.calls += 1
        self.ts.append(float(t[0]))
        out = 0.5 * torch.tanh(x) + 0.1 * t.view(-1, 1, 1, 1).to(x.dtype)
        if y is not None:
            out = out + 0.05 * y.view(-1, 1, 1, 1).to(x.dtype)
        return out


SHAPE = (2, 1, 3, 3)


@pytest.mark.parametrize("solver,expected", [("ddpm", 1000), ("ddim", 50), ("dpm_solver", 20)])
def test_default_step_counts(solver, expected):
    den = CountingDenoiser()
    out = sample(den, vp_linear(), SHAPE, solver=solver, progress=False)
    assert den.calls == expected
    assert out.shape == SHAPE and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert max(den.ts) <= 1.0 and min(den.ts) >= 1e-4


def test_num_steps_callback_dtype_and_progress(capsys):
    den, seen = CountingDenoiser(), []
    out = sample(den, linear_ddpm(), SHAPE, solver="ddim", num_steps=7, dtype=torch.float64,
                 callback=lambda i, t, x: seen.append(i), progress=True)
    assert den.calls == 7 and seen == list(range(7))
    assert out.dtype == torch.float64
    assert "ddim" in capsys.readouterr().err  # the tqdm bar was drawn
    sample(CountingDenoiser(), linear_ddpm(), SHAPE, solver="ddim", num_steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_seeds_determine_the_result():
    sched = linear_ddpm()
    a = sample(CountingDenoiser(), sched, SHAPE, solver="ddpm", num_steps=10, seeds=[3, 4], progress=False)
    b = sample(CountingDenoiser(), sched, SHAPE, solver="ddpm", num_steps=10, seeds=[3, 4], progress=False)
    c = sample(CountingDenoiser(), sched, SHAPE, solver="ddpm", num_steps=10, seeds=[3, 5], progress=False)
    assert torch.equal(a, b)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    d = sample(CountingDenoiser(), sched, SHAPE, solver="ddpm", num_steps=10, base_seed=9, progress=False)
    e = sample(CountingDenoiser(), sched, SHAPE, solver="ddpm", num_steps=10, seeds=seeds_for(9, 0, 2), progress=False)
    assert torch.equal(d, e)


@pytest.mark.parametrize("solver,kw", [("ddpm", {"num_steps": 20}), ("ddim", {"num_steps": 10, "eta": 0.5})])
def test_generate_independent_of_batch_size(solver, kw):
    sched = vp_linear()
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    runs = [
        generate(CountingDenoiser(), sched, (1, 3, 3), 7, batch_size=bs, y=y, base_seed=5, solver=solver,
                 progress=False, **kw)
        for bs in (1, 3, 8)
    ]
    for r in runs[1:]:
        torch.testing.assert_close(r, runs[0], rtol=0, atol=1e-6)
    ref = sample(CountingDenoiser(), sched, (7, 1, 3, 3), y=y, seeds=seeds_for(5, 0, 7), solver=solver,
                 progress=False, **kw)
    torch.testing.assert_close(runs[0], ref, rtol=0, atol=1e-6)
    # start_index shifts the global indices: samples 3..6 of the run
    tail = generate(CountingDenoiser(), sched, (1, 3, 3), 4, batch_size=2, y=y[3:], base_seed=5,
                    start_index=3, solver=solver, progress=False, **kw)
    torch.testing.assert_close(tail, runs[0][3:], rtol=0, atol=1e-6)


def test_generate_postprocess_and_progress(capsys):
    out = generate(CountingDenoiser(), linear_ddpm(), (1, 2, 2), 5, batch_size=2, solver="ddim", num_steps=2,
                   postprocess=lambda x: x.flatten(1) * 0 + 1)
    assert out.shape == (5, 4) and torch.equal(out, torch.ones(5, 4))
    assert "generate" in capsys.readouterr().err


def test_bad_arguments():
    den, sched = CountingDenoiser(), linear_ddpm()
    with pytest.raises(ValueError, match="ddpm.*ddim.*dpm_solver"):
        sample(den, sched, SHAPE, solver="euler", progress=False)
    assert SOLVERS == ("ddpm", "ddim", "dpm_solver", "dpm_solver++")
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            sample(den, sched, SHAPE, solver="ddim", num_steps=bad, progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        sample(den, sched, SHAPE, solver="dpm_solver", num_steps=0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        sample(den, sched, (0, 1, 2, 2), progress=False)
    with pytest.raises(TypeError, match="integer"):
        sample(den, sched, SHAPE, y=torch.zeros(2), progress=False)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        sample(den, sched, SHAPE, y=torch.zeros(3, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="seeds"):
        sample(den, sched, SHAPE, seeds=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="t_end"):
        sample(den, vp_linear(), SHAPE, solver="dpm_solver", t_end=1e-6, progress=False)
    with pytest.raises(ValueError, match="t_min"):
        sample(den, sched, SHAPE, solver="dpm_solver", t_end=1e-4, progress=False)  # discrete t_min = 1e-3
    with pytest.raises(ValueError, match="variance"):
        sample(den, sched, SHAPE, solver="ddpm", variance="fixed", progress=False)
    with pytest.raises(TypeError, match="schedule"):
        sample(den, "linear", SHAPE, progress=False)
    with pytest.raises(ValueError, match="x_T"):
        sample(den, sched, SHAPE, x_T=torch.zeros(3, 1, 3, 3), progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        generate(den, sched, (1, 2, 2), 0)
    with pytest.raises(TypeError, match="sample_shape, n_samples"):
        generate(den, sched, 3, (1, 2, 2))  # swapped order
    with pytest.raises(ValueError, match="batch_size"):
        generate(den, sched, (1, 2, 2), 3, batch_size=0)
    with pytest.raises(TypeError, match="seeds"):
        generate(den, sched, (1, 2, 2), 3, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="solver"):
        generate(den, sched, (1, 2, 2), 3, solver="plms")
