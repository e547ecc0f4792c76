"""SongUNet / MultistageUNet structure: EDM's key names and sizes, refusals, stage choice, labels."""
import math

import pytest
import torch

from duodiff_fast.edm import MultistageUNet, SongUNet, build_edm_net, get_edm_config, stage_from_sigma


def test_cifar10_sizes_match_edm():
    """EDM's CIFAR-10 DDPM++ has 55.73M parameters (its paper/tables); built on the meta device."""
    with torch.device("meta"):
        net = build_edm_net(get_edm_config("edm-cifar10-ddpmpp"))
        ms = build_edm_net(get_edm_config("multistage-cifar10-ddpmpp"))
    assert sum(p.numel() for p in net.parameters()) == 55_733_891
    keys = set(net.state_dict())
    assert {"model.map_layer0.weight", "model.map_augment.weight", "model.enc.32x32_conv.weight",
            "model.enc.16x16_down.conv0.resample_filter", "model.dec.8x8_in0.qkv.weight",
            "model.dec.32x32_aux_conv.weight"} <= keys
    mkeys = set(ms.state_dict())
    assert {f"model.decs.{s}.32x32_aux_conv.weight" for s in range(3)} <= mkeys
    assert ms.model.decs[2]["32x32_block0"].out_channels == 16 * 2


@pytest.mark.parametrize("kw,match", [(dict(encoder_type="residual"), "encoder_type"),
                                      (dict(decoder_type="skip"), "decoder_type"),
                                      (dict(embedding_type="learned"), "embedding_type"),
                                      (dict(bogus=1), "unknown")])
def test_refusals(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SongUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, **kw)


def test_multistage_config_mismatch_refused():
    with pytest.raises(ValueError, match="disagree"):
        MultistageUNet(8, 3, 3, en_model_channels=16, de_model_channels=[8, 8], stage_num=3, channel_mult=[1, 2])


def test_stage_rule():
    iv = [[[0.0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]
    assert stage_from_sigma(0.002, iv) == 0
    assert stage_from_sigma(2.5103, iv) == 0  # (lo, hi]: the boundary belongs to the lower stage
    assert stage_from_sigma(2.52, iv) == 1
    assert stage_from_sigma(80.0, iv) == 2
    with pytest.raises(ValueError):
        stage_from_sigma(0.0, iv)


def test_forward_shapes_labels_and_row0_stage(one_thread):
    torch.manual_seed(0)
    cfg = get_edm_config("multistage-tiny-ddpmpp")
    cfg["label_dim"] = 4
    net = build_edm_net(cfg).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        # row 0 picks the decoder for the whole batch
        a = net(x, torch.tensor([0.1, 50.0]), torch.tensor([1, 2]))
        b = net(x, torch.tensor([0.1, 50.0]), torch.tensor([1, 2]), stage=0)
        c = net(x, torch.tensor([0.1, 50.0]), torch.tensor([1, 2]), stage=2)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="stage"):
        net(x, torch.tensor([0.1, 0.1]), stage=3)
    with pytest.raises(ValueError, match="class-conditional"):
        net.model(x, torch.zeros(2), None)


def test_dropout_only_in_training(one_thread):
    cfg = get_edm_config("edm-tiny-ddpmpp")
    cfg["dropout"] = 0.5
    net = build_edm_net(cfg)
    with torch.no_grad():  # make conv1 matter so dropout shows in the output
        for m in net.modules():
            if hasattr(m, "conv1"):
                m.conv1.weight.normal_()
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 1.0])
    net.eval()
    assert torch.equal(net(x, s), net(x, s))
    net.train()
    assert not torch.equal(net(x, s), net(x, s))
