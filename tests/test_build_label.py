"""The build mode of duodiff_fast._C that setup.py picks, as pip shows it (the version's local label)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _label(**env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("DUODIFF_FAST_BUILD", "TORCH_CUDA_ARCH_LIST")}
    full.update(env)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=full, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    return out.split("+", 1)[1]


def _toolkit() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and (bool(cpp_extension.CUDA_HOME) or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_explicit_modes():
    assert _label(DUODIFF_FAST_BUILD="cpu") == "cpu"
    assert _label(DUODIFF_FAST_BUILD="none") == "noext"


@pytest.mark.skipif(torch.cuda.is_available() or not _toolkit(), reason="needs a CUDA toolkit and no visible GPU")
def test_auto_without_gpu_builds_cpu_kernels_and_says_why():
    # A toolkit but nothing to build for: the CPU kernels, labelled so.
    assert _label() == "cpu.nogpu"
    # An arch list names the target: the CUDA kernels for exactly it.
    assert _label(TORCH_CUDA_ARCH_LIST="9.0") == "cuda.sm90"
    assert _label(DUODIFF_FAST_BUILD="cuda") == "cuda.sm80.sm86.sm89.sm90"
