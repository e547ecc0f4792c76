import pytest

from duodiff_fast.models import PAPER_CONFIGS, REGISTRY, create_model, get_config, get_spec, list_configs, shallow_name


def test_paper_configs_match_table_3():
    # DuoDiff paper, Table 3: (img, patch, channels, width, layers, heads)
    expected = {
        "cifar10-s2": (32, 2, 3, 512, 13, 8),
        "celeba64-s4": (64, 4, 3, 512, 13, 8),
        "imagenet64-m4": (64, 4, 3, 768, 17, 12),
        "imagenet256-l2": (32, 2, 4, 1024, 21, 16),
    }
    assert set(PAPER_CONFIGS) == set(expected)
    for name, (img, p, c, d, layers, h) in expected.items():
        k = get_config(name)
        assert (k["img_size"], k["patch_size"], k["in_chans"], k["embed_dim"], k["depth"] + 1, k["num_heads"]) == (
            img, p, c, d, layers, h)


def test_every_full_config_has_a_three_layer_shallow_twin():
    for name, spec in REGISTRY.items():
        if name.endswith("-shallow"):
            continue
        sh = get_spec(shallow_name(name))
        assert sh.kwargs["depth"] == (3 if spec.arch == "dit" else 2)
        assert {k: v for k, v in sh.kwargs.items() if k != "depth"} == {
            k: v for k, v in spec.kwargs.items() if k != "depth"}
        assert sh.schedule == spec.schedule


def test_published_configs_present():
    for name in ("imagenet64-l4", "imagenet256-h2", "imagenet512-l4", "imagenet512-h4"):
        assert name in REGISTRY
    assert get_config("imagenet256-h2")["conv"] is False
    assert get_spec("imagenet256-l2").latent


def test_create_model_shallow_layers():
    m = create_model("cifar10-s2-shallow")
    assert m.num_layers == 3 and m.embed_dim == 512


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="cifar10-s2"):
        get_spec("cifar100")


def test_unknown_override():
    with pytest.raises(TypeError, match="unknown UViT keyword"):
        create_model("tiny", widht=3)


# ------------------------------------------------------------------------------ JSON model configs
def test_every_registered_config_round_trips_through_json(tmp_path):
    import json

    from duodiff_fast.models import spec_json
    from duodiff_fast.models.configs import ModelSpec

    for name in list_configs():
        text = spec_json(name)
        again = ModelSpec.from_dict(json.loads(text))
        assert again == get_spec(name), name
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        assert get_spec(str(path)) == get_spec(name)
        if name.startswith("tiny"):  # small enough to build
            assert create_model(str(path)).config == create_model(name).config


def test_json_config_with_any_channel_count(tmp_path):
    import json

    import torch

    cfg = {"model_type": "uvit", "model": {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 32,
                                           "depth": 2, "num_heads": 2, "num_classes": 5}}
    path = tmp_path / "gray.json"
    path.write_text(json.dumps(cfg))
    spec = get_spec(str(path))
    assert spec.name == "gray" and spec.schedule == "linear" and spec.time_input == "index"
    assert spec.kwargs["mlp_ratio"] == 4 and spec.kwargs["conv"] is True  # defaults filled in
    m = create_model(str(path))
    out = m(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 4]))
    assert out.shape == (2, 1, 16, 16)
    assert get_spec(str(path)).shallow().kwargs["depth"] == 2


@pytest.mark.parametrize("change, message", [
    ({"model_type": "vit22b"}, "unknown model_type 'vit22b'"),
    ({"model": {"img_size": 16}}, r"\['patch_size', 'in_chans', 'embed_dim', 'depth', 'num_heads'\] are required"),
    ({"model": {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "heads": 2}},
     "unknown UViT keyword"),
    ({"colour": "red"}, "unknown key"),
    ({"time_input": "seconds"}, "time_input must be one of"),
])
def test_bad_json_configs_are_refused_by_name(tmp_path, change, message):
    import json

    cfg = {"model_type": "uvit", "model": {"img_size": 16, "patch_size": 2, "in_chans": 1, "embed_dim": 32,
                                           "depth": 2, "num_heads": 2}}
    cfg.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        get_spec(str(path))


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such JSON file"):
        get_spec(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_spec(str(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        get_spec(str(tmp_path))


def test_dit_sizes_follow_the_official_table():
    # facebookresearch/DiT: XL 1152/28/16, L 1024/24/16, B 768/12/12, S 384/12/6; 256px = latent 32, 512px = 64
    sizes = {"xl": (1152, 28, 16), "l": (1024, 24, 16), "b": (768, 12, 12), "s": (384, 12, 6)}
    for size, (width, depth, heads) in sizes.items():
        for patch in (2, 4, 8):
            for res, side in ((256, 32), (512, 64)):
                spec = get_spec(f"dit-{size}{patch}-{res}")
                k = spec.kwargs
                assert spec.arch == "dit" and spec.latent and spec.schedule == "linear"
                assert (k["hidden_size"], k["depth"], k["num_heads"], k["patch_size"], k["input_size"]) == (
                    width, depth, heads, patch, side)
                assert (k["in_channels"], k["num_classes"], k["learn_sigma"], k["class_dropout_prob"]) == (
                    4, 1000, True, 0.1)


def test_dit_shallow_twin_and_tiny():
    sh = create_model("dit-xl2-256-shallow")
    assert sh.num_layers == 3 and sh.embed_dim == 1152 and sh.num_patches == 256
    tiny = create_model("dit-tiny")
    assert tiny.out_channels == 8 and tiny.num_classes == 11 and tiny.null_class == 10
    with pytest.raises(TypeError, match="unknown DiT keyword"):
        create_model("dit-tiny", embed_dim=8)
