"""The environment switches of tests/conftest.py: required golden data (CI) and no skipped GPU tests
(benchmarks/gpu_suite.sh)."""
import os
import subprocess
import sys
import textwrap


def _run_pytest(tmp_path, body: str, **env):
    test = tmp_path / "tests" / "test_probe.py"
    test.parent.mkdir(exist_ok=True)
    (tmp_path / "tests" / "conftest.py").write_text(
        open(os.path.join(os.path.dirname(__file__), "conftest.py")).read())
    test.write_text(textwrap.dedent(body))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DUODIFF_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                          capture_output=True, text=True, cwd=tmp_path, env=full_env)


GOLDEN_TEST = """
def test_needs_golden(golden):
    assert golden
"""

GPU_TEST = """
import pytest

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA device")
def test_gpu_only():
    pass
"""


def test_missing_golden_skips_with_reason_and_fails_when_required(tmp_path):
    missing = str(tmp_path / "nope.pt")
    r = _run_pytest(tmp_path, GOLDEN_TEST, DUODIFF_GOLDEN=missing)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
    r = _run_pytest(tmp_path, GOLDEN_TEST, DUODIFF_GOLDEN=missing, DUODIFF_REQUIRE_GOLDEN="1")
    assert r.returncode == 1 and "1 error" in r.stdout and "DUODIFF_REQUIRE_GOLDEN" in r.stdout, r.stdout


MULTISTAGE_GOLDEN_TEST = """
def test_needs_multistage_golden(multistage_golden):
    assert multistage_golden
"""


def test_missing_multistage_golden_skips_and_fails_when_required(tmp_path):
    missing = str(tmp_path / "nope.pt")
    r = _run_pytest(tmp_path, MULTISTAGE_GOLDEN_TEST, DUODIFF_MULTISTAGE_GOLDEN=missing)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
    r = _run_pytest(tmp_path, MULTISTAGE_GOLDEN_TEST, DUODIFF_MULTISTAGE_GOLDEN=missing, DUODIFF_REQUIRE_GOLDEN="1")
    assert r.returncode == 1 and "1 error" in r.stdout and "DUODIFF_MULTISTAGE_GOLDEN" in r.stdout, r.stdout


def test_skipped_gpu_test_fails_when_gpu_required(tmp_path):
    cfg = tmp_path / "pytest.ini"
    cfg.write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    r = _run_pytest(tmp_path, GPU_TEST)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
    r = _run_pytest(tmp_path, GPU_TEST, DUODIFF_REQUIRE_GPU="1")
    assert r.returncode == 1 and "skipped under DUODIFF_REQUIRE_GPU=1: Skipped: no CUDA device" in r.stdout, r.stdout


def test_missing_dit_golden_skips_with_reason_and_fails_when_required(tmp_path):
    body = "def test_needs_dit_golden(dit_golden):\n    assert dit_golden\n"
    missing = str(tmp_path / "nope.pt")
    r = _run_pytest(tmp_path, body, DUODIFF_DIT_GOLDEN=missing)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout
    r = _run_pytest(tmp_path, body, DUODIFF_DIT_GOLDEN=missing, DUODIFF_REQUIRE_GOLDEN="1")
    assert r.returncode == 1 and "1 error" in r.stdout and "DUODIFF_REQUIRE_GOLDEN" in r.stdout, r.stdout
