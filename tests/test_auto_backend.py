"""auto_backend: availability reasons, the self-check, skipping a failing backend with one warning, and
the per-machine cache (issue 20, part 3). The self-check runs the Triton kernels in the CPU
interpreter on a tiny model here; on a GPU it runs them for real."""
import json
import warnings

import pytest
import torch

from duodiff_fast import auto_backend as ab
from duodiff_fast.backends import check_backend, resolve_backend


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUODIFF_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / ab.CACHE_FILE


@pytest.fixture
def small_check(monkeypatch, one_thread):
    """A very small model of the config for the self-check (the interpreter is slow)."""
    from duodiff_fast.models import create_model

    def model(config, device):
        torch.manual_seed(0)
        return create_model(config, depth=0, img_size=8).to(device).eval()

    monkeypatch.setattr(ab, "_check_model", model)


@pytest.fixture
def interpreter():
    from duodiff_fast.ops.availability import interpreter_enabled

    if not interpreter_enabled() or ab.backend_unavailable_reasons("triton", "cpu"):
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1 and an installed kernels package)")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DUODIFF_FAST_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ab.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("DUODIFF_FAST_CACHE")
    assert ab.cache_dir() == str(tmp_path / "x" / "duodiff-fast")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ab.cache_dir() == str(tmp_path / "home" / ".cache" / "duodiff-fast")


def test_auto_on_the_cpu_is_the_reference_without_a_check(cache, monkeypatch):
    monkeypatch.setattr(ab, "self_check", lambda *a: pytest.fail("no self-check on a CPU"))
    choice = ab.choose_backend("tiny", "cpu")
    assert choice.backend == "reference" and choice.reason.startswith("auto: reference")
    assert resolve_backend("auto", "tiny", "cpu") == ("reference", choice.reason)
    assert resolve_backend("triton", "tiny", "cpu") == ("triton", "requested: triton")
    assert not cache.exists()


def test_auto_is_not_a_model_backend():
    assert check_backend("auto", allow_auto=True) == "auto"
    with pytest.raises(ValueError, match="resolved first"):
        check_backend("auto")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        check_backend("fast", allow_auto=True)


@pytest.fixture
def fake_turing_gpu(monkeypatch):
    """A CUDA device of compute capability 7.5 (the capability cache is cleared before and after)."""
    from duodiff_fast.ops import availability

    availability._capability.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    yield
    availability._capability.cache_clear()


def test_every_reason_is_listed(monkeypatch, fake_turing_gpu):
    """A GPU below sm_80 without the kernels package: triton lists both reasons, eager-bf16 its own."""
    from duodiff_fast.ops import availability

    monkeypatch.setattr(availability, "kernels_import_error",
                        lambda: "duodiff_fast.kernels is not importable (a bare checkout)")
    # (not the environment variable: triton reads it when it is imported)
    monkeypatch.setattr(availability, "interpreter_enabled", lambda: False)
    reasons = ab.backend_unavailable_reasons("triton", "cuda:0")
    assert any("not importable" in r for r in reasons)
    assert any("7.5 is below 8.0" in r for r in reasons)
    # the one answer the triton backend and the op implementation ask gives them all too
    why = availability.triton_unavailable_reason("cuda:0")
    assert "not importable" in why and "7.5 is below 8.0" in why
    assert ab.backend_unavailable_reasons("eager-bf16", "cuda:0") == [
        "compute capability 7.x has no native bfloat16 (8.0 or newer needed)"]
    assert ab.backend_unavailable_reasons("reference", "cuda:0") == []


def test_a_passing_backend_is_chosen_and_cached(cache, small_check, interpreter, monkeypatch):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*backend auto")
        choice = ab.choose_backend("tiny-cond", "cpu", candidates=("triton", "reference"))
    assert choice.backend == "triton" and not choice.cached
    assert choice.reason.startswith("auto: triton passed self-check on cpu")
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [{"backend": "triton", "reason": choice.reason}]
    key = next(iter(stored))
    assert key.startswith("cpu|torch ") and "|triton " in key and "|duodiff_fast " in key and "tiny-cond" in key
    # the second time: from the cache, no check
    monkeypatch.setattr(ab, "self_check", lambda *a: pytest.fail("the cached choice must not be checked again"))
    again = ab.choose_backend("tiny-cond", "cpu", candidates=("triton", "reference"))
    assert again.backend == "triton" and again.cached and str(cache) in again.reason


def test_a_backend_that_fails_its_check_is_skipped_with_one_warning(cache, small_check, interpreter, monkeypatch):
    monkeypatch.setitem(ab.TOLERANCE, torch.float32, 0.0)  # nothing meets it: the check must fail
    with pytest.warns(RuntimeWarning) as record:
        choice = ab.choose_backend("tiny", "cpu", candidates=("triton", "reference"))
    messages = [str(w.message) for w in record if "backend auto" in str(w.message)]
    assert len(messages) == 1 and "triton failed self-check" in messages[0]
    assert "exceeds the float32 tolerance" in messages[0]
    assert choice.backend == "reference"
    assert "skipped: triton failed self-check" in choice.reason


def test_a_backend_that_cannot_compile_is_skipped_naming_the_error(cache, small_check, monkeypatch):
    from duodiff_fast import backends

    real = backends.prepare_model

    def prepare(model, backend="reference", **kw):
        if backend == "eager-bf16":
            raise RuntimeError("CompilationError: no kernel image for sm_61")
        return real(model, backend, **kw)

    monkeypatch.setattr(backends, "prepare_model", prepare)
    with pytest.warns(RuntimeWarning, match="eager-bf16 failed self-check .*CompilationError: no kernel image"):
        choice = ab.choose_backend("tiny", "cpu", candidates=("eager-bf16", "reference"))
    assert choice.backend == "reference"


def test_unreadable_cache_is_rebuilt_with_a_warning(cache, small_check):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable backend cache"):
        choice = ab.choose_backend("tiny", "cpu", candidates=("eager-bf16", "reference"))
    assert choice.backend == "eager-bf16"  # bf16 eager on CPU passes the bf16 tolerance
    assert json.loads(cache.read_text())  # rewritten whole


def test_a_cpu_only_native_build_is_named_in_the_choice(cache, small_check, monkeypatch):
    from duodiff_fast.ops import availability

    monkeypatch.setattr(availability, "native_unavailable_reason",
                        lambda device=None: "duodiff_fast._C was built without CUDA kernels (CPU-only build)")
    choice = ab.choose_backend("tiny", "cpu", candidates=("reference",))
    assert choice.backend == "reference"
    assert "native ops in PyTorch: duodiff_fast._C was built without CUDA kernels" in choice.reason


@pytest.mark.gpu
def test_auto_on_a_gpu_picks_the_triton_kernels(cache):
    """On an sm_80+ GPU with the kernels installed, triton passes its self-check and is chosen; the
    second resolution comes from the cache."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reasons = ab.backend_unavailable_reasons("triton", "cuda")
    if reasons:
        pytest.skip(f"triton cannot run here: {'; '.join(reasons)}")
    choice = ab.choose_backend("cifar10-s2", "cuda")
    assert choice.backend == "triton", choice.reason
    assert "passed self-check" in choice.reason and torch.cuda.get_device_name() in choice.reason
    assert ab.choose_backend("cifar10-s2", "cuda").cached


def test_the_cache_key_names_the_self_check_version():
    """Choices cached by an older self-check (before DiT ran on triton) are made again."""
    key = ab.cache_key("cpu", "dit-tiny")
    assert f"|check {ab.CHECK_VERSION}|" in key and key.endswith("|dit-tiny")


def test_the_dit_check_model_is_off_adaln_zero_so_a_wrong_block_fails(one_thread):
    """The self-check's DiT is at unit scale: a fresh (adaLN-Zero) DiT would output zeros and pass
    any backend. Leaving out one block must move its output far beyond the bfloat16 tolerance."""
    model = ab._check_model("dit-tiny", torch.device("cpu"))
    assert type(model).__name__ == "DiT" and model.depth == min(ab.CHECK_DEPTH, 4)
    x, t, y = ab._check_inputs(model, torch.device("cpu"))
    with torch.no_grad():
        full = model(x, t, y).double()
        tokens, c = model.embed(x, t, y)
        for blk in model.blocks[:-1]:
            tokens = blk(tokens, c)
        short = model.decode(tokens, c).double()
    assert float(full.norm()) > 0
    assert float((short - full).norm() / full.norm()) > 10 * ab.TOLERANCE[torch.bfloat16]


def test_the_triton_self_check_runs_a_dit_and_catches_a_wrong_block(interpreter, monkeypatch, one_thread):
    """triton passes its self-check on a DiT config; a block kernel that leaves the last block's
    tokens unchanged (one wrong block of four) fails it."""
    from duodiff_fast.models.executor import TritonExecutor

    assert ab.self_check("triton", "dit-tiny", "cpu") < ab.TOLERANCE[torch.float32]

    real = TritonExecutor.adaln_block

    def last_block_wrong(self, blk, x, c):
        out = real(self, blk, x, c)
        return x if getattr(blk, "wrong_on_purpose", False) else out

    make = ab._check_model

    def check_model(config, device):
        model = make(config, device)
        model.blocks[-1].wrong_on_purpose = True  # survives prepare_model's deep copy
        return model

    monkeypatch.setattr(ab, "_check_model", check_model)
    monkeypatch.setattr(TritonExecutor, "adaln_block", last_block_wrong)
    with pytest.raises(AssertionError, match="exceeds"):
        ab.self_check("triton", "dit-tiny", "cpu")
