"""Early-exit checkpoints of the DuoDiff authors and of AdaDiff, mapped onto AdaDiffUViT.

The state dicts are synthetic, with the key names and shapes of the published layouts; the
expected outputs are computed by hand from the backbone's pieces, not through AdaDiffUViT.
"""
import argparse

import pytest
import torch

from duodiff_fast.methods.adadiff import AdaDiffUViT
from duodiff_fast.methods.adadiff_checkpoints import NoExitUEM, PixelCertaintyUEM, TokenProbeUEM, load_adadiff
from duodiff_fast.models import CheckpointError, checkpoint_info, create_model, load_weights
from duodiff_fast.models.layouts import detect_layout, strip_prefixes


def _rand_like(sd, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in sd.items()}


def _backbone(name="tiny", seed=0):
    m = create_model(name)
    m.load_state_dict(_rand_like(m.state_dict(), seed))  # every tensor random, LayerNorms included
    return m.eval()


def _head(d, patch_dim, c, g):
    return {"norm.weight": 1 + 0.1 * torch.randn(d, generator=g), "norm.bias": 0.1 * torch.randn(d, generator=g),
            "decoder_pred.weight": 0.1 * torch.randn(patch_dim, d, generator=g),
            "decoder_pred.bias": 0.1 * torch.randn(patch_dim, generator=g),
            "final_layer.weight": 0.1 * torch.randn(c, c, 3, 3, generator=g),
            "final_layer.bias": 0.1 * torch.randn(c, generator=g)}


def duodiff_early_exit_sd(backbone, seed=1):
    """Keys and shapes of the DuoDiff authors' EarlyExitUViT with mlp_probe_per_layer probes."""
    g = torch.Generator().manual_seed(seed)
    d, c, n_in = backbone.embed_dim, backbone.in_chans, len(backbone.in_blocks)
    patch_dim = backbone.patch_size ** 2 * c
    sd = {f"uvit.{k}": v for k, v in backbone.state_dict().items()}
    heads = [f"in_blocks_heads.{i}" for i in range(n_in)] + ["mid_block_head"] + \
            [f"out_blocks_heads.{i}" for i in range(n_in)]
    for name in heads:
        sd.update({f"{name}.{k}": v for k, v in _head(d, patch_dim, c, g).items()})
    for k in range(2 * n_in + 1):
        sd[f"matrix.{k}.classifier.0.weight"] = 0.5 * torch.randn(1, d, generator=g)
        sd[f"matrix.{k}.classifier.0.bias"] = 0.5 * torch.randn(1, generator=g)
    return sd, heads


def _layer_inputs(bb, x, ts, y=None):
    """Tokens entering each transformer layer 0..N-1 and leaving the last one, by hand."""
    h = bb.embed(x, ts, y)
    seen, skips = [h], []
    for blk in bb.in_blocks:
        h = blk(h)
        skips.append(h)
        seen.append(h)
    h = bb.mid_block(h)
    seen.append(h)
    for blk in bb.out_blocks:
        h = blk(h, skips.pop())
        seen.append(h)
    return seen  # N + 1 entries


def _apply_head(p, tokens, bb):
    t = torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), p["norm.weight"], p["norm.bias"])
    t = torch.nn.functional.linear(t, p["decoder_pred.weight"], p["decoder_pred.bias"])[:, bb.extras:]
    from duodiff_fast.models.uvit import unpatchify

    return torch.nn.functional.conv2d(unpatchify(t, bb.in_chans), p["final_layer.weight"], p["final_layer.bias"],
                                      padding=1)


def test_duodiff_early_exit_maps_heads_and_probes(tmp_path):
    bb = _backbone()
    sd, head_names = duodiff_early_exit_sd(bb)
    assert detect_layout(sd) == "duodiff-early-exit"
    # Their trainer's file: the weights under model_state_dict, settings in an argparse.Namespace.
    path = tmp_path / "celeba_deediff_uvit.pth"
    torch.save({"step": 10, "model_state_dict": sd, "args": argparse.Namespace(
        normalize_timesteps=True, num_heads=bb.config["num_heads"], classifier_type="mlp_probe_per_layer")}, path)
    model = load_adadiff(path).eval()
    assert isinstance(model, AdaDiffUViT) and model.time_input == "normalized"
    assert all(isinstance(u, TokenProbeUEM) for u in model.uems)
    n = model.num_layers
    assert n == 2 * len(bb.in_blocks) + 1 == len(head_names)

    x, ts = torch.randn(5, 3, 16, 16), torch.rand(5) * 0.999
    seen = _layer_inputs(bb, x, ts)
    with torch.no_grad():
        out = model(x, ts)
        for k, name in enumerate(head_names):
            p = {leaf: sd[f"{name}.{leaf}"] for leaf in ("norm.weight", "norm.bias", "decoder_pred.weight",
                                                          "decoder_pred.bias", "final_layer.weight", "final_layer.bias")}
            torch.testing.assert_close(out.heads[k], _apply_head(p, seen[k], bb), rtol=1e-5, atol=1e-5)
            w, b = sd[f"matrix.{k}.classifier.0.weight"], sd[f"matrix.{k}.classifier.0.bias"]
            u = torch.sigmoid(seen[k] @ w.T + b).squeeze(-1).mean(dim=1)  # every token, extras included
            torch.testing.assert_close(out.u[k], u, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.final, bb(x, ts), rtol=1e-5, atol=1e-5)

        # Their exit rule: first layer with u <= theta, else the backbone's output; a theta
        # (midway between two u values) where samples leave at different layers.
        def rule(theta):
            return [next((k for k in range(n) if out.u[k, r] <= theta), n) for r in range(5)]

        us = sorted(out.u.flatten().tolist())
        theta = next(0.5 * (a + b) for a, b in zip(us, us[1:]) if len(set(rule(0.5 * (a + b)))) >= 3)
        eps, exits = model.exit_shrinking(x, ts, None, theta)
        assert exits.tolist() == rule(theta)
        for r, want in enumerate(rule(theta)):
            ref = out.heads[want, r] if want < n else out.final[r]
            torch.testing.assert_close(eps[r], ref, rtol=1e-5, atol=1e-5)


def test_early_exit_backbone_has_uvit_prefix_not_loadable_as_plain_uvit():
    bb = _backbone()
    sd, _ = duodiff_early_exit_sd(bb)
    with pytest.raises(CheckpointError, match="load_adadiff"):
        load_weights(create_model("tiny"), {"model_state_dict": sd})


def test_unsupported_probe_kinds_and_layouts_name_what_was_found():
    bb = _backbone()
    sd, _ = duodiff_early_exit_sd(bb)
    d = bb.embed_dim
    att = {k: v for k, v in sd.items() if not k.startswith("matrix.")}
    for k in range(bb.num_layers):
        att[f"matrix.{k}.q"] = torch.zeros(1, 1, 1, d)
        att[f"matrix.{k}.weight_kv.weight"] = torch.zeros(2 * d, d)
    with pytest.raises(CheckpointError, match="attention_probe"):
        load_adadiff(att)
    per_t = {k: v for k, v in sd.items() if not k.startswith("matrix.")}
    per_t.update({f"matrix.{i}, {t}.classifier.0.weight": torch.zeros(1, d) for i in range(2) for t in range(2)})
    with pytest.raises(CheckpointError, match="per_layer_per_timestep"):
        load_adadiff(per_t)
    old = {f"uvit.{k}": v for k, v in bb.state_dict().items()}
    old["in_blocks_classifiers.0.q"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="in_blocks_classifiers"):
        load_adadiff(old)
    with pytest.raises(CheckpointError, match=r"Keys found: encoder \(2\), head"):
        load_adadiff({"encoder.w": torch.zeros(1), "encoder.b": torch.zeros(1), "head.w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="plain U-ViT"):
        load_adadiff(bb.state_dict())


def test_prefixes_of_wrappers_are_removed():
    sd = {"module._orig_mod.a": torch.zeros(1), "module._orig_mod.b": torch.zeros(1)}
    assert set(strip_prefixes(sd)) == {"a", "b"}


def adadiff_official_sd(backbone, seed=2):
    """Keys and shapes of AdaDiff's U-ViT: official keys plus one lte_classifer per layer."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(backbone.state_dict())
    patch_dim = backbone.patch_size ** 2 * backbone.in_chans
    for j in range(backbone.num_layers):
        sd[f"lte_classifer.{j}.lte.weight"] = 0.5 * torch.randn(patch_dim, backbone.embed_dim, generator=g)
        sd[f"lte_classifer.{j}.lte.bias"] = 0.5 * torch.randn(patch_dim, generator=g)
    return sd


@pytest.mark.parametrize("name", ["tiny", "tiny-latent"])
def test_adadiff_official_estimators_after_each_layer(tmp_path, name):
    bb = _backbone(name)
    sd = adadiff_official_sd(bb)
    assert detect_layout(sd) == "adadiff-official"
    torch.save(sd, tmp_path / "nnet_ema.pth")
    assert checkpoint_info(tmp_path / "nnet_ema.pth").layout == "adadiff-official"
    model = load_adadiff(tmp_path / "nnet_ema.pth").eval()
    assert model.time_input is None  # their files say nothing about it
    assert isinstance(model.uems[0], NoExitUEM)
    assert all(isinstance(u, PixelCertaintyUEM) for u in model.uems[1:])
    n = model.num_layers
    b, c, s = 4, bb.in_chans, bb.img_size
    x, ts = torch.randn(b, c, s, s), torch.rand(b) * 999
    y = torch.randint(0, bb.num_classes - 1, (b,)) if bb.num_classes > 0 else None
    seen = _layer_inputs(bb, x, ts, y)  # tokens leaving the embedding and each layer, by hand
    with torch.no_grad():
        out = model(x, ts, y)
        assert torch.isinf(out.u[0]).all()
        certainty = []
        for j in range(n - 1):
            patches = seen[j + 1][:, bb.extras:]
            m = torch.sigmoid(patches @ sd[f"lte_classifer.{j}.lte.weight"].T + sd[f"lte_classifer.{j}.lte.bias"])
            certainty.append(m.flatten(1).mean(1))
            torch.testing.assert_close(out.u[j + 1], 1 - certainty[-1], rtol=1e-5, atol=1e-6)
            # The exit after layer j goes through the backbone's own final layer.
            torch.testing.assert_close(out.heads[j + 1], bb.decode(seen[j + 1]), rtol=1e-5, atol=1e-5)
        # Per sample, their rule "certainty > thres" is u < theta = 1 - thres.
        def rule(thres):
            return [[j for j in range(n - 1) if certainty[j][r] > thres] for r in range(b)]

        cs = sorted(torch.stack(certainty).flatten().tolist())  # a thres midway between two values
        thres = next(0.5 * (a + c) for a, c in zip(cs, cs[1:])
                     if len({f[0] if f else -1 for f in rule(0.5 * (a + c))}) >= 2)
        eps, exits = model.exit_simulated(x, ts, y, 1 - thres)
        for r, fired in enumerate(rule(thres)):
            assert exits[r] == (fired[0] + 1 if fired else n)
            ref = bb.decode(seen[fired[0] + 1][r:r + 1])[0] if fired else bb(x, ts, y)[r]
            torch.testing.assert_close(eps[r], ref, rtol=1e-5, atol=1e-5)


def test_adadiff_official_with_wrong_estimator_count():
    bb = _backbone()
    sd = adadiff_official_sd(bb)
    del sd[f"lte_classifer.{bb.num_layers - 1}.lte.weight"], sd[f"lte_classifer.{bb.num_layers - 1}.lte.bias"]
    with pytest.raises(CheckpointError, match="lte_classifer"):
        load_adadiff(sd)


def test_own_adadiff_state_dict_round_trip():
    model = AdaDiffUViT(_backbone())
    again = load_adadiff({"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()}})
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_training_state_folder_of_uvit_and_adadiff(tmp_path):
    """U-ViT / AdaDiff trainers save <step>.ckpt/ folders: nnet.pth, nnet_ema.pth, optimizer.pth, step.pth."""
    bb, ema = _backbone(seed=0), _backbone(seed=3)
    folder = tmp_path / "200000.ckpt"
    folder.mkdir()
    torch.save(adadiff_official_sd(bb), folder / "nnet.pth")
    torch.save(adadiff_official_sd(ema), folder / "nnet_ema.pth")
    torch.save(200000, folder / "step.pth")
    assert torch.equal(load_adadiff(folder).backbone.pos_embed, bb.pos_embed)
    assert torch.equal(load_adadiff(folder, use_ema=True).backbone.pos_embed, ema.pos_embed)
    assert checkpoint_info(folder, use_ema=True).layout == "adadiff-official"
    plain = tmp_path / "uvit.ckpt"
    plain.mkdir()
    torch.save(bb.state_dict(), plain / "nnet_ema.pth")
    from duodiff_fast.models import load_model

    assert torch.equal(load_model(plain, use_ema=True).pos_embed, bb.pos_embed)
    with pytest.raises(FileNotFoundError, match="nnet.pth"):
        load_model(plain)
