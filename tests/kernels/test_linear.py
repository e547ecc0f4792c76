"""kernels.linear (bias, GELU, tanh-GELU, residual and gated-residual epilogues; two-input skip_linear)
against eager PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import stable_seed

from .conftest import DTYPES, assert_within_torch_error

SHAPES = [((5,), 24, 40), ((2, 17), 40, 72), ((1, 258), 24, 48)]  # (leading, K, N)


def _reference(x, w, b, epilogue, r, x2, gate=None):
    if x2 is not None:
        x = torch.cat([x, x2], -1)
    y = F.linear(x, w, b)
    if epilogue == "gelu":
        y = F.gelu(y)
    elif epilogue == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))  # the formula
    if gate is not None:
        y = gate.unsqueeze(1) * y
    if r is not None:
        y = r + y
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("epilogue", ["bias", "nobias", "gelu", "gelu_tanh", "residual", "two-input"])
def test_linear_matches_torch(device, poisoned, dtype, lead, k, n, epilogue):
    from duodiff_fast.kernels import linear, linear_reference

    g = torch.Generator().manual_seed(stable_seed(lead, k, n, epilogue))
    k2 = 36 if epilogue == "two-input" else 0
    x = torch.randn(*lead, k, generator=g).to(device, dtype)
    x2 = torch.randn(*lead, k2, generator=g).to(device, dtype) if k2 else None
    w = (torch.randn(n, k + k2, generator=g) / (k + k2) ** 0.5).to(device, dtype)
    b = None if epilogue == "nobias" else torch.randn(n, generator=g).to(device, dtype)
    r = torch.randn(*lead, n, generator=g).to(device, dtype) if epilogue == "residual" else None
    act = epilogue if epilogue in ("gelu", "gelu_tanh") else None
    if act == "gelu_tanh":
        x = x * 2  # reach the tails, where the tanh approximation saturates
    out = linear(x, w, b, activation=act, residual=r, x2=x2)
    assert out.shape == (*lead, n)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    exact = _reference(d(x), d(w), d(b), act, d(r), d(x2))
    torch_low = linear_reference(x, w, b, act, r, x2)
    assert_within_torch_error(out, torch_low, exact, dtype, f"linear {epilogue} {lead}x{k}->{n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,k,n", [(2, 17, 40, 72), (3, 5, 24, 40), (1, 130, 48, 24)])
@pytest.mark.parametrize("chunked", [True, False])
def test_gated_residual_matches_torch(device, poisoned, dtype, b, t, k, n, chunked):
    """``r + gate[:, None, :] * (x @ W^T + b)`` with one gate row per sample (DiT's adaLN-Zero);
    the gate either a strided chunk of a (B, 6N) adaLN output or a (B, N) tensor. Tiles span
    several samples (t = 5, 17) and samples span several tiles (t = 130)."""
    from duodiff_fast.kernels import linear, linear_reference

    g = torch.Generator().manual_seed(hash((b, t, k, n, chunked)) % 2**31)
    x = torch.randn(b, t, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    r = torch.randn(b, t, n, generator=g).to(device, dtype)
    if chunked:
        gate = torch.randn(b, 6 * n, generator=g).to(device, dtype).chunk(6, dim=1)[2]
    else:
        gate = torch.randn(b, n, generator=g).to(device, dtype)
    out = linear(x, w, bias, residual=r, gate=gate)
    assert out.shape == (b, t, n)
    d = lambda t_: t_.double()  # noqa: E731
    exact = _reference(d(x), d(w), d(bias), None, d(r), None, d(gate))
    torch_low = linear_reference(x, w, bias, residual=r, gate=gate)
    assert_within_torch_error(out, torch_low, exact, dtype, f"gated linear {b}x{t}x{k}->{n}")


def test_gelu_tanh_differs_from_erf_gelu(device):
    """The two GELUs differ by up to ~5e-4 near |x| = 2: the tanh one is not the erf one."""
    from duodiff_fast.kernels import linear

    x = torch.linspace(-4, 4, 64, dtype=torch.float64).reshape(64, 1).float().to(device)
    eye = torch.ones(1, 1, device=device)
    tanh = linear(x, eye, activation="gelu_tanh").double().cpu()
    erf = linear(x, eye, activation="gelu").double().cpu()
    xd = x.double().cpu()
    torch.testing.assert_close(tanh, F.gelu(xd, approximate="tanh"), rtol=0, atol=2e-6)
    torch.testing.assert_close(erf, F.gelu(xd), rtol=0, atol=2e-6)
    assert (tanh - erf).abs().max() > 1e-4


def test_linear_rejects_bad_arguments(device):
    from duodiff_fast.kernels import linear

    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="activation"):
        linear(x, torch.randn(4, 8, device=device), activation="relu")
    with pytest.raises(ValueError, match="input features"):
        linear(x, torch.randn(4, 9, device=device))
    x3, w = torch.randn(2, 3, 8, device=device), torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="pass residual"):
        linear(x3, w, gate=torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="gate must be"):
        linear(x3, w, residual=torch.randn(2, 3, 4, device=device), gate=torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match=r"\(B, N, K\)"):
        linear(x, w, residual=torch.randn(3, 4, device=device), gate=torch.randn(3, 4, device=device))


@pytest.mark.parametrize("blocks", __import__("duodiff_fast.kernels.linear", fromlist=["x"]).TUNING_CONFIGS)
def test_every_autotune_tile_computes_the_same(device, poisoned, blocks):
    """Each candidate tile of the GPU autotuner, forced, on an odd shape (two-input + bias)."""
    from duodiff_fast.kernels import linear

    g = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(37, 24, generator=g), torch.randn(37, 40, generator=g)
    w, b = torch.randn(72, 64, generator=g) / 8, torch.randn(72, generator=g)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # the tiles target 16-bit on GPUs
    x, x2, w, b = (t.to(device, dtype) for t in (x, x2, w, b))
    out = linear(x, w, b, x2=x2, blocks=blocks)
    ref = torch.nn.functional.linear(torch.cat([x, x2], -1).double(), w.double(), b.double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (out.double() - ref).abs().max().item() < tol


# ---- tuning keys, buckets and the CUDA-graph capture rule (pure logic, no GPU) -------------------
def _lin():
    import importlib

    return importlib.import_module("duodiff_fast.kernels.linear")


def test_m_bucket_rounds_rows_up_to_powers_of_two():
    lin = _lin()
    assert [lin.m_bucket(m) for m in (1, 16, 17, 257, 512, 513, 256 * 258)] == [16, 16, 32, 512, 512, 1024, 131072]


def test_tuning_key_buckets_rows_and_keeps_epilogue_flags():
    lin = _lin()
    key = lambda m, **f: lin.tuning_key(m, 1024, 1024, 0, torch.bfloat16, **{**dict(bias=True, gelu=False,  # noqa: E731
                                                                              residual=False), **f})
    assert key(200 * 258) == key(250 * 258)            # shrinking batch: one bucket, one tuning
    assert key(100 * 258) != key(250 * 258)
    assert len({key(258), key(258, gelu=True), key(258, residual=True), key(258, bias=False),
                key(258, gelu_tanh=True), key(258, residual=True, gate=True)}) == 6
    two_input = lin.tuning_key(258, 1024, 1024, 1024, torch.bfloat16, bias=True, gelu=False, residual=False)
    assert two_input != key(258) and two_input[-1] is True
    assert lin.tuning_key(258, 1024, 1024, 0, torch.float16, bias=True, gelu=False, residual=False) != key(258)


@pytest.fixture
def clean_tuning():
    lin = _lin()
    lin.clear_tuning()
    yield lin
    lin.clear_tuning()


def _capture(monkeypatch, capturing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)


def test_no_benchmark_while_a_stream_is_capturing(monkeypatch, clean_tuning):
    lin = clean_tuning
    _capture(monkeypatch, True)
    key = lin.tuning_key(1000, 512, 512, 0, torch.bfloat16, bias=True, gelu=True, residual=False)
    calls = []
    cfg = lin.select_config(key, 1000, torch.bfloat16, lambda: calls.append(1) or (64, 64, 64, 4, 5))
    assert calls == [] and cfg == lin.default_config(1000, torch.bfloat16)
    assert lin.tuned_configs() == {}                    # the fallback is not remembered as tuned
    with pytest.raises(RuntimeError, match="captured"):
        lin.tune(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16))


def test_tuned_once_per_bucket_and_used_inside_capture(monkeypatch, clean_tuning):
    lin = clean_tuning
    _capture(monkeypatch, False)
    calls = []
    tuner = lambda: calls.append(1) or (64, 128, 64, 4, 4)  # noqa: E731
    key = lambda m: lin.tuning_key(m, 512, 512, 0, torch.bfloat16, bias=True, gelu=False, residual=True)  # noqa: E731
    assert lin.select_config(key(1000), 1000, torch.bfloat16, tuner) == (64, 128, 64, 4, 4)
    assert lin.select_config(key(900), 900, torch.bfloat16, tuner) == (64, 128, 64, 4, 4)
    assert calls == [1]                                 # 900 and 1000 rows share the 1024 bucket
    _capture(monkeypatch, True)
    assert lin.select_config(key(1000), 1000, torch.bfloat16, tuner) == (64, 128, 64, 4, 4)
    assert calls == [1]


def test_tune_refuses_where_tuning_does_not_apply(clean_tuning):
    with pytest.raises(RuntimeError, match="float16/bfloat16 on a GPU"):
        clean_tuning.tune(torch.randn(4, 8), torch.randn(4, 8))


def test_heavy_epilogues_skip_tiles_that_spill():
    lin = _lin()
    plain = lin.candidate_configs(4096, torch.bfloat16, interpret=False)
    gelu = lin.candidate_configs(4096, torch.bfloat16, interpret=False, gelu=True)
    res = lin.candidate_configs(4096, torch.bfloat16, interpret=False, residual=True)
    assert set(lin.TUNING_CONFIGS) <= set(plain) and gelu == res
    assert (128, 256, 64, 8, 3) in plain and (128, 256, 64, 8, 3) not in gelu
    assert all(lin.acc_registers(c) <= lin.HEAVY_EPILOGUE_MAX_ACC_REGS for c in gelu) and len(gelu) >= 4
    assert lin.default_config(4096, torch.bfloat16, interpret=False) in gelu
    assert lin.candidate_configs(4096, torch.float32, interpret=False) == [lin.default_config(4096, torch.float32,
                                                                                              interpret=False)]
