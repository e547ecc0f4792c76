"""The DuoDiff authors' training checkpoints: safe loading of their argparse.Namespace, and their
time-input convention (t/1000) carried through loading, re-saving and sampling."""
import argparse
import functools

import pytest
import torch

from duodiff_fast.methods import ModelDenoiser
from duodiff_fast.models import (
    CheckpointError, checkpoint_info, create_model, get_spec, load_model, load_weights, resolve_time_input,
    save_weights,
)
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import DiscreteSchedule, make_schedule


def _lr_factor(step, warmup):
    return min(1.0, (step + 1) / warmup)


def authors_training_file(path, model, normalize=True, **args):
    """A file shaped like the DuoDiff authors' trainer writes it: their entries and value types
    (an argparse.Namespace of command-line settings under ``args``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_lr_factor, warmup=10))
    ns = argparse.Namespace(seed=1, n_steps=500000, batch_size=128, num_timesteps=1000, use_amp=True,
                            log_path="logs", exp_name="run", model="uvit", dataset="cifar10",
                            normalize_timesteps=normalize, parametrization="predict_noise",
                            img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
                            depth=model.depth + 1, num_heads=model.config["num_heads"], mlp_ratio=4,
                            qkv_bias=False, num_classes=-1, load_checkpoint_path=None, **args)
    state = {
        "step": 25000,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "scaler_state_dict": torch.amp.GradScaler("cpu").state_dict(),
        "lr_scheduler_state_dict": sched.state_dict(),
        "dataloader_sampler_state": {"perm": torch.randperm(10), "perm_index": 3, "epoch": 0, "seed": 1},
        "args": ns,
        "train_state": {"logs": [{"Train loss": 0.5}], "step": 25000},
    }
    torch.save(state, path)
    return path


def _eq(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_weights_only_refuses_their_file_and_ours_reads_it(tmp_path):
    torch.manual_seed(0)
    m = create_model("tiny", num_heads=2)  # 2 heads: not what the registry would guess for width 64
    path = authors_training_file(tmp_path / "cifar10_uvit_last.pth", m)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # what read_checkpoint_file did before
    loaded = load_model(path)  # architecture from the weights, num_heads from their args
    assert loaded.config["num_heads"] == 2
    assert _eq(loaded, m)
    assert loaded.time_input == "normalized"
    info = checkpoint_info(path)
    assert (info.layout, info.time_input, info.source) == ("uvit", "normalized", "duodiff-authors")
    assert info.args["dataset"] == "cifar10" and info.args["normalize_timesteps"] is True


class Evil:
    """A pickled class instance: only argparse.Namespace is on the allow-list."""


def test_allow_list_is_namespace_only(tmp_path):
    m = create_model("tiny")
    torch.save({"model_state_dict": m.state_dict(), "args": argparse.Namespace(x=Evil())}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "a.pth", "tiny")
    torch.save({"model_state_dict": m.state_dict(), "cfg": Evil()}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "b.pth", "tiny")
    # The allow-list is scoped to our loads, not installed globally.
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "c.pth")
    with pytest.raises(Exception, match="Namespace"):
        torch.load(tmp_path / "c.pth", weights_only=True)


def test_index_models_of_theirs_declare_index(tmp_path):
    path = authors_training_file(tmp_path / "imagenet64.pth", create_model("tiny"), normalize=False)
    assert checkpoint_info(path).time_input == "index"
    assert load_weights(create_model("tiny"), path).time_input == "index"


def _draw(model, schedule, seed=3):
    den = ModelDenoiser(model.eval(), schedule)
    with torch.no_grad():
        return sample(den, schedule, (2, 3, 16, 16), solver="ddim", num_steps=4, base_seed=seed, progress=False)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_normalized_model_resaved_and_reloaded_samples_identically(tmp_path, suffix):
    torch.manual_seed(0)
    src = authors_training_file(tmp_path / "theirs.pth", create_model("tiny"))
    first = load_weights(create_model("tiny"), src)
    spec = get_spec("tiny")
    sched = spec.make_schedule(time_input=resolve_time_input(spec.time_input, [src]))
    assert isinstance(sched, DiscreteSchedule) and sched.time_input == "normalized"

    resaved = tmp_path / f"resaved{suffix}"
    save_weights(first, resaved)  # the model carries time_input="normalized" from the load
    assert checkpoint_info(resaved).time_input == "normalized"
    second = load_weights(create_model("tiny"), resaved)
    assert second.time_input == "normalized"
    sched2 = spec.make_schedule(time_input=resolve_time_input(spec.time_input, [resaved]))
    assert torch.equal(_draw(first, sched), _draw(second, sched2))
    # The convention matters: the same weights fed step indices sample something else.
    assert not torch.allclose(_draw(second, make_schedule("linear", "index")), _draw(first, sched))


def test_index_weights_stay_plain_state_dicts(tmp_path):
    m = create_model("tiny")
    save_weights(m, tmp_path / "w.pth", time_input="index")
    assert set(torch.load(tmp_path / "w.pth", weights_only=True)) == set(m.state_dict())
    assert checkpoint_info(tmp_path / "w.pth").time_input is None  # plain files declare nothing
    assert load_weights(create_model("tiny"), tmp_path / "w.pth").time_input is None
    with pytest.raises(ValueError, match="time_input"):
        save_weights(m, tmp_path / "x.pth", time_input="seconds")


def test_conflicting_declarations_are_an_error(tmp_path):
    a = authors_training_file(tmp_path / "a.pth", create_model("tiny"), normalize=True)
    b = authors_training_file(tmp_path / "b.pth", create_model("tiny-shallow"), normalize=False)
    with pytest.raises(CheckpointError, match="different time inputs"):
        resolve_time_input("index", [a, b])
    assert resolve_time_input("index", [a, None]) == "normalized"
    assert resolve_time_input("index", [None]) == "index"


def test_make_schedule_time_inputs():
    n = make_schedule("linear", "normalized")
    i = make_schedule("linear", "index")
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(n.model_input(t), i.model_input(t) / 1000)
    assert i.model_input(t).tolist() == [0.0, 499.0, 999.0]
    with pytest.raises(ValueError, match="continuous"):
        make_schedule("vp-linear", "normalized")
    with pytest.raises(ValueError, match="time_input"):
        make_schedule("linear", "seconds")
    assert make_schedule("vp-linear", "index").model_input(torch.tensor([1.0])).item() == pytest.approx(999.0)


def test_model_specs_carry_a_valid_time_input():
    from duodiff_fast.models import TIME_INPUTS, ModelSpec

    assert TIME_INPUTS == DiscreteSchedule.TIME_INPUTS
    assert get_spec("cifar10-s2").time_input == "index"
    assert get_spec("tiny").make_schedule(time_input="normalized").time_input == "normalized"
    with pytest.raises(ValueError, match="time_input"):
        ModelSpec("x", {}, "linear", time_input="t/1000")


def test_load_model_keeps_the_safetensors_time_input(tmp_path):
    m = create_model("tiny")
    save_weights(m, tmp_path / "w.safetensors", time_input="normalized")
    assert load_model(tmp_path / "w.safetensors").time_input == "normalized"
    save_weights(m, tmp_path / "i.safetensors")
    assert load_model(tmp_path / "i.safetensors").time_input is None


def test_their_normalization_assumes_1000_steps(tmp_path):
    path = authors_training_file(tmp_path / "a.pth", create_model("tiny"))
    blob = torch.load(path, weights_only=False)
    blob["args"].num_timesteps = 500
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="num_timesteps=500"):
        load_model(path)
