"""duodiff_fast.backends.prepare_model's torch.compile backend on a DiT (CPU, inductor's C++ path).

The compiled forward of dit-tiny (bfloat16, as the backend prepares it) must compute what the
float32 reference computes, to bfloat16 accuracy, on the whole output (eps and the variance value)
at mixed timesteps, and it must really be compiled (dynamo produced a graph). About 20 s on one core.
"""
import pytest
import torch

from duodiff_fast.backends import prepare_model
from duodiff_fast.methods import ModelDenoiser
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm
from tests.conftest import HAS_CXX_COMPILER, rel_err


def _dit_tiny():
    torch.manual_seed(0)
    m = create_model("dit-tiny")
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # off adaLN-Zero: every output channel depends on the input
    return m.eval()


@pytest.mark.skipif(not HAS_CXX_COMPILER, reason="inductor's CPU backend needs a C++ compiler")
def test_torch_compile_dit_matches_the_reference():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _dit_tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.5, 0.95])
    y = torch.tensor([1, 4, 9])
    compiled = ModelDenoiser(prepare_model(model, "torch.compile"), linear_ddpm())
    reference = ModelDenoiser(prepare_model(model, "reference"), linear_ddpm())
    with torch.no_grad():
        out, ref = compiled.output(x, t, y), reference.output(x, t, y)
        again = compiled.output(x.flip(0), t.flip(0), y.flip(0))  # the same compiled graph, other inputs
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the forward (not a silent eager run)
    assert out.shape == (3, 8, 8, 8) and out.dtype == torch.float32
    assert rel_err(out, ref) < 2e-2  # bfloat16 weights and activations vs float32
    assert rel_err(again, ref.flip(0)) < 2e-2
    assert model.final_layer.linear.weight.dtype == torch.float32  # the caller's model is left as it was
