"""``duodiff-fast sample`` builds its schedule with the time input the checkpoints declare."""
import torch

from duodiff_fast.cli import main
from duodiff_fast.methods import DuoDiff
from duodiff_fast.models import create_model, load_weights
from duodiff_fast.samplers import generate
from duodiff_fast.schedules import make_schedule
from tests.models.test_authors_checkpoints import authors_training_file


def _reference(full, shallow, time_input, n=2, seed=4):
    sched = make_schedule("linear", time_input)
    den = DuoDiff(shallow.eval(), full.eval(), sched, 300)
    with torch.inference_mode():
        return generate(den, sched, (3, 16, 16), n, batch_size=n, solver="ddim", num_steps=4, base_seed=seed,
                        device="cpu", progress=False, eta=0.0).float()


def test_duodiff_sample_with_the_authors_normalized_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    full = authors_training_file(tmp_path / "full.pth", create_model("tiny"))
    shallow = authors_training_file(tmp_path / "shallow.pth", create_model("tiny-shallow"))
    out = tmp_path / "s"
    assert main(["sample", "--config", "tiny", "--checkpoint", str(full), "--shallow-checkpoint", str(shallow),
                 "--t-s", "300", "--solver", "ddim", "--steps", "4", "--n-samples", "2", "--batch-size", "2",
                 "--seed", "4", "--out", str(out), "--no-progress"]) == 0
    got = torch.load(out / "samples.pt", weights_only=True)
    f, s = load_weights(create_model("tiny"), full), load_weights(create_model("tiny-shallow"), shallow)
    torch.testing.assert_close(got, _reference(f, s, "normalized"))
    assert not torch.allclose(got, _reference(f, s, "index"), atol=1e-3)

    # A shallow backbone trained with step indices cannot share the schedule: a clear error.
    idx = authors_training_file(tmp_path / "shallow_idx.pth", create_model("tiny-shallow"), normalize=False)
    assert main(["sample", "--config", "tiny", "--checkpoint", str(full), "--shallow-checkpoint", str(idx),
                 "--t-s", "300", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "different time inputs" in capsys.readouterr().err
