"""DPM-Solver: the official U-ViT golden, convergence orders on an analytic ODE, DDIM equivalence."""
import math

import pytest
import torch

from duodiff_fast.samplers import (
    ClassifierFreeGuidance,
    DPMSolver,
    dpm_solver_sample,
    fast_orders,
    sample,
)
from duodiff_fast.schedules import linear_ddpm, vp_linear


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------
# Golden: DPM-Solver-fast as the official U-ViT evaluation runs it
# ---------------------------------------------------------------------------------------------
def _golden_case(golden):
    try:
        from duodiff_fast.models import UViT
    except ImportError as e:  # pragma: no cover - only while the model package is missing
        pytest.skip(f"duodiff_fast.models.UViT is not importable ({e}); the golden needs the U-ViT model")
    case = golden["dpm_solver"]
    ref = golden[case["model"]]
    model = UViT(**ref["config"])
    model.load_state_dict(ref["state_dict"])
    model.eval()
    schedule = vp_linear(0.1, 20.0)

    def denoiser(x, t, y):  # the network is fed t * 999
        return model(x, schedule.model_input(t).float(), y)

    guided = ClassifierFreeGuidance(denoiser, case["cfg_scale"], case["null_class"])
    return case, schedule, guided


def test_golden_dpm_solver_fast(golden):
    case, schedule, guided = _golden_case(golden)
    solver = DPMSolver(guided, schedule)  # defaults: noise prediction, solver_type "dpm_solver"
    with torch.no_grad():
        out = solver.sample(case["x_init"].clone(), steps=case["steps"], y=case["y"], t_end=case["eps"])
    assert solver.nfe == case["steps"]
    assert out.dtype == torch.float32
    err = rel_err(out, case["x0"])
    assert err < 1e-4, f"relative error {err:.3e} against the official DPM-Solver-fast output"


def test_golden_through_sample_driver(golden):
    case, schedule, guided = _golden_case(golden)
    out = sample(guided, schedule, tuple(case["x_init"].shape), solver="dpm_solver", num_steps=case["steps"],
                 y=case["y"], t_end=case["eps"], x_T=case["x_init"], progress=False)
    assert rel_err(out, case["x0"]) < 1e-4


def test_golden_discriminates_the_variants(golden):
    # Other plausible variants are clearly off, so the pin above is meaningful.
    case, schedule, guided = _golden_case(golden)
    with torch.no_grad():
        for kw, skip in (({"predict_x0": True}, "logSNR"), ({}, "time_uniform")):
            out = DPMSolver(guided, schedule, **kw).sample(
                case["x_init"].clone(), steps=case["steps"], y=case["y"], t_end=case["eps"], skip_type=skip
            )
            assert rel_err(out, case["x0"]) > 1e-4


# ---------------------------------------------------------------------------------------------
# Analytic ODE: Gaussian data N(mu, s^2) has a linear probability-flow ODE with a closed form
# ---------------------------------------------------------------------------------------------
MU, S = 0.5, 0.3


def gaussian_eps(schedule):
    def den(x, t, y):
        ab = float(schedule.alpha_bar(t[:1].double()))
        return ((1 - ab) ** 0.5 / (ab * S * S + 1 - ab)) * (x - ab**0.5 * MU)

    return den


def exact_ode_solution(schedule, x_T, t_end):
    """Along the PF-ODE the standardised value (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant."""
    a1, s1 = float(schedule.alpha(1.0)), float(schedule.sigma(1.0))
    ae, se = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))
    return ae * MU + math.sqrt(ae * ae * S * S + se * se) * (x_T - a1 * MU) / math.sqrt(a1 * a1 * S * S + s1 * s1)


X_T = torch.linspace(-3, 3, 7, dtype=torch.float64).view(7, 1, 1, 1)


@pytest.mark.parametrize("predict_x0", [False, True], ids=["eps", "x0"])
@pytest.mark.parametrize(
    "method,order,solver_type",
    [
        ("singlestep_fixed", 1, "dpm_solver"),
        ("singlestep_fixed", 2, "dpm_solver"),
        ("singlestep_fixed", 2, "taylor"),
        ("singlestep_fixed", 3, "dpm_solver"),
        ("singlestep_fixed", 3, "taylor"),
        ("multistep", 2, "dpm_solver"),
        ("multistep", 3, "dpm_solver"),
    ],
)
def test_convergence_order(predict_x0, method, order, solver_type):
    schedule, t_end = vp_linear(), 0.05
    ref = exact_ode_solution(schedule, X_T, t_end)
    errs = []
    for steps in (96, 384):
        solver = DPMSolver(gaussian_eps(schedule), schedule, predict_x0=predict_x0, solver_type=solver_type)
        out = solver.sample(X_T, steps=steps, t_end=t_end, order=order, method=method, lower_order_final=False)
        assert solver.nfe == steps
        errs.append(float((out - ref).abs().max()))
    ratio = errs[0] / errs[1]  # 4x more steps: expect 4^order
    assert ratio > 4**order / 2.5, f"errors {errs}: observed order {math.log(ratio, 4):.2f}, expected {order}"
    assert errs[1] < {1: 2e-2, 2: 1e-3, 3: 1e-5}[order]


@pytest.mark.parametrize("schedule", [vp_linear(), linear_ddpm()], ids=["vp", "discrete"])
def test_all_orders_reach_the_same_answer(schedule):
    t_end = schedule.t_min if schedule.t_min >= 1e-3 else 1e-3
    ref = exact_ode_solution(schedule, X_T, t_end)
    for px0 in (False, True):
        for method, order in (("fast", 3), ("singlestep", 2), ("multistep", 3), ("singlestep_fixed", 1)):
            out = DPMSolver(gaussian_eps(schedule), schedule, predict_x0=px0).sample(
                X_T, steps=120, t_end=t_end, order=order, method=method
            )
            tol = 2e-2 if order == 1 else 2e-3
            assert float((out - ref).abs().max()) < tol, (px0, method, order)


@pytest.mark.parametrize("predict_x0", [False, True])
def test_first_order_is_ddim(predict_x0):
    # One DPM-Solver-1 step s -> t equals the deterministic DDIM update.
    schedule = vp_linear()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    den = lambda x, t, y: 0.2 * x + torch.sin(3 * t).view(-1, 1, 1, 1)  # noqa: E731
    s, t = 0.8, 0.55
    out = DPMSolver(den, schedule, predict_x0=predict_x0).singlestep_update(x, s, t, order=1)
    ab_s, ab_t = float(schedule.alpha_bar(s)), float(schedule.alpha_bar(t))
    eps = den(x, torch.full((2,), s, dtype=torch.float64), None)
    x0 = (x - (1 - ab_s) ** 0.5 * eps) / ab_s**0.5
    torch.testing.assert_close(out, ab_t**0.5 * x0 + (1 - ab_t) ** 0.5 * eps, rtol=1e-12, atol=1e-12)


def test_fast_orders_and_time_points():
    assert fast_orders(10) == [3, 3, 3, 1]
    assert fast_orders(9) == [3, 3, 2, 1]
    assert fast_orders(20) == [3] * 6 + [2]
    assert fast_orders(2) == [2] and fast_orders(1) == [1]
    assert fast_orders(7, order=2) == [2, 2, 2, 1]
    for n in range(1, 40):
        assert sum(fast_orders(n)) == n
    schedule = vp_linear()
    solver = DPMSolver(gaussian_eps(schedule), schedule)
    ts = solver.time_steps("logSNR", 1.0, 1e-4, 4)
    lam = [float(schedule.lambda_(torch.tensor(v, dtype=torch.float64))) for v in ts]
    assert ts[0] == 1.0 and ts[-1] == 1e-4
    diffs = [lam[i + 1] - lam[i] for i in range(4)]
    assert max(diffs) - min(diffs) < 1e-9  # uniform in lambda
    assert solver.time_steps("time_uniform", 1.0, 0.2, 4) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    tq = solver.time_steps("time_quadratic", 1.0, 0.01, 3)
    assert [math.sqrt(v) for v in tq] == pytest.approx([1.0, 0.7, 0.4, 0.1])


def test_nfe_of_fast_equals_steps_and_functional_form():
    schedule = vp_linear()
    calls = []

    def den(x, t, y):
        calls.append(float(t[0]))
        return gaussian_eps(schedule)(x, t, y)

    out = dpm_solver_sample(den, schedule, X_T, num_steps=10)
    assert len(calls) == 10 and calls[0] == 1.0
    assert out.shape == X_T.shape


def test_bad_inputs():
    schedule = vp_linear()
    solver = DPMSolver(gaussian_eps(schedule), schedule)
    with pytest.raises(ValueError, match="order"):
        solver.sample(X_T, steps=6, order=4)
    with pytest.raises(ValueError, match="method"):
        solver.sample(X_T, steps=6, method="adaptive")
    with pytest.raises(ValueError, match="skip_type"):
        solver.sample(X_T, steps=6, skip_type="cosine")
    with pytest.raises(ValueError, match="steps"):
        solver.sample(X_T, steps=0)
    with pytest.raises(ValueError, match=r"t_min, t_max"):
        solver.sample(X_T, steps=6, t_end=0.0)
    with pytest.raises(ValueError, match="t_end"):
        solver.sample(X_T, steps=6, t_end=0.5, t_start=0.4)
    with pytest.raises(ValueError, match="solver_type"):
        DPMSolver(gaussian_eps(schedule), schedule, solver_type="heun")
    with pytest.raises(ValueError, match="multistep needs"):
        solver.sample(X_T, steps=2, order=3, method="multistep")
