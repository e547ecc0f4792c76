"""Shared test fixtures: the golden-file path and small helpers."""
import os
import pathlib
import shutil
import zlib

import pytest
import torch

# Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which reads
# TRITON_INTERPRET when triton is imported: set it before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# The golden files of ../shared/golden (schemas in its README): environment variable -> default file.
GOLDEN_FILES = {
    "DUODIFF_GOLDEN": "uvit_reference.pt",  # the official U-ViT code and the SD autoencoder
    "DUODIFF_DIT_GOLDEN": "dit_reference.pt",  # the official DiT code and its improved-DDPM diffusion
    "DUODIFF_MULTISTAGE_GOLDEN": "multistage_reference.pt",  # the multistage authors' and EDM's code
    "DUODIFF_DPMPP_GOLDEN": "dpmpp_reference.pt",  # the official DPM-Solver++ code
}


def golden_file_path(env: str) -> pathlib.Path:
    """Path of the golden file named by ``env`` (a key of GOLDEN_FILES): the variable's value
    (relative to the repository), else ../shared/golden/<default file>."""
    value = os.environ.get(env)
    if value:
        p = pathlib.Path(value)
        return p if p.is_absolute() else (REPO_ROOT / p)
    return REPO_ROOT / ".." / "shared" / "golden" / GOLDEN_FILES[env]


def golden_path() -> pathlib.Path:
    """Path of the official U-ViT golden outputs (env DUODIFF_GOLDEN, default ../shared/golden)."""
    return golden_file_path("DUODIFF_GOLDEN")


def dit_golden_path() -> pathlib.Path:
    """Path of the official DiT golden outputs (env DUODIFF_DIT_GOLDEN, default ../shared/golden)."""
    return golden_file_path("DUODIFF_DIT_GOLDEN")


def multistage_golden_path() -> pathlib.Path:
    """Path of the multistage authors' and EDM's golden outputs (env DUODIFF_MULTISTAGE_GOLDEN)."""
    return golden_file_path("DUODIFF_MULTISTAGE_GOLDEN")


def _required(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def require_golden(env: str, what: str) -> pathlib.Path:
    """The golden file of ``env``, or skip with the reason when it is absent (``what``: whose
    outputs it holds); DUODIFF_REQUIRE_GOLDEN=1 (set by .ci/run) turns the skip into a failure."""
    path = golden_file_path(env)
    if not path.is_file():
        msg = f"golden file not found at {path}: {what} these tests compare against (set {env} to its path)"
        if _required("DUODIFF_REQUIRE_GOLDEN"):
            pytest.fail(msg + "; DUODIFF_REQUIRE_GOLDEN=1 forbids skipping", pytrace=False)
        pytest.skip(msg)
    return path


def load_golden(env: str, what: str) -> dict:
    """:func:`require_golden`'s file, loaded weights-only on the CPU."""
    return torch.load(require_golden(env, what), map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def golden():
    """The U-ViT golden dict (the official U-ViT code's outputs on fixed inputs), or skip (see
    :func:`require_golden`)."""
    return load_golden("DUODIFF_GOLDEN", "the official U-ViT outputs")


@pytest.fixture(scope="session")
def multistage_golden():
    """The multistage golden dict (the authors' multistage U-ViT and U-Net, EDM's U-Net and Heun)."""
    return load_golden("DUODIFF_MULTISTAGE_GOLDEN", "the multistage authors' and EDM's outputs")


@pytest.fixture(scope="session")
def dit_golden():
    """The DiT golden dict (the official DiT code's model and improved-DDPM outputs)."""
    return load_golden("DUODIFF_DIT_GOLDEN", "the official DiT outputs")


def raised(fn) -> BaseException:
    """The exception ``fn()`` raises (an AssertionError when it raises none), to inspect its type."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks what it is
        return e
    raise AssertionError("nothing raised")


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


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (``hash()`` of a string is not)."""
    return zlib.crc32(repr(parts).encode())


# ------------------------------------------------------------------------------ the tolerance rule
# One rule for every low-precision comparison (kernels, fused models, methods on a backend), as
# flash-attention's tests do: the result's error against a float64 reference is at most
# TORCH_ERROR_MULTIPLE times PyTorch's own error at the same dtype, plus a small floor (float32
# results differ from the reference only by summation order, so they get an absolute floor).
TORCH_ERROR_MULTIPLE = 2.0
ERROR_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2e-4}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (inf when a holds NaN or inf)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def torch_error_bound(torch_lowp: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error against ``exact`` (float64) a ``dtype`` computation may have: a multiple of
    PyTorch's own error ``rel(torch_lowp, exact)`` at that dtype, plus the dtype's floor."""
    return TORCH_ERROR_MULTIPLE * rel(torch_lowp, exact) + ERROR_FLOOR[dtype]


def within_torch_error(out: torch.Tensor, torch_lowp: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                       what: str = "") -> None:
    """Assert the tolerance rule: ``rel(out, exact) <= torch_error_bound(torch_lowp, exact, dtype)``.

    Args:
        out: the result under test (any dtype; compared in float64).
        torch_lowp: PyTorch's own result for the same inputs computed at ``dtype``.
        exact: the float64 reference.
        dtype: the precision ``out`` was computed in (its floor is used).
    """
    err, bound = rel(out, exact), torch_error_bound(torch_lowp, exact, dtype)
    assert err <= bound, (f"{what}: error {err:.3g} against float64 > bound {bound:.3g} "
                          f"({TORCH_ERROR_MULTIPLE:g} x PyTorch's own {dtype} error + floor)")


# ------------------------------------------------------------------------------ devices for backends
def backend_device(backend: str) -> torch.device:
    """The device tests of an execution backend run on here: CUDA where present (every backend
    targets the GPU there: the triton backend cannot run on CPU tensors outside the interpreter),
    else the CPU (the triton backend in Triton's interpreter, which tests/conftest.py turns on)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_dtype(backend: str, device: torch.device) -> torch.dtype:
    """The precision ``backend`` computes in on ``device`` (its tolerance's dtype)."""
    if backend == "reference" or (backend == "triton" and device.type == "cpu"):
        return torch.float32
    return torch.bfloat16


def lowp_torch_backend(backend: str, device: torch.device) -> str:
    """The PyTorch backend computing at ``backend``'s precision on ``device`` (the tolerance's
    "PyTorch's own error"): eager-bf16 for bfloat16, the float32 reference for float32."""
    return "reference" if backend_dtype(backend, device) == torch.float32 else "eager-bf16"


def skip_unless_triton_runs(device: torch.device) -> None:
    """Skip, naming the reason, where the triton backend's kernels cannot run on ``device``."""
    from duodiff_fast import dispatch

    reason = dispatch.triton_unavailable_reason(device)
    if reason:
        pytest.skip(f"Triton kernels cannot run: {reason}")


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """The device the triton backend (and its kernels) runs on here, or skip with the reason."""
    dev = backend_device("triton")
    skip_unless_triton_runs(dev)
    return dev


# inductor's CPU backend compiles C++: without a compiler torch.compile on a CPU cannot run
HAS_CXX_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def device_or_skip(device: str, backend: str = "", compile_backend: str = "inductor") -> torch.device:
    """``device`` for a test parametrised over "cpu" and "cuda": skips "cuda" without a CUDA device,
    and torch.compile through inductor on a CPU without a C++ compiler."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "torch.compile" and device == "cpu" and compile_backend == "inductor" and not HAS_CXX_COMPILER:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    return torch.device(device)
