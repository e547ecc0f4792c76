"""runtime.graphs: which errors count as a capture failure (and name the op that broke it), static
buffers that work in and out of inference_mode, capture on the sampler's device (issue 20, parts 1, 4)."""
import warnings

import pytest
import torch

from duodiff_fast.runtime import graphs
from duodiff_fast.runtime.graphs import GraphSampler, capture_failure, fill_static_inputs, static_buffer
from duodiff_fast.samplers.constants import GraphUnsafe
from duodiff_fast.schedules import linear_ddpm
from tests.conftest import raised as _raised


def _den(x, t, y=None):
    return torch.tanh(0.3 * x + 0.5 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype))


def test_capture_failure_names_the_op_of_the_package_that_broke_it():
    from duodiff_fast.samplers import constants

    table = constants.ConstantTable()
    table.recording = False
    err = _raised(lambda: table.get(("const", (1.0,), "cuda:0", torch.float64), lambda: None))
    why = capture_failure(err)
    assert why is not None
    assert "samplers/constants.py" in why and "in get" in why and "GraphUnsafe" in why


def test_errors_that_say_the_stream_was_capturing_are_capture_failures():
    err = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    assert capture_failure(err) is not None
    wrapped = RuntimeError("Triton kernel _linear_kernel failed to compile or launch")
    wrapped.__cause__ = err
    assert capture_failure(wrapped) is not None  # a launch refused *because* of the capture


def test_real_errors_are_not_capture_failures():
    assert capture_failure(RuntimeError("Triton kernel _linear_kernel failed to compile or launch "
                                        "(CompilationError: ...)")) is None
    assert capture_failure(ValueError("x has 3 channels, the model 4")) is None


@pytest.fixture
def fake_cuda_sampler(monkeypatch):
    """A CPU GraphSampler that believes it captures graphs, with capture() replaced per test."""
    s = GraphSampler(_den, linear_ddpm(), (2, 4, 4), solver="ddim", num_steps=3, device="cpu")
    monkeypatch.setattr(s, "uses_graphs", lambda: True)
    return s


def test_a_capture_failure_warns_once_naming_it_and_runs_the_plain_loop(fake_cuda_sampler, monkeypatch):
    s = fake_cuda_sampler

    def capture(key):
        raise GraphUnsafe("device constant ('const', (0.5,)) was not recorded before capture")

    monkeypatch.setattr(s, "capture", capture)
    with pytest.warns(RuntimeWarning, match="capture failed .* at .*GraphUnsafe"):
        out = s([1, 2])
    torch.testing.assert_close(out, s.plain([1, 2]), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key is remembered: no second warning, no second try
        s([1, 2])


@pytest.mark.parametrize("error", [ValueError("bad shapes"), RuntimeError("Triton kernel _k failed to launch")])
def test_a_real_error_during_capture_propagates(fake_cuda_sampler, monkeypatch, error):
    s = fake_cuda_sampler

    def capture(key):
        raise error

    monkeypatch.setattr(s, "capture", capture)
    with pytest.raises(type(error), match=str(error)):
        s([1, 2])
    assert not s.failed  # not recorded as a capture failure either


@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_static_buffers_take_writes_in_both_modes(first_in_inference_mode):
    """Buffers made by the first call (in inference_mode or not) accept a later call in the other mode."""

    def make():
        seeds = static_buffer(lambda: torch.zeros(4, dtype=torch.int64))
        y = static_buffer(lambda: torch.zeros(4, dtype=torch.long))
        return graphs._Captured(None, seeds, y, static_buffer(lambda: torch.zeros(4, 2)), None)

    if first_in_inference_mode:
        with torch.inference_mode():
            entry = make()
            fill_static_inputs(entry, torch.tensor([5, 6]), torch.tensor([1, 2]))
        fill_static_inputs(entry, torch.tensor([7, 8, 9]), torch.tensor([3, 3, 3]))
    else:
        entry = make()
        fill_static_inputs(entry, torch.tensor([5, 6]), torch.tensor([1, 2]))
        with torch.inference_mode():
            fill_static_inputs(entry, torch.tensor([7, 8, 9]), torch.tensor([3, 3, 3]))
    assert entry.seeds.tolist() == [7, 8, 9, 0] and entry.y.tolist() == [3, 3, 3, 0]
    assert not entry.seeds.is_inference()


def test_a_tensor_made_in_inference_mode_would_refuse_the_write():
    """Why static_buffer exists: the plain allocation in inference_mode fails the later copy_."""
    with torch.inference_mode():
        buf = torch.zeros(2)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        buf.copy_(torch.ones(2))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("first_in_inference_mode", [True, False])
def test_graph_sampler_both_orders_of_inference_mode_gpu(first_in_inference_mode):
    s = GraphSampler(_den, linear_ddpm(), (2, 4, 4), solver="ddim", num_steps=4, device="cuda")
    first = torch.inference_mode() if first_in_inference_mode else torch.no_grad()
    second = torch.no_grad() if first_in_inference_mode else torch.inference_mode()
    with first:
        a = s([1, 2])
    with second:
        b = s([1, 2, 3])
    assert s.graphs and not s.failed
    torch.testing.assert_close(b[:2], a)
    torch.testing.assert_close(b, s.plain([1, 2, 3]), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_graph_sampler_captures_on_the_second_gpu():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    torch.cuda.set_device(0)
    s = GraphSampler(_den, linear_ddpm(), (2, 4, 4), solver="ddim", num_steps=4, device="cuda:1")
    out = s([1, 2])
    assert s.graphs and not s.failed and out.device == torch.device("cuda", 1)
    torch.testing.assert_close(out, s.plain([1, 2]), rtol=1e-5, atol=1e-5)
    assert torch.cuda.current_device() == 0


def test_the_sampler_device_must_be_the_models():
    """Graphs are captured on the model's device: a sampler on another device is refused up front."""
    from duodiff_fast.methods import ModelDenoiser
    from duodiff_fast.models import create_model
    from duodiff_fast.runtime.graphs import denoiser_device

    den = ModelDenoiser(create_model("tiny", depth=0), linear_ddpm())
    assert denoiser_device(den) == torch.device("cpu") and denoiser_device(_den) is None
    GraphSampler(den, linear_ddpm(), (4, 16, 16), device="cpu")
    with pytest.raises(ValueError, match="model is on cpu but the sampler on cuda:1"):
        GraphSampler(den, linear_ddpm(), (4, 16, 16), device="cuda:1")
