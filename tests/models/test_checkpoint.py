import pytest
import torch

from duodiff_fast.models import (
    CheckpointError, create_model, infer_config, load_model, load_weights, save_weights,
)


def _eq(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    m = create_model("tiny-cond")
    path = tmp_path / f"w{suffix}"
    save_weights(m, path)
    m2 = load_weights(create_model("tiny-cond"), path)
    assert _eq(m, m2)
    m3 = load_model(path)  # architecture inferred from the weights
    assert _eq(m, m3)


def test_model_state_dict_wrapper_and_ddp_prefix(tmp_path):
    m = create_model("tiny")
    wrapped = {"model_state_dict": {"module." + k: v for k, v in m.state_dict().items()}, "step": 3}
    torch.save(wrapped, tmp_path / "ck.pt")
    assert _eq(m, load_model(tmp_path / "ck.pt", "tiny"))


def test_ema_weights_on_request(tmp_path):
    m, e = create_model("tiny"), create_model("tiny")
    torch.save({"model_state_dict": m.state_dict(), "ema_state_dict": e.state_dict()}, tmp_path / "ck.pt")
    assert _eq(e, load_model(tmp_path / "ck.pt", "tiny", use_ema=True))
    torch.save({"model_state_dict": m.state_dict()}, tmp_path / "no_ema.pt")
    with pytest.raises(CheckpointError, match="ema_state_dict"):
        load_model(tmp_path / "no_ema.pt", "tiny", use_ema=True)


def test_official_golden_checkpoint_infers_config(golden):
    for case in ("pixel", "latent"):
        cfg = infer_config(golden[case]["state_dict"])
        for k, v in golden[case]["config"].items():
            assert cfg[k] == v, (case, k)


def test_wrong_config_error_lists_keys_and_fitting_config(tmp_path):
    full = create_model("cifar10-s2-shallow")
    path = tmp_path / "shallow.pth"
    save_weights(full, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, "cifar10-s2")
    msg = str(err.value)
    assert "missing keys" in msg and "in_blocks.1." in msg
    assert "fits config(s): cifar10-s2-shallow" in msg
    assert str(path) in msg


def test_shape_mismatch_reported(tmp_path):
    m = create_model("tiny")
    save_weights(m, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="shape mismatches.*pos_embed"):
        load_weights(create_model("tiny", img_size=8), tmp_path / "t.pth")


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad, "tiny")
    badst = tmp_path / "bad.safetensors"
    badst.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(badst, "tiny")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pth", "tiny")
    m = create_model("tiny")
    save_weights(m, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "trunc.pth", "tiny")


class Evil:
    """A pickled class instance: weights_only loading must refuse it."""


def test_pickled_objects_refused(tmp_path):
    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "evil.pth", "tiny")


def test_non_state_dict_rejected(tmp_path):
    torch.save({"a": 1, "b": "x"}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_model(tmp_path / "odd.pth", "tiny")
