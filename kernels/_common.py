"""Small helpers shared by the kernel launchers (no kernels here)."""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (tl.arange and tl.dot need power-of-two sizes)."""
    return max(minimum, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact float32 ("ieee") for float32 tests, else the default."""
    return "ieee" if dtype == torch.float32 or dot_upcast(dtype) else "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast bfloat16 operands to float32 before ``tl.dot``.

    Triton 3.8's CPU interpreter returns garbage for ``tl.dot`` on bfloat16 operands (checked on
    16x16 tiles; float16 and float32 are right), so under the interpreter the kernels convert
    bfloat16 tiles to float32 first. The products of two bfloat16 values are exact in float32, so
    the result is the same up to accumulation order. On a GPU the native bfloat16 dot runs.
    """
    return interpreting() and dtype == torch.bfloat16


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
