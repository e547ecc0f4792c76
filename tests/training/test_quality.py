"""A quality test that can fail: train a tiny class-conditional model, sample it, check what came out.

Data: 8x8 RGB images whose class is their colour (4 classes: red, green, blue, yellow; a random
brightness ramp per image), half of them with a fixed pixel texture of std 0.3. The texture is why
the time input matters: on smooth images a network can read the noise level off the image and
ignore t, but here it cannot tell texture from diffusion noise without t, so a wrongly scaled time
input leaves visibly wrong samples. A tiny U-ViT is trained for about half a minute of one CPU core
by the package's Trainer (labels through its label-dropout path), sampled by DDPM (100 steps, x0
clipped) through ``ModelDenoiser`` (the schedule's time input), and checked:

* class accuracy: the colour of each sample (its per-channel mean, nearest class colour) is the
  requested label for at least 80% of samples (chance: 25%);
* realism: the median distance of a sample to its nearest training image is below 0.4 RMS and
  below 1 / 2.5 of that of Gaussian noise images;
* texture: the samples' median high-pass std is at most 1.25 x that of the textured training
  images (leftover noise shows up here).

The check is shown to fail when the sampler ignores the labels (every request becomes the null
class) and when the time input is scaled wrongly at sampling (index / N instead of the step index:
the DuoDiff authors' normalised convention fed to an index-trained model, issue 24's case).
"""
import pytest
import torch
import torch.nn.functional as F

from duodiff_fast.methods import ModelDenoiser
from duodiff_fast.samplers import sample
from duodiff_fast.schedules import DiscreteSchedule, linear_ddpm
from duodiff_fast.training import TrainConfig, Trainer
from duodiff_fast.training.data import TensorDataset

COLOURS = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, -0.8]])
N_CLASSES = 4
MODEL = dict(img_size=8, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2,
             num_classes=N_CLASSES + 1)  # + the null class
STEPS = 1200
TEXTURE = 0.3


def make_data(n=512, seed=0):
    """(n, 3, 8, 8) images in [-1, 1] coloured by class (half with texture), and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES
    coord = torch.linspace(-1, 1, 8)
    direction = torch.randn(n, 2, generator=g)
    direction = direction / direction.norm(dim=1, keepdim=True)
    ramp = direction[:, 0, None, None] * coord.view(1, 8, 1) + direction[:, 1, None, None] * coord.view(1, 1, 8)
    brightness = 0.75 + 0.25 * ramp / 1.5  # (n, 8, 8) in [0.5, 1]
    x = COLOURS[labels].view(n, 3, 1, 1) * brightness.unsqueeze(1)
    amp = torch.where(torch.arange(n) % 8 < 4, 0.0, TEXTURE).view(n, 1, 1, 1)  # independent of the class
    x = x + amp * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0).contiguous(), labels


def high_pass(x):
    """(B,) std of each image minus its 3x3 local mean: ~0 on the smooth images, ~0.25 textured."""
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x - blur).flatten(1).std(1)


def class_of(x):
    """The class each image's colour says: the nearest class colour to its per-channel mean direction."""
    mean = x.mean(dim=(2, 3))  # (B, 3)
    return (mean @ COLOURS.T / COLOURS.norm(dim=1)).argmax(1)


def nearest_distance(x, data):
    """(B,) RMS distance of each image to its nearest training image."""
    d = torch.cdist(x.flatten(1), data.flatten(1)) / (x[0].numel() ** 0.5)
    return d.min(1).values


def quality(samples, requested, data):
    """(passed, numbers): the two checks of the module docstring."""
    acc = float((class_of(samples) == requested).float().mean())
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(9))
    dist = float(nearest_distance(samples, data).median())
    noise_dist = float(nearest_distance(noise, data).median())
    hp = high_pass(data)
    hp_limit = 1.25 * float(hp[hp > 0.1].median())
    texture = float(high_pass(samples).median())
    ok = acc >= 0.8 and dist < noise_dist / 2.5 and dist < 0.4 and texture <= hp_limit
    return ok, {"accuracy": acc, "median_nn_distance": dist, "noise_nn_distance": noise_dist,
                "median_high_pass": texture, "high_pass_limit": hp_limit}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data, labels = make_data()
        cfg = TrainConfig(model=dict(MODEL), schedule="linear", steps=STEPS, batch_size=64, lr=2e-3,
                          warmup_steps=20, ema_decay=0.0, p_uncond=0.1, seed=0, progress=False, device="cpu",
                          out_dir=str(tmp_path_factory.mktemp("quality")), save_every=0, log_every=STEPS,
                          resume=None)
        trainer = Trainer(cfg, dataset=TensorDataset(data, labels, num_labels=N_CLASSES))
        trainer.fit()
        model = trainer.model.eval()
        yield model, data
    finally:
        torch.set_num_threads(before)


def draw(model, schedule=None, n=48):
    schedule = schedule or linear_ddpm()
    y = torch.arange(n) % N_CLASSES
    with torch.no_grad():
        x = sample(ModelDenoiser(model, schedule), schedule, (n, 3, 8, 8), solver="ddpm", num_steps=100, y=y,
                   base_seed=1, progress=False, clip_denoised=True)
    return x, y


def test_trained_model_passes(trained):
    model, data = trained
    x, y = draw(model)
    ok, numbers = quality(x, y, data)
    assert ok, numbers


def test_check_fails_when_labels_are_ignored(trained, monkeypatch):
    model, data = trained
    run = ModelDenoiser._run

    def ignore_labels(self, m, x, t, y):  # the network never sees the requested class
        return run(self, m, x, t, None if y is None else torch.full_like(y, N_CLASSES))

    monkeypatch.setattr(ModelDenoiser, "_run", ignore_labels)
    x, y = draw(model)
    ok, numbers = quality(x, y, data)
    assert not ok, numbers
    assert numbers["accuracy"] < 0.6


def test_check_fails_when_the_time_input_is_scaled_wrongly(trained, monkeypatch):
    model, data = trained
    right = DiscreteSchedule.model_input

    def normalised(self, t):  # index / N: the "normalized" convention fed to an index-trained model
        return right(self, t) / self.num_timesteps

    monkeypatch.setattr(DiscreteSchedule, "model_input", normalised)
    x, y = draw(model)
    ok, numbers = quality(x, y, data)
    assert not ok, numbers
    assert numbers["median_high_pass"] > numbers["high_pass_limit"] or numbers["median_nn_distance"] >= 0.4


def test_the_checks_separate_data_from_noise():
    """The statistic itself: training images pass, noise and wrongly coloured images do not."""
    data, labels = make_data()
    held, held_labels = make_data(48, seed=5)
    assert quality(held, held_labels, data)[0]
    assert not quality(torch.randn(48, 3, 8, 8), held_labels, data)[0]
    assert not quality(held, (held_labels + 1) % N_CLASSES, data)[0]
    leftover = (held + 0.5 * torch.randn(held.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    assert not quality(leftover, held_labels, data)[0]  # leftover noise fails the texture check
