"""TrainConfig: resume spellings and the horizontal-flip default."""
import pytest

from duodiff_fast.training import TrainConfig
from duodiff_fast.training.config import HFLIP_RECIPES
from duodiff_fast.training.trainer import resolve_hflip


def test_resume_none_means_start_fresh_as_on_the_cli():
    assert TrainConfig(resume="none").resume is None
    assert TrainConfig(resume="None").resume is None
    assert TrainConfig(resume=None).resume is None
    assert TrainConfig().replace(resume="none").resume is None
    assert TrainConfig(resume="auto").resume == "auto"


def test_resume_none_starts_fresh_in_a_folder_with_checkpoints(make_cfg):
    from duodiff_fast.training import Trainer, train

    first = train(make_cfg(steps=2))
    again = Trainer(make_cfg(steps=4, out_dir=first.cfg.out_dir, resume="none"))
    assert again.step == 0 and again.resumed_from is None


class _Pixels:
    is_pixels = True


def test_hflip_is_off_unless_asked_or_a_cifar_celeba_recipe():
    assert set(HFLIP_RECIPES) == {"cifar10-s2", "cifar10-s2-shallow", "celeba64-s4", "celeba64-s4-shallow"}
    data = _Pixels()
    # Files of pixels: flipped for the recipes, not for anything else.
    assert resolve_hflip(TrainConfig(model="cifar10-s2", data="folder:/x"), data)
    assert resolve_hflip(TrainConfig(model="celeba64-s4-shallow", data="npz:/x.npz"), data)
    assert not resolve_hflip(TrainConfig(model="tiny", data="folder:/x"), data)
    assert not resolve_hflip(TrainConfig(model="tiny", data="npz:/x.npz"), data)
    assert not resolve_hflip(TrainConfig(model="cifar10-s2", data="synthetic"), data)
    # Asked for, either way.
    assert resolve_hflip(TrainConfig(model="tiny", data="folder:/x", hflip=True), data)
    assert not resolve_hflip(TrainConfig(model="cifar10-s2", data="folder:/x", hflip=False), data)
    assert resolve_hflip(TrainConfig(model="tiny", data={"source": "folder", "path": "/x", "hflip": True}), data)
    with pytest.raises(ValueError, match="contradicts"):
        resolve_hflip(TrainConfig(model="tiny", data={"source": "folder", "path": "/x", "hflip": True}, hflip=False),
                      data)
    # A dataset handed to the trainer directly flips only when told.
    assert not resolve_hflip(TrainConfig(model="cifar10-s2", data="folder:/x"), None)
    assert resolve_hflip(TrainConfig(model="tiny", hflip=True), None)
    with pytest.raises(ValueError, match="hflip"):
        TrainConfig(hflip="yes")
