"""ToMe on U-ViT attention: stride-grid destinations, bipartite matching, merge/unmerge against
hand-written per-token loops, and the whole merged forward against a loop over the blocks."""
import pytest
import torch

from duodiff_fast.methods.caching import CachingDenoiser
from duodiff_fast.methods.tome import (ToMePolicy, bipartite_plan, merge, stride_destinations, unmerge)
from duodiff_fast.models import create_model
from duodiff_fast.schedules import linear_ddpm


def test_stride_destinations_one_per_cell():
    g = torch.Generator().manual_seed(3)
    dst = stride_destinations(5, 4, 2, g)  # 2 x 2 whole cells; the 5th row has none
    assert dst.numel() == 4
    for idx in dst.tolist():
        r, c = divmod(idx, 4)
        assert r < 4
    cells = {(divmod(i, 4)[0] // 2, divmod(i, 4)[1] // 2) for i in dst.tolist()}
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}
    with pytest.raises(ValueError, match="stride"):
        stride_destinations(2, 2, 3)


def _reference(x, dst, r):
    """Per-token loops: match, merge (mean with the destination), unmerge (copy the destination)."""
    B, T, D = x.shape
    merged_all, maps = [], []
    for b in range(B):
        src = [i for i in range(T) if i not in dst]
        best = []
        for i in src:
            sims = [float(torch.nn.functional.cosine_similarity(x[b, i], x[b, j], dim=0)) for j in dst]
            j = max(range(len(dst)), key=lambda q: sims[q])  # first maximum, as argmax/max
            best.append((sims[j], i, j))
        order = sorted(range(len(best)), key=lambda q: -best[q][0])  # stable: ties keep source order
        chosen = [best[q] for q in order[:r]]
        kept = [best[q][1] for q in order[r:]]
        groups = {j: [dst[j]] for j in range(len(dst))}
        for _, i, j in chosen:
            groups[j].append(i)
        tokens = [x[b, i] for i in kept] + [torch.stack([x[b, i] for i in groups[j]]).mean(0) for j in range(len(dst))]
        merged_all.append(torch.stack(tokens))
        owner = {}
        for pos, i in enumerate(kept):
            owner[i] = pos
        for j in range(len(dst)):
            for i in groups[j]:
                owner[i] = len(kept) + j
        maps.append(owner)
    return torch.stack(merged_all), maps


@pytest.mark.parametrize("r", [0, 3, 12])
def test_merge_unmerge_against_loops(r):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, dtype=torch.float64)
    dst = stride_destinations(4, 4, 2, torch.Generator().manual_seed(1))
    plan = bipartite_plan(x, dst, r)
    merged = merge(x, plan)
    ref, maps = _reference(x, dst.tolist(), r)
    torch.testing.assert_close(merged, ref)
    assert merged.shape[1] == 16 - r
    y = torch.randn_like(merged)
    out = unmerge(y, plan)
    for b in range(2):
        for i in range(16):
            torch.testing.assert_close(out[b, i], y[b, maps[b][i]])


def _tome_by_hand(model, schedule, x, t, ratio, stride, seed, merging=None):
    """U-ViT ``model`` at (x, t) written out block by block, ToMe merging the attention input of
    the blocks in ``merging`` (all when None) with destinations drawn in block order from ``seed``."""
    side, e = model.img_size // model.patch_size, model.extras
    g = torch.Generator().manual_seed(seed)
    ts = schedule.model_input(t).float()
    h = model.embed(x, ts, None)
    skips, n = [], len(model.in_blocks)
    for i, blk in enumerate([*model.in_blocks, model.mid_block, *model.out_blocks]):
        if i > n:
            h = blk.skip_linear(torch.cat([h, skips.pop()], -1))
        a = blk.norm1(h)
        if merging is None or i in merging:
            dst = stride_destinations(side, side, stride, g)
            ref, maps = _reference(a[:, e:].double(), dst.tolist(), int(ratio * side * side))
            att = blk.attn(torch.cat([a[:, :e], ref.float()], 1))
            back = torch.stack([torch.stack([att[b, e + maps[b][j]] for j in range(side * side)])
                                for b in range(x.shape[0])])
            h = h + torch.cat([att[:, :e], back], 1)
        else:
            h = h + blk.attn(a)
        h = h + blk.mlp(blk.norm2(h))
        if i < n:
            skips.append(h)
    return model.decode(h)


def test_tome_forward_against_block_loop():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    schedule = linear_ddpm()
    ratio, stride = 0.5, 2
    den = CachingDenoiser(model, schedule, ToMePolicy(ratio, stride, seed=5))
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    t = torch.full((2,), 0.6)
    with torch.no_grad():
        got = den(x, t, None)
        want = _tome_by_hand(model, schedule, x, t, ratio, stride, seed=5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # ratio 0: the plain model
        ts = schedule.model_input(t).float()
        plain = CachingDenoiser(model, schedule, ToMePolicy(0.0, stride))(x, t, None)
        torch.testing.assert_close(plain, model(x, ts, None), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        ToMePolicy(1.0)


def test_tome_layers_selection():
    from duodiff_fast.methods.tome import tome_layers

    # 3 in-blocks (0-2), mid (3), 3 out-blocks (4-6): levels 1 2 3 4 3 2 1
    assert tome_layers(7) == list(range(7))
    assert tome_layers(7, max_level=1) == [0, 6]
    assert tome_layers(7, max_level=2) == [0, 1, 5, 6]
    assert tome_layers(7, max_level=4) == list(range(7))
    assert tome_layers(7, schedule="F2") == [0, 1]
    assert tome_layers(7, schedule="R3") == [4, 5, 6]
    assert tome_layers(7, schedule="B4") == [0, 1, 5, 6]
    for bad, match in [({"schedule": "B3"}, "even"), ({"schedule": "X2"}, "F<k>"), ({"schedule": "F9"}, "exceeds"),
                       ({"max_level": 0}, "max_level"), ({"max_level": 1, "schedule": "F1"}, "not both")]:
        with pytest.raises(ValueError, match=match):
            tome_layers(7, **bad)
    with pytest.raises(ValueError, match="even"):
        ToMePolicy(0.5, schedule="B1")


@pytest.mark.parametrize("options,merging", [({"max_level": 1}, [0, 6]), ({"schedule": "R2"}, [5, 6]),
                                             ({"schedule": "B2"}, [0, 6])])
def test_tome_selected_layers_against_block_loop(options, merging):
    """Only the chosen layers merge; the others run the plain block and draw no destinations."""
    torch.manual_seed(1)
    model = create_model("tiny", depth=6).eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    schedule = linear_ddpm()
    ratio, stride, seed = 0.5, 2, 7
    den = CachingDenoiser(model, schedule, ToMePolicy(ratio, stride, seed=seed, **options))
    x = torch.randn(2, model.in_chans, model.img_size, model.img_size)
    t = torch.full((2,), 0.4)
    with torch.no_grad():
        got = den(x, t, None)
        want = _tome_by_hand(model, schedule, x, t, ratio, stride, seed, merging)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_planning_reads_no_device_value():
    """ToMe plans on the host: with the tokens on the meta device (no values at all) planning,
    merging and unmerging still run, which they could not if they read a device value (``nonzero``
    on the device, ``int()`` of a device tensor, ...). Device destinations are refused by name."""
    g = torch.Generator().manual_seed(0)
    dst = stride_destinations(4, 4, 2, g)
    assert dst.device.type == "cpu"
    x = torch.empty(2, 16, 8, device="meta")
    plan = bipartite_plan(x, dst, 5)
    assert plan.src.shape == (2, 5) and plan.unm.shape == (2, 7) and plan.dst.device.type == "meta"
    merged = merge(x, plan)
    assert merged.shape == (2, 11, 8)
    assert unmerge(merged, plan).shape == (2, 16, 8)
    with pytest.raises(ValueError, match="host indices"):
        bipartite_plan(x, dst.to("meta"), 5)
