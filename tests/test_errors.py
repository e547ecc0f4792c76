"""errors.is_usage_error and the CLI's exit status: bad input is exit 2, a kernel that fails is exit 1
(issue 20, part 4)."""
import pytest
import torch

from duodiff_fast import cli
from duodiff_fast.errors import UsageError, is_usage_error
from tests.conftest import raised as _raised


def test_input_checks_of_the_package_are_usage_errors():
    from duodiff_fast.backends import check_backend

    assert is_usage_error(_raised(lambda: check_backend("bogus")))
    assert is_usage_error(UsageError("bad"))
    assert not is_usage_error(RuntimeError("machine"))


def test_errors_raised_inside_the_kernels_are_runtime_errors():
    """A ValueError from a kernel launcher (operands that do not fit the kernel) is a bug of the
    run, not of the user's input."""
    pytest.importorskip("triton")
    from duodiff_fast import kernels

    err = _raised(lambda: kernels.linear(torch.randn(2, 8), torch.randn(4, 9)))
    assert isinstance(err, ValueError)
    assert not is_usage_error(err)


def test_cli_reports_a_kernel_launch_error_as_runtime(monkeypatch, capsys):
    pytest.importorskip("triton")
    from duodiff_fast.kernels._common import KernelLaunchError

    def fail(args):
        raise KernelLaunchError("Triton kernel _linear_kernel failed to compile or launch; launch plan: grid=(1,)")

    monkeypatch.setattr(cli, "cmd_sample", fail)
    code = cli.main(["sample", "--config", "cifar10-s2", "--random-weights", "--device", "cpu"])
    assert code == cli.EXIT_RUNTIME
    assert "_linear_kernel" in capsys.readouterr().err


def test_cli_reports_a_kernel_value_error_as_runtime(monkeypatch):
    """A ValueError raised inside the kernels keeps its traceback and exits 1, never 2."""
    pytest.importorskip("triton")
    from duodiff_fast import kernels

    monkeypatch.setattr(cli, "cmd_sample", lambda args: kernels.linear(torch.randn(2, 8), torch.randn(4, 9)))
    with pytest.raises(ValueError, match="input features"):
        cli.main(["sample", "--config", "cifar10-s2", "--random-weights", "--device", "cpu"])


def test_cli_missing_device_is_a_runtime_error(capsys):
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has a cuda:7")
    code = cli.main(["sample", "--config", "cifar10-s2", "--random-weights", "--device", "cuda:7",
                     "--n-samples", "1", "--no-progress"])
    assert code == cli.EXIT_RUNTIME
    assert "cuda:7" in capsys.readouterr().err
