"""Shared test fixtures: the golden-file path and small helpers."""
import os
import pathlib

import pytest
import torch

# Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which reads
# TRITON_INTERPRET when triton is imported: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def golden_path() -> pathlib.Path:
    """Path of the official U-ViT golden outputs (env DUODIFF_GOLDEN, default ../shared/golden)."""
    env = os.environ.get("DUODIFF_GOLDEN")
    if env:
        p = pathlib.Path(env)
        return p if p.is_absolute() else (REPO_ROOT / p)
    return REPO_ROOT / ".." / "shared" / "golden" / "uvit_reference.pt"


@pytest.fixture(scope="session")
def golden():
    """The golden dict, or skip with the reason when the file is absent."""
    path = golden_path()
    if not path.is_file():
        pytest.skip(f"golden file not found at {path} (set DUODIFF_GOLDEN)")
    return torch.load(path, map_location="cpu", weights_only=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
