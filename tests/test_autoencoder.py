"""Tests for the Stable Diffusion KL-f8 autoencoder (duodiff_fast.autoencoder)."""
import pytest
import torch

from duodiff_fast.autoencoder import (
    SD_KL_F8_DDCONFIG,
    AutoencoderKL,
    CheckpointError,
    extract_autoencoder_state_dict,
    infer_ddconfig,
)
from tests.conftest import golden_path


@pytest.fixture(scope="module")
def ae_golden():
    """The golden ``autoencoder`` entry, or skip with the reason when it is absent."""
    path = golden_path()
    if not path.is_file():
        pytest.skip(f"golden file not found at {path} (set DUODIFF_GOLDEN to its path)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "autoencoder" not in data:
        pytest.skip(f"golden file {path} has no 'autoencoder' entry")
    return data["autoencoder"]


@pytest.fixture(scope="module")
def ae(ae_golden):
    """The golden-config autoencoder with the golden weights (frozen, eval)."""
    g = ae_golden
    model = AutoencoderKL(g["ddconfig"], g["embed_dim"], g["scale_factor"])
    model.load_state_dict(g["state_dict"], strict=True)
    return model.eval().requires_grad_(False)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _factor(ddconfig):
    return 2 ** (len(ddconfig["ch_mult"]) - 1)


# ---- golden -----------------------------------------------------------------------------------
def test_state_dict_keys_and_shapes_equal_original(ae, ae_golden):
    own = ae.state_dict()
    ref = ae_golden["state_dict"]
    assert set(own) == set(ref)
    assert all(tuple(own[k].shape) == tuple(ref[k].shape) for k in ref)


def test_decode_matches_golden(ae, ae_golden):
    g = ae_golden
    with torch.no_grad():
        out = ae.decode(g["z"])
    assert out.shape == g["decoded"].shape
    assert out.dtype == torch.float32
    err = _rel(out, g["decoded"])
    assert err < 1e-5, f"relative error {err:.3e}"


def test_infer_ddconfig_recovers_golden_config(ae_golden):
    g = ae_golden
    cfg, embed_dim = infer_ddconfig(g["state_dict"], resolution=g["ddconfig"]["resolution"])
    assert embed_dim == g["embed_dim"]
    for k in ("double_z", "z_channels", "in_channels", "out_ch", "ch", "num_res_blocks"):
        assert cfg[k] == g["ddconfig"][k], k
    assert list(cfg["ch_mult"]) == list(g["ddconfig"]["ch_mult"])
    assert list(cfg["attn_resolutions"]) == list(g["ddconfig"]["attn_resolutions"])


# ---- shapes, chunking, sampling -----------------------------------------------------------------
def test_encode_decode_shapes(ae, ae_golden):
    cfg = ae_golden["ddconfig"]
    f = _factor(cfg)
    x = torch.rand(1, cfg["in_channels"], 64, 64) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (1, ae_golden["embed_dim"], 64 // f, 64 // f)
        if cfg["ch_mult"] == [1, 2, 4, 4] and ae_golden["embed_dim"] == 4:
            assert z.shape == (1, 4, 8, 8)
        y = ae.decode(z)
        assert y.shape == (1, cfg["out_ch"], 64, 64)
        # the latents are the posterior mean times scale_factor
        mean, logvar = ae.encode_moments(x)
        torch.testing.assert_close(z, mean * ae_golden["scale_factor"])
        assert logvar.shape == mean.shape


def test_encode_sampling_uses_generator(ae, ae_golden):
    cfg = ae_golden["ddconfig"]
    side = 2 * _factor(cfg)
    x = torch.rand(2, cfg["in_channels"], side, side) * 2 - 1
    with torch.no_grad():
        assert ae(x).shape == (2, cfg["out_ch"], side, side)  # forward = reconstruction
        mean = ae.encode(x)
        s1 = ae.encode(x, generator=torch.Generator().manual_seed(0))
        s2 = ae.encode(x, generator=torch.Generator().manual_seed(0))
        s3 = ae.encode(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.equal(s1, s3)
    assert not torch.equal(s1, mean)


def test_chunked_decode_equals_unchunked(ae, ae_golden):
    g = ae_golden
    z = torch.randn(3, g["embed_dim"], 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = ae.decode(z, batch_size=None)
        for bs in (1, 2, 64):
            part = ae.decode(z, batch_size=bs)
            assert part.shape == full.shape
            assert _rel(part, full) < 1e-5, bs
        # chunked encode too
        x = full.clamp(-1, 1)
        assert _rel(ae.encode(x, batch_size=2), ae.encode(x)) < 1e-5


def test_decode_empty_batch_and_dtype(ae, ae_golden):
    g = ae_golden
    f = _factor(g["ddconfig"])
    h, w = g["z"].shape[2:]
    out = ae.decode(torch.zeros(0, g["embed_dim"], h, w))
    assert out.shape == (0, g["ddconfig"]["out_ch"], h * f, w * f)
    with torch.no_grad():
        out64 = ae.decode(g["z"].double())
    assert out64.dtype == torch.float64  # output follows the latents' dtype
    assert _rel(out64, g["decoded"]) < 1e-5


def test_frozen_model_builds_no_graph(ae_golden):
    g = ae_golden
    model = AutoencoderKL.from_state_dict(g["state_dict"], g["ddconfig"], g["embed_dim"], g["scale_factor"])
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.decode(g["z"][:, :, :2, :2]).requires_grad


def test_to_uint8():
    x = torch.tensor([[[[-2.0, -1.0, 0.0, 1.0, 3.0]]]])
    assert AutoencoderKL.to_uint8(x).tolist() == [[[[0, 0, 128, 255, 255]]]]


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(ae, ae_golden):
    g = ae_golden
    e, c = g["embed_dim"], g["ddconfig"]["in_channels"]
    with pytest.raises(ValueError, match=f"must have {e} channels"):
        ae.decode(torch.randn(1, e + 1, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        ae.decode(torch.zeros(1, e, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ae.decode([[0.0]])
    with pytest.raises(ValueError, match=r"shape \(B,"):
        ae.decode(torch.randn(e, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        ae.decode(torch.randn(1, e, 4, 4), batch_size=0)
    with pytest.raises(ValueError, match=f"must have {c} channels"):
        ae.encode(torch.randn(1, c + 2, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        ae.encode(torch.zeros(1, c, 32, 32, dtype=torch.uint8))
    f = _factor(g["ddconfig"])
    if f > 1:
        with pytest.raises(ValueError, match="multiples of"):
            ae.encode(torch.randn(1, c, 32 + 1, 32))


def test_bad_configs():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(dict(SD_KL_F8_DDCONFIG, ch=32, double_z=False), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        AutoencoderKL(dict(SD_KL_F8_DDCONFIG, ch=48), 4)
    with pytest.raises(ValueError, match="missing"):
        AutoencoderKL({"ch": 32}, 4)


# ---- checkpoints --------------------------------------------------------------------------------
def _assert_same_weights(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    assert all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", ["plain.pt", "plain.safetensors", "ldm.ckpt", "first_stage.ckpt"])
def test_from_checkpoint_round_trip(tmp_path, ae_golden, layout):
    g = ae_golden
    sd = g["state_dict"]
    path = tmp_path / layout
    if layout == "plain.pt":
        torch.save(sd, path)
    elif layout == "plain.safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif layout == "ldm.ckpt":  # the original latent-diffusion .ckpt layout, with loss weights
        torch.save({"state_dict": {**sd, "loss.x": torch.zeros(3), "loss.logvar": torch.zeros(())},
                    "global_step": 7}, path)
    else:  # full LDM model checkpoint: autoencoder under first_stage_model.
        full = {f"first_stage_model.{k}": v for k, v in sd.items()}
        full["model.diffusion_model.w"] = torch.zeros(2)
        torch.save({"state_dict": full}, path)
    # ddconfig given, or inferred from the weights
    ddconfig = None if layout in ("plain.safetensors", "ldm.ckpt") else g["ddconfig"]
    model = AutoencoderKL.from_checkpoint(path, ddconfig=ddconfig, scale_factor=g["scale_factor"])
    _assert_same_weights(model, sd)
    assert model.embed_dim == g["embed_dim"] and model.scale_factor == g["scale_factor"]
    if layout == "ldm.ckpt":
        with torch.no_grad():
            assert _rel(model.decode(g["z"]), g["decoded"]) < 1e-5


def test_from_checkpoint_reports_missing_and_unexpected_keys(tmp_path, ae_golden):
    g = ae_golden
    sd = dict(g["state_dict"])
    dropped = "decoder.conv_out.bias"
    del sd[dropped]
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        AutoencoderKL.from_checkpoint(path, ddconfig=g["ddconfig"])
    msg = str(info.value)
    assert "missing keys" in msg and dropped in msg
    assert "unexpected keys" in msg and "decoder.extra.weight" in msg
    assert str(path) in msg


def test_from_checkpoint_reports_shape_mismatch(tmp_path, ae_golden):
    g = ae_golden
    path = tmp_path / "ae.pt"
    torch.save(g["state_dict"], path)
    wrong = dict(g["ddconfig"], ch=g["ddconfig"]["ch"] * 2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        AutoencoderKL.from_checkpoint(path, ddconfig=wrong)


def test_from_checkpoint_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "unet.pt"
    torch.save({"model.diffusion_model.w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        AutoencoderKL.from_checkpoint(path)
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        AutoencoderKL.from_checkpoint(bad)


def test_linear_attention_weights_are_reshaped(ae_golden):
    sd = dict(ae_golden["state_dict"])
    k = "decoder.mid.attn_1.q.weight"
    sd[k] = sd[k][:, :, 0, 0]
    out = extract_autoencoder_state_dict(sd)
    assert torch.equal(out[k], ae_golden["state_dict"][k])


# ---- architecture ---------------------------------------------------------------------------------
def test_sd_kl_f8_config(ae_golden):
    model = AutoencoderKL.sd_kl_f8()
    assert model.ddconfig == SD_KL_F8_DDCONFIG
    assert model.embed_dim == 4 and model.scale_factor == 0.18215 and model.downsample_factor == 8
    sd = model.state_dict()
    assert tuple(sd["encoder.conv_in.weight"].shape) == (128, 3, 3, 3)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (8, 512, 3, 3)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (512, 4, 3, 3)
    assert tuple(sd["quant_conv.weight"].shape) == (8, 8, 1, 1)
    assert tuple(sd["post_quant_conv.weight"].shape) == (4, 4, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert infer_ddconfig(sd) == (SD_KL_F8_DDCONFIG, 4)
    g = ae_golden["ddconfig"]
    if g["ch_mult"] == [1, 2, 4, 4] and g["num_res_blocks"] == 2 and not g["attn_resolutions"]:
        assert set(sd) == set(ae_golden["state_dict"])  # same layout, only the width differs


def test_per_level_attention_layout():
    cfg = dict(SD_KL_F8_DDCONFIG, ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, attn_resolutions=[16])
    model = AutoencoderKL(cfg, 4).eval()
    sd = model.state_dict()
    assert "encoder.down.1.attn.0.q.weight" in sd and "encoder.down.0.attn.0.q.weight" not in sd
    assert "decoder.up.1.attn.1.proj_out.weight" in sd and "decoder.up.0.attn.0.norm.weight" not in sd
    inferred, emb = infer_ddconfig(sd, resolution=32)
    assert inferred["attn_resolutions"] == [16] and emb == 4
    with torch.no_grad():
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        assert model.decode(model.encode(x)).shape == (1, 3, 32, 32)
