"""The EDM U-Nets on the reference, eager-bf16 and torch.compile backends; triton refused by name."""
import pytest
import torch

from duodiff_fast.edm import build_edm_net, get_edm_config
from duodiff_fast.edm.backends import prepare_edm_net
from tests.conftest import rel_err


def _net(name):
    torch.manual_seed(0)
    net = build_edm_net(get_edm_config(name)).eval()
    with torch.no_grad():  # weights off their near-zero-output init, so F matters in D
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("name,backend,tol", [
    ("edm-tiny-ddpmpp", "reference", 1e-6), ("multistage-tiny-ddpmpp", "reference", 1e-6),
    ("edm-tiny-ddpmpp", "eager-bf16", 3e-2), ("multistage-tiny-ddpmpp", "eager-bf16", 3e-2),
    # one Dynamo trace on the CPU (the multistage net: its stage choice is a graph break)
    ("multistage-tiny-ddpmpp", "torch.compile", 3e-2)])
def test_backends_compute_the_same_function(name, backend, tol, one_thread):
    net = _net(name)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # Dynamo traces the U-Net here; inductor's C++ build takes minutes on a CPU (run on the GPU below).
    fast = prepare_edm_net(net, backend, compile_backend="eager")
    assert next(net.parameters()).dtype == torch.float32  # the caller's net is left alone
    for sigma in (0.05, 3.0, 40.0):
        s = torch.full((2,), sigma)
        with torch.no_grad():
            ref, out = net(x, s), fast(x, s)
        assert out.dtype == torch.float32
        # compare the network part F (D minus the exact c_skip x term), where bf16 error shows
        skip = 0.25 / (sigma ** 2 + 0.25) * x
        assert rel_err(out - skip, ref - skip) < tol, (backend, sigma)


def test_triton_refused():
    with pytest.raises(ValueError, match="U-ViT transformer kernels"):
        prepare_edm_net(_net("edm-tiny-ddpmpp"), "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        prepare_edm_net(_net("edm-tiny-ddpmpp"), "tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (inductor + cuDNN, channels-last)")
@pytest.mark.parametrize("name", ["edm-tiny-ddpmpp", "multistage-tiny-ddpmpp"])
@pytest.mark.parametrize("backend", ["eager-bf16", "torch.compile"])
def test_gpu_backends(name, backend):
    net = _net(name)
    fast = prepare_edm_net(net, backend, torch.device("cuda"))
    assert fast.channels_last
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for sigma in (0.05, 3.0, 40.0):
        s = torch.full((2,), sigma)
        with torch.no_grad():
            ref, out = net(x, s), fast(x.cuda(), s.cuda()).cpu()
        skip = 0.25 / (sigma ** 2 + 0.25) * x
        assert rel_err(out - skip, ref - skip) < 3e-2, (backend, sigma)
