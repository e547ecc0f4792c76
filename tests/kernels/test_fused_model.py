"""The whole U-ViT on the "triton" backend: golden file, bf16 error bound, methods, autograd path.

CPU runs use Triton's interpreter with the small golden/tiny models; the GPU test (skipped with a
reason without CUDA) runs a paper-sized model in bfloat16 against the float32 reference.
"""
import copy

import pytest
import torch

from duodiff_fast import dispatch
from duodiff_fast.backends import prepare_model
from duodiff_fast.models import create_model
from duodiff_fast.models.fused import FusedUViT
from duodiff_fast.models.uvit import UViT
from duodiff_fast.validation import inputs_validated

from ..conftest import (backend_dtype, device_or_skip, lowp_torch_backend, rel_err, skip_unless_triton_runs,
                        within_torch_error)


@pytest.fixture
def matmul():
    """Restore the dispatch's matmul choice after a test changes it."""
    before = dispatch.matmul_impl()
    yield dispatch.set_matmul
    dispatch.set_matmul(before)


@pytest.mark.parametrize("case,impl", [("pixel", "triton"), ("latent", "triton"), ("latent", "cublas")])
def test_triton_backend_matches_golden(device, golden, matmul, case, impl):
    c = golden[case]
    model = UViT(**c["config"])
    model.load_state_dict(c["state_dict"])
    matmul(impl)
    fused = prepare_model(model.to(device), "triton")
    assert isinstance(fused, FusedUViT) and fused.active_backend(c["x"].to(device)) == "triton"
    with torch.no_grad():
        out = fused(c["x"].to(device), c["timesteps"].to(device),
                    c["y"].to(device) if "y" in c else None)
    assert out.shape == c["out"].shape
    if device.type == "cpu":
        assert rel_err(out.cpu(), c["out"]) < 1e-5
        return
    # bfloat16 on the GPU: the tolerance rule against the golden model in float64, whose own result
    # must match the golden output (float32 official code) to float32 accuracy first.
    args = (c["x"].to(device), c["timesteps"].to(device), c["y"].to(device) if "y" in c else None)
    with torch.no_grad():
        exact = prepare_model(model, "reference").double()(args[0].double(), *args[1:])
        eager = prepare_model(model, "eager-bf16")(args[0].bfloat16(), *args[1:])
    assert rel_err(exact.cpu(), c["out"]) < 1e-5
    within_torch_error(out, eager, exact, torch.bfloat16, f"golden {case} on triton ({impl})")


def _bf16_bound_check(model, x, t, y):
    """The tolerance rule: triton bf16 error against the float64 reference <= 2x eager PyTorch's bf16 error."""
    exact_model = prepare_model(model, "reference").double()
    eager = prepare_model(model, "eager-bf16")
    fused = FusedUViT(copy.deepcopy(model).eval().to(torch.bfloat16).requires_grad_(False), backend="triton")
    with torch.no_grad():
        exact = exact_model(x.double(), t, y)
        within_torch_error(fused(x.bfloat16(), t, y), eager(x.bfloat16(), t, y), exact, torch.bfloat16,
                           f"{type(model).__name__} on triton ({dispatch.matmul_impl()} matmuls)")


def test_bf16_within_twice_torch_error_interpreter(device):
    if device.type != "cpu":
        pytest.skip("CPU interpreter variant (the GPU variant is test_bf16_on_gpu)")
    torch.manual_seed(0)
    # tiny-cond, not tiny-latent: the reference UViT's eager-bf16 path cannot run mlp_time_embed
    # models (it feeds the float32 sinusoid to the bfloat16 time MLP).
    model = create_model("tiny-cond")
    x = torch.randn(2, 3, 16, 16)
    _bf16_bound_check(model, x, torch.tensor([10.0, 500.0]), torch.tensor([3, 10]))


@pytest.mark.gpu
@pytest.mark.parametrize("config,batch", [("tiny-cond", 4), ("imagenet64-m4", 8), ("imagenet256-l2", 4)])
def test_bf16_on_gpu(config, batch):
    skip_unless_triton_runs(device_or_skip("cuda"))
    torch.manual_seed(0)
    model = create_model(config).cuda()
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device="cuda")
    t = torch.rand(batch, device="cuda") * 999
    y = torch.randint(0, model.num_classes, (batch,), device="cuda") if model.is_conditional else None
    for impl in dispatch.MATMUL_CHOICES:
        before = dispatch.matmul_impl()
        dispatch.set_matmul(impl)
        try:
            _bf16_bound_check(model, x, t, y)
        finally:
            dispatch.set_matmul(before)


def test_methods_run_on_triton_backend(device):
    """DuoDiff (both backbones) and classifier-free guidance sample the same on both backends."""
    from duodiff_fast.methods import DuoDiff
    from duodiff_fast.samplers import ClassifierFreeGuidance, sample
    from duodiff_fast.schedules import linear_ddpm

    torch.manual_seed(0)
    full, shallow = create_model("tiny-latent").to(device), create_model("tiny-latent-shallow").to(device)
    schedule = linear_ddpm()
    y = torch.tensor([1, 5], device=device)
    outs = {}
    lowp = lowp_torch_backend("triton", device)
    for backend in ("float64", lowp, "triton"):
        prep = (lambda m: prepare_model(m, "reference").double()) if backend == "float64" else \
            (lambda m, b=backend: prepare_model(m, b))
        duo = DuoDiff(prep(shallow), prep(full), schedule, t_s=500)
        cfg = ClassifierFreeGuidance(duo, 1.5, full.null_class)
        with torch.no_grad():
            # the solver state stays float32 (as every backend keeps it); the float64 model casts
            outs[backend] = sample(cfg, schedule, (2, 4, 8, 8), solver="ddim", num_steps=2, y=y, base_seed=0,
                                   device=device, progress=False)
    within_torch_error(outs["triton"], outs[lowp], outs["float64"], backend_dtype("triton", device),
                       f"DuoDiff sampling on triton ({device.type})")


def test_gradients_use_the_autograd_path(device):
    torch.manual_seed(0)
    model = create_model("tiny-latent").to(device).train()
    fused = FusedUViT(model)
    x = torch.randn(2, 4, 8, 8, device=device)
    t, y = torch.tensor([3.0, 7.0], device=device), torch.tensor([0, 2], device=device)
    assert fused.active_backend(x) == "torch"          # parameters require grad
    fused(x, t, y).square().mean().backward()
    assert model.pos_embed.grad is not None
    with torch.no_grad():
        assert fused.active_backend(x) == "triton"
        out = fused(x, t, y)
    model.eval()
    with torch.no_grad():
        ref = model(x, t, y)
    # on a GPU the reference's patch-embedding conv may run in TF32 (cuDNN's default)
    assert rel_err(out, ref) < (1e-5 if device.type == "cpu" else 5e-3)
    # the wrapper exposes the model's interface and parameters (no copies)
    assert fused.in_chans == 4 and fused.img_size == 8 and fused.patch_size == 2
    assert fused.is_conditional and fused.null_class == model.null_class
    assert {id(p) for p in fused.parameters()} == {id(p) for p in model.parameters()}
    assert copy.deepcopy(fused).in_chans == 4  # copies (prepare_model) keep the interface


def _cuda_fused(config="tiny-cond", batch=4):
    skip_unless_triton_runs(device_or_skip("cuda"))
    torch.manual_seed(0)
    model = create_model(config).cuda()
    fused = prepare_model(model, "triton")
    x = torch.randn(batch, model.in_chans, model.img_size, model.img_size, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(batch, device="cuda") * 999
    y = torch.randint(0, model.num_classes - 1, (batch,), device="cuda") if model.is_conditional else None
    return fused, x, t, y


@pytest.mark.gpu
def test_cuda_graph_capture_replays_the_fused_forward():
    fused, x, t, y = _cuda_fused()
    with torch.no_grad():
        eager = fused(x, t, y)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (Triton compiles outside the capture)
                fused(x, t, y)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), inputs_validated():
            captured = fused(x, t, y)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, fused(x, t, y))
        assert not torch.equal(captured, eager)


@pytest.mark.gpu
def test_torch_compile_inductor_over_the_custom_ops():
    fused, x, t, y = _cuda_fused()
    compiled = torch.compile(fused, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), fused(x, t, y), rtol=2e-2, atol=2e-2)
