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


def dit_golden_path() -> pathlib.Path:
    """Path of the official DiT golden outputs (env DUODIFF_DIT_GOLDEN, default ../shared/golden)."""
    env = os.environ.get("DUODIFF_DIT_GOLDEN")
    if env:
        p = pathlib.Path(env)
        return p if p.is_absolute() else (REPO_ROOT / p)
    return REPO_ROOT / ".." / "shared" / "golden" / "dit_reference.pt"


def _required(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def golden():
    """The golden dict (the official U-ViT code's outputs on fixed inputs, see ../shared/golden/README.md),
    or skip with the reason when the file is absent. DUODIFF_REQUIRE_GOLDEN=1 (set by .ci/run) turns the
    skip into a failure."""
    path = golden_path()
    if not path.is_file():
        msg = (f"golden file not found at {path}: the official U-ViT outputs these tests compare against "
               "(set DUODIFF_GOLDEN to its path)")
        if _required("DUODIFF_REQUIRE_GOLDEN"):
            pytest.fail(msg + "; DUODIFF_REQUIRE_GOLDEN=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return torch.load(path, map_location="cpu", weights_only=True)


def multistage_golden_path() -> pathlib.Path:
    """Path of the multistage authors' and EDM's golden outputs (env DUODIFF_MULTISTAGE_GOLDEN,
    default ../shared/golden/multistage_reference.pt)."""
    env = os.environ.get("DUODIFF_MULTISTAGE_GOLDEN")
    if env:
        p = pathlib.Path(env)
        return p if p.is_absolute() else (REPO_ROOT / p)
    return REPO_ROOT / ".." / "shared" / "golden" / "multistage_reference.pt"


@pytest.fixture(scope="session")
def multistage_golden():
    """The multistage golden dict (schema in ../shared/golden/README.md), or skip with the reason when
    the file is absent; DUODIFF_REQUIRE_GOLDEN=1 turns the skip into a failure."""
    path = multistage_golden_path()
    if not path.is_file():
        msg = (f"golden file not found at {path}: the multistage authors' and EDM's outputs these tests "
               "compare against (set DUODIFF_MULTISTAGE_GOLDEN to its path)")
        if _required("DUODIFF_REQUIRE_GOLDEN"):
            pytest.fail(msg + "; DUODIFF_REQUIRE_GOLDEN=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def dit_golden():
    """The DiT golden dict (the official DiT code's model and improved-DDPM outputs, see
    ../shared/golden/README.md), or skip with the reason when the file is absent;
    DUODIFF_REQUIRE_GOLDEN=1 turns the skip into a failure."""
    path = dit_golden_path()
    if not path.is_file():
        msg = (f"DiT golden file not found at {path}: the official DiT outputs these tests compare against "
               "(set DUODIFF_DIT_GOLDEN to its path)")
        if _required("DUODIFF_REQUIRE_GOLDEN"):
            pytest.fail(msg + "; DUODIFF_REQUIRE_GOLDEN=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it. Tiny models gain nothing from intra-op
    threads, and on a busy 2-core machine the threads' spin-waiting makes them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With DUODIFF_REQUIRE_GPU=1 (benchmarks/gpu_suite.sh) a skipped ``gpu``-marked test is a failure:
    on the GPU machine every GPU test must run."""
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("multi_gpu") is not None and torch.cuda.device_count() < 2:
        return  # a one-GPU machine cannot run it: its skip says so
    if report.skipped and _required("DUODIFF_REQUIRE_GPU") and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"gpu test skipped under DUODIFF_REQUIRE_GPU=1: {reason}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())
