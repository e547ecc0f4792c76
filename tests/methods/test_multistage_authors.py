"""The multistage authors' U-ViT layout against their released code's outputs
(../shared/golden/multistage_reference.pt, entry ``uvit_multistage``), and their key names."""
import pytest
import torch

from duodiff_fast.methods.multistage import (
    MultistageUViT, authors_multistage, boundaries_from_intervals, from_authors_state_dict, to_authors_state_dict,
)
from duodiff_fast.models import get_config
from tests.conftest import rel_err


def golden_model(entry):
    return authors_multistage(entry["config"], entry["stage_interval"], entry["state_dict"]).eval()


def test_golden_every_stage_matches(multistage_golden, one_thread):
    entry = multistage_golden["uvit_multistage"]
    model = golden_model(entry)
    seen = set()
    for case in entry["cases"]:
        ts = case["timesteps"]
        stage = int(model.stage_of(ts[:1] / 1000)[0])  # the batch's stage from row 0, t = timesteps / 1000
        seen.add(stage)
        with torch.no_grad():
            out = model(case["x"], ts, stage=stage)
        assert rel_err(out, case["out"]) < 2e-6, (stage, ts.tolist())
        other = (stage + 1) % model.num_stages
        with torch.no_grad():
            assert rel_err(model(case["x"], ts, stage=other), case["out"]) > 1e-3
    assert seen == set(range(len(entry["stage_interval"])))


def test_golden_keys_round_trip(multistage_golden):
    entry = multistage_golden["uvit_multistage"]
    model = golden_model(entry)
    back = to_authors_state_dict(model)
    assert set(back) == set(entry["state_dict"])
    for k, v in entry["state_dict"].items():
        assert torch.equal(back[k], v), k


def test_authors_layout_structure():
    torch.manual_seed(0)
    m = MultistageUViT((0.442, 0.6308), stage_widths=[96, 64, 16], **get_config("tiny"))
    assert m.layout == "authors"
    d = m.embed_dim
    for st, w in zip(m.stages, (96, 64, 16)):
        assert isinstance(st.proj_in, torch.nn.Identity)
        assert st.out_blocks[0].skip_linear.in_features == 2 * d
        assert all(b.skip_linear.in_features == (2 * d if w == d else w + d) for b in st.out_blocks[1:])
        assert st.out_blocks[0].attn.num_heads == get_config("tiny")["num_heads"]
    assert m.stages[0].final_layer is m.stages[1].final_layer is m.stages[2].final_layer
    with pytest.raises(ValueError, match="divisible"):
        MultistageUViT((0.5,), stage_widths=[64, 30], **get_config("tiny"))


def test_projected_layout_still_available():
    m = MultistageUViT((0.442, 0.6308), stage_widths=[96, 64, 16], layout="projected", **get_config("tiny"))
    assert isinstance(m.stages[0].proj_in, torch.nn.Linear)
    assert m.stages[0].final_layer is not m.stages[1].final_layer
    with pytest.raises(ValueError, match="only the 'authors' layout"):
        to_authors_state_dict(m)
    with pytest.raises(ValueError, match="layout"):
        MultistageUViT((0.5,), layout="wide", **get_config("tiny"))


@pytest.mark.parametrize("iv,match", [([[[0, 0.4]], [[0.5, 1]]], "contiguous"), ([[[0, 0.4]], [[0.4, 0.9]]], "0 to 1"),
                                      ([[[0, 0.2], [0.5, 0.6]], [[0.2, 1]]], "one interval")])
def test_bad_intervals(iv, match):
    with pytest.raises(ValueError, match=match):
        boundaries_from_intervals(iv)


def test_unshared_final_convs_refused(multistage_golden):
    sd = dict(multistage_golden["uvit_multistage"]["state_dict"])
    sd["final_layer.1.bias"] = sd["final_layer.1.bias"] + 1
    with pytest.raises(ValueError, match="shares one conv"):
        from_authors_state_dict(sd)
    with pytest.raises(ValueError, match="unexpected key"):
        from_authors_state_dict({"foo.weight": torch.zeros(1)})


def test_files_without_layout_load_as_projected(tmp_path):
    """Files saved before layouts existed hold the projected layout (its proj_in keys)."""
    from duodiff_fast.io_utils import atomic_torch_save
    from duodiff_fast.methods.multistage import load_multistage, save_multistage

    m = MultistageUViT((0.5,), stage_widths=[32, 48], layout="projected", **get_config("tiny"))
    path = tmp_path / "old.pt"
    save_multistage(m, str(path))
    blob = torch.load(path, weights_only=True)
    del blob["config"]["layout"]
    atomic_torch_save(blob, str(path))
    back = load_multistage(str(path))
    assert back.layout == "projected"
    new = MultistageUViT((0.5,), stage_widths=[32, 48], **get_config("tiny"))
    save_multistage(new, str(path))
    assert load_multistage(str(path)).layout == "authors"


@pytest.mark.parametrize("backend", ["triton", "eager-bf16"])
def test_golden_every_stage_matches_on_the_fast_backends(multistage_golden, backend, one_thread):
    """The authors' layout on the fused Triton path and on eager bfloat16 against their released
    outputs. The triton backend runs float32 kernels in Triton's interpreter on a CPU (a small multiple
    of float32 rounding) and bfloat16 on a GPU; eager-bf16 computes in bfloat16 on either."""
    from duodiff_fast.backends import prepare_model
    from tests.conftest import backend_device, backend_dtype, skip_unless_triton_runs

    device = backend_device(backend)
    if backend == "triton":
        skip_unless_triton_runs(device)
    entry = multistage_golden["uvit_multistage"]
    ref = golden_model(entry)
    model = prepare_model(ref.to(device), backend)
    dtype = backend_dtype(backend, device)
    assert next(model.parameters()).dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for case in entry["cases"]:
        ts = case["timesteps"].to(device)
        stage = int(ref.stage_of(ts[:1].cpu() / 1000)[0])
        with torch.no_grad():
            out = model(case["x"].to(device, dtype), ts, stage=stage)
        assert rel_err(out.float().cpu(), case["out"]) < tol, (backend, stage, ts.tolist())
