"""The trainer's time input: configured, inherited from the weights it starts from, recorded in
its checkpoints and exported weights."""
import pytest
import torch

from duodiff_fast.models import UViT, checkpoint_info, load_model
from duodiff_fast.schedules import make_schedule
from duodiff_fast.training import Trainer, load_checkpoint, train
from duodiff_fast.training.objective import DiffusionObjective
from tests.models.test_authors_checkpoints import authors_training_file


def test_configured_time_input_trains_and_is_recorded(make_cfg, tmp_path):
    trainer = train(make_cfg(steps=2, time_input="normalized", save_every=2))
    assert trainer.schedule.time_input == "normalized"
    t = torch.tensor([0.5], dtype=torch.float64)
    assert trainer.loss_fn.schedule.model_input(t).item() == pytest.approx(0.499)
    assert load_checkpoint(trainer.checkpoints.latest())["time_input"] == "normalized"
    trainer.export_weights(str(tmp_path / "ema.pt"))
    assert checkpoint_info(tmp_path / "ema.pt").time_input == "normalized"
    assert load_model(tmp_path / "ema.pt").time_input == "normalized"
    # Resuming that run keeps it without being told again.
    again = Trainer(make_cfg(steps=3, out_dir=trainer.cfg.out_dir, resume="auto"))
    assert again.step == 2 and again.time_input == "normalized"


def test_default_stays_index_and_exports_record_it_with_the_config(make_cfg, tiny_uvit, tmp_path):
    from duodiff_fast.models import save_weights

    trainer = train(make_cfg(steps=1))
    assert trainer.time_input == "index" and trainer.schedule.time_input == "index"
    trainer.export_weights(str(tmp_path / "w.pt"))
    exported = torch.load(tmp_path / "w.pt", weights_only=True)
    assert exported["time_input"] == "index" and exported["model_config"]["embed_dim"] == tiny_uvit()["embed_dim"]
    UViT(**tiny_uvit()).load_state_dict(exported["state_dict"])
    # A plain state dict for the official U-ViT loaders is still one save_weights call away.
    save_weights(trainer.ema.module, tmp_path / "plain.pt")
    UViT(**tiny_uvit()).load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))


def test_fine_tuning_the_authors_model_inherits_their_convention(make_cfg, tiny_uvit, tmp_path):
    src = authors_training_file(tmp_path / "theirs.pth", UViT(**tiny_uvit()))
    tuned = Trainer(make_cfg(init_weights=str(src)))
    assert tuned.time_input == "normalized" and tuned.schedule.time_input == "normalized"
    assert tuned.model.time_input == "normalized"
    with pytest.raises(ValueError, match="conflicting time inputs"):
        Trainer(make_cfg(init_weights=str(src), time_input="index"))


def test_loss_function_schedule_must_agree(make_cfg):
    loss = DiffusionObjective(make_schedule("linear", "normalized"))
    assert Trainer(make_cfg(), loss_fn=loss).time_input == "normalized"
    with pytest.raises(ValueError, match="conflicting time inputs"):
        Trainer(make_cfg(time_input="index"), loss_fn=loss)


def test_bad_time_input_rejected(make_cfg):
    with pytest.raises(ValueError, match="time_input"):
        make_cfg(time_input="seconds")
