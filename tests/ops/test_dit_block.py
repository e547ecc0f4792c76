"""ops.dit_block (one DiT block on the Triton kernels) against the DiT equations in float64.

The reference is written here from DiT's block equations (adaLN-Zero, norms without affine,
eps 1e-6, softmax attention over the fused qkv layout, tanh-GELU MLP), not from the package's
models. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ..kernels.conftest import DTYPES, FLOOR, device, poisoned, rel  # noqa: F401 (fixtures)

EPS = 1e-6


def _norm(x, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _gelu_tanh(y):
    return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))


def dit_block_exact(x, mod, p, heads, eps=EPS):
    """The DiT block in float64, written out from its equations."""
    x, mod = x.double(), mod.double()
    p = {k: v.double() for k, v in p.items()}
    b, n, d = x.shape
    hd = d // heads
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (c.unsqueeze(1) for c in mod.chunk(6, 1))
    h = _norm(x, eps) * (1 + scale_msa) + shift_msa
    qkv = h @ p["qkv_w"].T + p["qkv_b"]
    q, k, v = qkv.reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    a = (att @ v).transpose(1, 2).reshape(b, n, d)
    x = x + gate_msa * (a @ p["proj_w"].T + p["proj_b"])
    h = _norm(x, eps) * (1 + scale_mlp) + shift_mlp
    h = _gelu_tanh(h @ p["fc1_w"].T + p["fc1_b"])
    return x + gate_mlp * (h @ p["fc2_w"].T + p["fc2_b"])


def dit_block_eager(x, mod, p, heads, eps=EPS):
    """The same block as eager PyTorch computes it at x's dtype (the error yardstick)."""
    b, n, d = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (c.unsqueeze(1) for c in mod.chunk(6, 1))
    h = F.layer_norm(x, (d,), eps=eps) * (1 + scale_msa) + shift_msa
    q, k, v = F.linear(h, p["qkv_w"], p["qkv_b"]).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + gate_msa * F.linear(a, p["proj_w"], p["proj_b"])
    h = F.layer_norm(x, (d,), eps=eps) * (1 + scale_mlp) + shift_mlp
    h = F.gelu(F.linear(h, p["fc1_w"], p["fc1_b"]), approximate="tanh")
    return x + gate_mlp * F.linear(h, p["fc2_w"], p["fc2_b"])


def _params(d, hidden, g):
    def lin(n_out, k):
        return torch.randn(n_out, k, generator=g) / math.sqrt(k), torch.randn(n_out, generator=g) * 0.1

    p = {}
    for name, (n_out, k) in (("qkv", (3 * d, d)), ("proj", (d, d)), ("fc1", (hidden, d)), ("fc2", (d, hidden))):
        p[f"{name}_w"], p[f"{name}_b"] = lin(n_out, k)
    return p


def _call(x, mod, p, heads, matmul="triton"):
    from duodiff_fast.ops.dit_block import dit_block

    return dit_block(x, mod, p["qkv_w"], p["qkv_b"], p["proj_w"], p["proj_b"], p["fc1_w"], p["fc1_b"],
                     p["fc2_w"], p["fc2_b"], heads, matmul=matmul)


# (B, N, D, heads, hidden): head dims 12 (one masked 16-wide group), 18 (16 + 16, 14 masked) and 32;
# token counts off the tiles (17, 37) and on them (16); an MLP width that is no multiple of 16.
SHAPES = [(2, 17, 48, 4, 96), (3, 16, 72, 4, 288), (1, 37, 64, 2, 100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,d,heads,hidden", SHAPES)
def test_dit_block_matches_the_equations(device, poisoned, dtype, b, n, d, heads, hidden):  # noqa: F811
    g = torch.Generator().manual_seed(hash((b, n, d, heads, hidden)) % 2**31)
    x = torch.randn(b, n, d, generator=g).to(device, dtype)
    mod = torch.randn(b, 6 * d, generator=g).to(device, dtype)  # nonzero: every branch counts
    p = {k: v.to(device, dtype) for k, v in _params(d, hidden, g).items()}
    out = _call(x, mod, p, heads)
    assert out.shape == x.shape
    assert out.dtype == dtype
    exact = dit_block_exact(x, mod, p, heads)
    eager = dit_block_eager(x, mod, p, heads)
    # The kernels' error against float64 is at most twice eager PyTorch's at this dtype. Triton's CPU
    # interpreter stores bfloat16 by truncation (1 ulp, not rounding's 1/2: checked on 1 + 3 * 2^-9,
    # which it stores as 1.0), which doubles every store's error there; on a GPU stores round.
    slack = 2.0 if dtype == torch.bfloat16 and device.type == "cpu" else 1.0
    err, bound = rel(out, exact), 2 * slack * rel(eager, exact) + FLOOR[dtype]
    assert err <= bound, f"dit_block {(b, n, d, heads, hidden)}: error {err:.3g} > bound {bound:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dit_final_tokens_match_the_equations(device, poisoned, dtype):  # noqa: F811
    """FinalLayer before unpatchify: linear(norm(x) * (1 + scale) + shift), shift/scale = mod.chunk(2)."""
    from duodiff_fast.ops.dit_block import dit_final_tokens

    g = torch.Generator().manual_seed(5)
    b, n, d, out = 3, 17, 40, 24  # out = p * p * 2C for p = 2, C = 3
    x = torch.randn(b, n, d, generator=g).to(device, dtype)
    mod = torch.randn(b, 2 * d, generator=g).to(device, dtype)
    w = (torch.randn(out, d, generator=g) / math.sqrt(d)).to(device, dtype)
    bias = torch.randn(out, generator=g).to(device, dtype)
    got = dit_final_tokens(x, mod, w, bias)
    assert got.shape == (b, n, out) and got.dtype == dtype
    shift, scale = (c.unsqueeze(1) for c in mod.double().chunk(2, 1))
    exact = (_norm(x.double(), EPS) * (1 + scale) + shift) @ w.double().T + bias.double()
    shift, scale = (c.unsqueeze(1) for c in mod.chunk(2, 1))
    eager = F.linear(F.layer_norm(x, (d,), eps=EPS) * (1 + scale) + shift, w, bias)
    slack = 2.0 if dtype == torch.bfloat16 and device.type == "cpu" else 1.0  # see above
    err, bound = rel(got, exact), 2 * slack * rel(eager, exact) + FLOOR[dtype]
    assert err <= bound, f"dit_final_tokens: error {err:.3g} > bound {bound:.3g} ({dtype})"
    with pytest.raises(ValueError, match="mod must have shape"):
        dit_final_tokens(x, mod[:, :d], w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cublas_matmuls_compute_the_same_block(device, dtype):  # noqa: F811
    """matmul="cublas" (F.linear with the epilogues in PyTorch) is the same function; it is what
    ``dispatch.set_matmul("cublas")`` selects by default."""
    from duodiff_fast import dispatch

    b, n, d, heads, hidden = SHAPES[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, n, d, generator=g).to(device, dtype)
    mod = torch.randn(b, 6 * d, generator=g).to(device, dtype)
    p = {k: v.to(device, dtype) for k, v in _params(d, hidden, g).items()}
    exact, eager = dit_block_exact(x, mod, p, heads), dit_block_eager(x, mod, p, heads)
    previous = dispatch.matmul_impl()
    dispatch.set_matmul("cublas")
    try:
        out = _call(x, mod, p, heads, matmul=None)
    finally:
        dispatch.set_matmul(previous)
    slack = 2.0 if dtype == torch.bfloat16 and device.type == "cpu" else 1.0  # interpreter truncation
    err, bound = rel(out, exact), 2 * slack * rel(eager, exact) + FLOOR[dtype]
    assert err <= bound, f"dit_block (cublas): error {err:.3g} > bound {bound:.3g} ({dtype})"
    with pytest.raises(ValueError, match="matmul must be"):
        _call(x, mod, p, heads, matmul="cutlass")


def test_zero_modulation_is_the_identity(device):  # noqa: F811
    """adaLN-Zero: with mod = 0 (a fresh DiT) both gates are 0 and the block returns x exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 48, generator=g).to(device)
    p = {k: v.to(device) for k, v in _params(48, 96, g).items()}
    assert torch.equal(_call(x, torch.zeros(2, 6 * 48, device=device), p, 4), x)


def test_bad_arguments_are_named_before_any_launch(device, monkeypatch):  # noqa: F811
    from duodiff_fast.ops import triton_ops

    launched = []
    for name in ("adaln_layernorm", "linear", "attention_qkv", "linear_gated_residual", "linear_gelu_tanh"):
        monkeypatch.setattr(triton_ops, name, lambda *a, **k: launched.append(a))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 48, generator=g).to(device)
    p = {k: v.to(device) for k, v in _params(48, 96, g).items()}
    mod = torch.randn(2, 6 * 48, generator=g).to(device)
    with pytest.raises(ValueError, match="mod must have shape"):
        _call(x, mod[:, :-1], p, 4)
    with pytest.raises(ValueError, match="fc2_weight"):
        _call(x, mod, dict(p, fc2_w=p["fc2_w"][:, :-1]), 4)
    with pytest.raises(ValueError, match="num_heads=5"):
        _call(x, mod, p, 5)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        _call(x[0], mod, p, 4)
    assert launched == []


def test_fake_tensors_give_the_shapes():
    """The composition traces through the custom ops' fake implementations (torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = _params(48, 96, None)
        out = _call(torch.empty(2, 9, 48), torch.empty(2, 288), p, 4)
        assert out.shape == (2, 9, 48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DiT-XL/2 shapes)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dit_xl2_block_on_the_gpu(dtype):
    """DiT-XL/2's block shapes (1152 wide, 16 heads x 72, 256 tokens, MLP 4608) on the GPU's
    compiled kernels (tuned 16-bit tiles), against the equations in float64."""
    from ..conftest import skip_unless_triton_runs

    dev = torch.device("cuda")
    skip_unless_triton_runs(dev)
    g = torch.Generator().manual_seed(7)
    b, n, d, heads = 2, 256, 1152, 16
    x = torch.randn(b, n, d, generator=g).to(dev, dtype)
    mod = (torch.randn(b, 6 * d, generator=g) * 0.5).to(dev, dtype)
    p = {k: v.to(dev, dtype) for k, v in _params(d, 4 * d, g).items()}
    out = _call(x, mod, p, heads)
    exact = dit_block_exact(x, mod, p, heads)
    eager = dit_block_eager(x, mod, p, heads)
    err, bound = rel(out, exact), 2 * rel(eager, exact) + FLOOR[dtype]
    assert err <= bound, f"DiT-XL/2 block: error {err:.3g} > bound {bound:.3g} ({dtype})"
