"""kernels._common: every Triton launch enters its tensors' device, and a failed launch is a runtime
error naming the kernel, its plan and the shapes (issue 20, parts 1 and 4)."""
import contextlib
import pathlib
import re

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def guard_log(monkeypatch):
    """Replace kernels._common.device_guard by one that records the tensor it guards and whether a
    launch happens inside it; returns (guarded tensors' devices, launches, launches outside a guard)."""
    from duodiff_fast.kernels import _common

    log = {"guards": [], "depth": 0, "launches": 0, "unguarded": 0}
    real_guard = _common.device_guard

    @contextlib.contextmanager
    def counting_guard(t):
        log["guards"].append(t.device)
        log["depth"] += 1
        try:
            with real_guard(t):
                yield
        finally:
            log["depth"] -= 1

    real_run = _common.Launch.run

    def run(self, *tensors):
        log["launches"] += 1
        # Launch.run enters the guard itself: count launches whose guard is not entered by run.
        before = len(log["guards"])
        real_run(self, *tensors)
        if len(log["guards"]) == before:
            log["unguarded"] += 1

    monkeypatch.setattr(_common, "device_guard", counting_guard)
    monkeypatch.setattr(_common.Launch, "run", run)
    return log


def _operands(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(20)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return r


def _every_launcher(device):
    """Call each public launcher once on tiny operands; yields (name, thunk)."""
    from duodiff_fast import kernels

    r = _operands(device)
    d, heads, b, n = 16, 2, 2, 5
    yield "layernorm", lambda: kernels.layernorm(r(b, n, d), r(d), r(d))
    yield "add_layernorm", lambda: kernels.layernorm(r(b, n, d), r(d), r(d), residual=r(b, n, d))
    yield "linear", lambda: kernels.linear(r(b, n, d), r(24, d), r(24), activation="gelu")
    yield "linear2", lambda: kernels.linear(r(b, n, d), r(24, 2 * d), None, x2=r(b, n, d))
    yield "attention", lambda: kernels.attention_qkv(r(b, n, 3 * d), heads, d ** -0.5)
    yield "adaln_layernorm", lambda: kernels.adaln_layernorm(r(b, n, d), r(b, d), r(b, d), 1e-6)
    yield "linear_gated", lambda: kernels.linear(r(b, n, d), r(24, d), r(24), residual=r(b, n, 24), gate=r(b, 24))
    tokens = r(b, 1 + 4, d)
    yield "final_layer", lambda: kernels.final_layer(tokens, r(d), r(d), 1e-6, r(2 * 2 * 3, d), r(12), 1, 3)
    yield "frontend", lambda: kernels.frontend(r(b, 3, 4, 4), r(d, 3, 2, 2), r(d), r(1, 5, d), r(b, d))


def test_every_launcher_runs_inside_the_device_guard(device, guard_log):
    for name, call in _every_launcher(device):
        before = guard_log["launches"]
        call()
        assert guard_log["launches"] > before, f"{name} launched no kernel through Launch.run"
    assert guard_log["unguarded"] == 0
    assert guard_log["depth"] == 0
    from duodiff_fast.devices import normalize_device

    assert set(guard_log["guards"]) == {normalize_device(device)}  # "cuda" is cuda:<current> here


def test_every_custom_op_enters_the_device_guard(device, guard_log):
    """The duodiff_triton custom ops enter the guard around the whole launcher (allocation, tuning,
    launch), on top of Launch.run's own guard."""
    from duodiff_fast.ops import triton_ops as ops

    r = _operands(device)
    d, b, n = 16, 2, 5
    calls = {
        "layernorm": lambda: ops.layernorm(r(b, n, d), r(d), r(d), 1e-5),
        "add_layernorm": lambda: ops.add_layernorm(r(b, n, d), r(b, n, d), r(d), r(d), 1e-5),
        "linear": lambda: ops.linear(r(b, n, d), r(24, d), r(24), None, None, True),
        "attention_qkv": lambda: ops.attention_qkv(r(b, n, 3 * d), 2, d ** -0.5),
        "frontend": lambda: ops.frontend(r(b, 3, 4, 4), r(d, 3, 2, 2), r(d), r(1, 5, d), r(b, d), None, None),
        "final_layer": lambda: ops.final_layer(r(b, 5, d), r(d), r(d), 1e-6, r(12, d), r(12), 1, 3),
        "adaln_layernorm": lambda: ops.adaln_layernorm(r(b, n, d), r(b, d), r(b, d), 1e-6),
        "linear_gelu_tanh": lambda: ops.linear_gelu_tanh(r(b, n, d), r(24, d), r(24)),
        "linear_gated_residual": lambda: ops.linear_gated_residual(r(b, n, d), r(24, d), r(24), r(b, n, 24), r(b, 24)),
    }
    assert sorted(f"duodiff_triton::{k}" for k in calls) == sorted(ops.registered_ops())
    for name, call in calls.items():
        guards, launches = len(guard_log["guards"]), guard_log["launches"]
        call()
        launched = guard_log["launches"] - launches
        # one guard per Launch.run plus at least the op's own
        assert len(guard_log["guards"]) - guards > launched, f"custom op {name} does not enter the device guard"


def test_no_kernel_is_launched_outside_launch_run():
    """Every ``kernel[grid](...)`` launch lives in Launch.run (the guarded path), none elsewhere."""
    launch = re.compile(r"\b_?\w+_kernel\s*\[[^\]]*\]\s*\(")
    offenders = []
    for path in sorted((REPO / "kernels").glob("*.py")):
        if path.name in ("_common.py", "aot.py"):
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if launch.search(line):
                offenders.append(f"{path.name}:{no}: {line.strip()}")
    assert not offenders, offenders


def test_device_guard_is_a_no_op_on_the_cpu(monkeypatch):
    from duodiff_fast.kernels import _common

    def boom(*a, **k):
        raise AssertionError("a CPU tensor touched the CUDA device")

    monkeypatch.setattr(torch.cuda, "device", boom)
    with _common.device_guard(torch.zeros(1)):
        pass


def test_a_failed_launch_names_kernel_plan_and_shapes(device):
    """A Triton error (here a launch error: a runtime argument missing) becomes a
    KernelLaunchError -- a RuntimeError, never a ValueError/TypeError the CLI would call bad input."""
    from duodiff_fast.kernels import _common
    from duodiff_fast.kernels.layernorm import layernorm_launch

    good = layernorm_launch(3, 16, torch.float32, False)
    bad = _common.Launch(good.kernel, good.grid, good.pointers, good.scalars[:-1], good.constexprs,
                         good.num_warps, good.num_stages)
    x = torch.randn(3, 16, device=device)
    tensors = (x, x, torch.ones(16, device=device), torch.zeros(16, device=device), torch.empty_like(x),
               torch.empty_like(x))
    with pytest.raises(_common.KernelLaunchError) as info:
        bad.run(*tensors)
    msg = str(info.value)
    assert "_layernorm_kernel" in msg and "BLOCK_D=16" in msg and "grid=(" in msg and "(3, 16) float32" in msg
    assert not isinstance(info.value, (ValueError, TypeError))
    assert info.value.__cause__ is not None


def test_operands_off_the_plan_are_a_kernel_error(device):
    from duodiff_fast.kernels import _common
    from duodiff_fast.kernels.layernorm import layernorm_launch

    plan = layernorm_launch(3, 16, torch.bfloat16, False)
    x = torch.randn(3, 16, device=device)
    with pytest.raises(_common.KernelLaunchError, match="planned torch.bfloat16"):
        plan.run(x, x, x[0], x[0], x, x)
    with pytest.raises(_common.KernelLaunchError, match="6 pointer arguments planned, got 1"):
        plan.run(x)


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_kernels_run_on_the_second_gpu():
    """On cuda:1, with cuda:0 current, every launcher computes the reference result on cuda:1."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    from duodiff_fast import kernels

    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 64, generator=g).to(dev)
    w, b = torch.randn(96, 64, generator=g).to(dev), torch.randn(96, generator=g).to(dev)
    out = kernels.linear(x, w, b)
    torch.cuda.synchronize(dev)
    assert out.device == dev
    torch.testing.assert_close(out, kernels.linear_reference(x, w, b), rtol=1e-4, atol=1e-4)
    y = kernels.layernorm(x, torch.ones(64, device=dev), torch.zeros(64, device=dev))
    torch.testing.assert_close(y, kernels.layernorm_reference(x, torch.ones(64, device=dev),
                                                              torch.zeros(64, device=dev)), rtol=1e-4, atol=1e-4)
    assert torch.cuda.current_device() == 0  # the guard restores the caller's device
