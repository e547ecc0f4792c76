"""Small helpers shared by the kernel launchers (no kernels here)."""
import contextlib
import dataclasses
import os
from typing import ContextManager, Dict, Optional, Tuple

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (tl.arange and tl.dot need power-of-two sizes)."""
    return max(minimum, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype, interpret: Optional[bool] = None) -> str:
    """``tl.dot`` input precision: exact float32 ("ieee") for float32 tests, else the default."""
    return "ieee" if dtype == torch.float32 or dot_upcast(dtype, interpret) else "tf32"


def dot_upcast(dtype: torch.dtype, interpret: Optional[bool] = None) -> bool:
    """Whether kernels must upcast bfloat16 operands to float32 before ``tl.dot``.

    Triton 3.8's CPU interpreter returns garbage for ``tl.dot`` on bfloat16 operands (checked on
    16x16 tiles; float16 and float32 are right), so under the interpreter the kernels convert
    bfloat16 tiles to float32 first. The products of two bfloat16 values are exact in float32, so
    the result is the same up to accumulation order. On a GPU the native bfloat16 dot runs.
    ``interpret`` (default: :func:`interpreting`) lets the sm_90 check plan GPU launches anywhere.
    """
    return (interpreting() if interpret is None else interpret) and dtype == torch.bfloat16


def device_guard(t: torch.Tensor) -> ContextManager:
    """Make ``t``'s CUDA device the current one for the duration of a launch; a no-op on the CPU.

    Triton launches on ``torch.cuda.current_device()`` and its current stream, not on the device of
    the pointers it is given: without this, a tensor on ``cuda:1`` (``--device cuda:1``, every
    ``torchrun`` rank but 0) would run its kernel on GPU 0 with pointers into another GPU. Every
    launch (:meth:`Launch.run`), tuning benchmark and ``duodiff_triton`` custom op enters it.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class KernelLaunchError(RuntimeError):
    """A Triton kernel failed to compile or launch. The message names the kernel, its launch plan
    and the operands' shapes and dtypes; the original error is the ``__cause__``. It is a runtime
    error (the command's input was valid), never a usage error."""


def describe_tensors(tensors) -> str:
    """``(2, 64) bfloat16 cuda:1, ...``: the shapes, dtypes and devices of a launch's operands."""
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}" for t in tensors)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` on the tensor cores (float32 accumulate); see :func:`dot_upcast`."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One fully decided kernel launch: what a launcher runs and what ``kernels.aot`` compiles.

    Every launcher builds its launches with a pure function of (shapes, dtypes, flags) that
    returns these, so the ahead-of-time sm_90 check compiles exactly the kernels that run.

    Attributes:
        kernel: the ``@triton.jit`` function.
        grid: launch grid (at most 3 axes).
        pointers: dtype of each pointer argument, in the kernel's order (they come first).
        scalars: the runtime integer/float arguments that follow the pointers, in order.
        constexprs: compile-time arguments by name (block sizes, flags).
        num_warps, num_stages: Triton launch options.
    """
    kernel: object
    grid: Tuple[int, ...]
    pointers: Tuple[torch.dtype, ...]
    scalars: Tuple[object, ...]
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        """The kernel's function name (``_linear_kernel``)."""
        return getattr(self.kernel, "__name__", None) or getattr(getattr(self.kernel, "fn", None), "__name__", "kernel")

    def plan(self) -> str:
        """The whole launch plan in one line: grid, scalars, every constexpr, warps and stages."""
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return (f"grid={self.grid} scalars={self.scalars} {consts} "
                f"num_warps={self.num_warps} num_stages={self.num_stages}")

    def run(self, *tensors: torch.Tensor) -> None:
        """Launch on ``tensors`` (one per pointer argument, dtypes as declared), on their device.

        Raises:
            KernelLaunchError: the operands do not match the plan, or Triton failed to compile or
                launch the kernel (the message names the kernel, the plan and the shapes).
        """
        if len(tensors) != len(self.pointers):
            raise KernelLaunchError(f"{self.name}: {len(self.pointers)} pointer arguments planned, got "
                                    f"{len(tensors)} ({describe_tensors(tensors)})")
        for i, (t, dt) in enumerate(zip(tensors, self.pointers)):
            if t.dtype != dt:  # the sm_90 check compiled the declared dtypes: run only those
                raise KernelLaunchError(f"pointer argument {i} of {self.name} is {t.dtype}, planned {dt} "
                                        f"(operands: {describe_tensors(tensors)})")
        try:
            with device_guard(tensors[0]):
                self.kernel[self.grid](*tensors, *self.scalars, **dict(self.constexprs),
                                       num_warps=self.num_warps, num_stages=self.num_stages)
        except KernelLaunchError:
            raise
        except Exception as exc:  # Triton's compile/launch errors have many types: name what ran
            raise KernelLaunchError(
                f"Triton kernel {self.name} failed to compile or launch ({type(exc).__name__}: {exc}); "
                f"launch plan: {self.plan()}; operands: {describe_tensors(tensors)}") from exc

    def describe(self) -> str:
        """Short text of the tile choice, e.g. ``BLOCK_M=128 BLOCK_N=128 w8 s3``."""
        tiles = " ".join(f"{k}={v}" for k, v in self.constexprs if k.startswith(("BLOCK", "D_", "ROWS")))
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def launch(kernel, grid, pointers, scalars, constexprs: Dict[str, object], num_warps: int,
           num_stages: int) -> Launch:
    """Build a :class:`Launch` (constexprs given as a dict, stored as a sorted-free tuple)."""
    return Launch(kernel, tuple(int(g) for g in grid), tuple(pointers), tuple(scalars),
                  tuple(constexprs.items()), int(num_warps), int(num_stages))


def check_grid(grid: Tuple[int, ...]) -> None:
    """Raise if a grid exceeds CUDA's limits (axis 0: 2^31 - 1; axes 1 and 2: 65535)."""
    limits = (2**31 - 1, 65535, 65535)
    for axis, (g, lim) in enumerate(zip(grid, limits)):
        if g > lim:
            raise ValueError(f"grid axis {axis} has {g} programs, over CUDA's limit of {lim}")
