"""Which errors are the user's input and which are the machine's: the command line's exit status.

    UsageError           bad input, named (exit 2). A ``ValueError``, so ``except ValueError`` and
                         ``pytest.raises(ValueError)`` keep working.
    DeviceUnavailable    the device asked for is not on this machine (exit 1).
    is_usage_error(e)    whether ``duodiff-fast`` reports ``e`` as a usage error (exit 2) rather than
                         a runtime error (exit 1).

The package validates input before any kernel launches and raises ``ValueError``/``TypeError`` (or
:class:`UsageError`) naming the problem; those are usage errors. The same exception types raised by
a kernel launcher, by Triton (compile errors, launch errors) or by the ``torch.compile`` stack are
*not*: the command's input was valid and the machine could not run it (exit 1). Triton failures
arrive as ``kernels._common.KernelLaunchError`` (a ``RuntimeError`` naming the kernel, its launch
plan and the shapes); a ``ValueError`` from a kernel launcher's own checks (operands that do not
fit the kernel) is a bug in the caller, not in the user's input, and is told apart by where it was
raised: any traceback frame inside the kernels, Triton or the compiler stack makes it a runtime error.

Nothing here imports torch.
"""
from __future__ import annotations

import os
import types
from typing import Optional

__all__ = ["UsageError", "DeviceUnavailable", "is_usage_error"]


class UsageError(ValueError):
    """Input that cannot be used (an option, a value, a file): the message names the problem."""


class DeviceUnavailable(RuntimeError):
    """The device asked for does not exist on this machine (a runtime error: exit 1)."""


# Files under these folders raise runtime errors whatever their type (see the module docstring).
# (An editable install runs the kernels from the checkout's top-level kernels/ folder: see
# _raised_in_runtime_code.)
_RUNTIME_SOURCES = (
    os.sep + os.path.join("duodiff_fast", "kernels") + os.sep,
    os.sep + "triton" + os.sep,
    os.sep + os.path.join("torch", "_inductor") + os.sep,
    os.sep + os.path.join("torch", "_dynamo") + os.sep,
)
_USAGE_TYPES = (ValueError, TypeError, KeyError, FileNotFoundError)


def _raised_in_runtime_code(tb: Optional[types.TracebackType]) -> bool:
    here = os.path.dirname(os.path.abspath(__file__))
    kernels_checkout = os.path.join(os.path.dirname(here), "kernels") + os.sep
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if path.startswith(kernels_checkout) or any(s in path for s in _RUNTIME_SOURCES):
            return True
        tb = tb.tb_next
    return False


def is_usage_error(exc: BaseException) -> bool:
    """True when ``exc`` is bad input (exit 2); False for errors of the run itself (exit 1).

    :class:`UsageError` always is; ``ValueError``, ``TypeError``, ``KeyError`` and
    ``FileNotFoundError`` are unless raised (anywhere along their traceback) inside the kernels,
    Triton or the ``torch.compile`` stack; every other exception is not.
    """
    if isinstance(exc, UsageError):
        return True
    if not isinstance(exc, _USAGE_TYPES):
        return False
    return not _raised_in_runtime_code(exc.__traceback__)
