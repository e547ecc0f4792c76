"""Data sources (image folder, npz pixels/latents, synthetic), specs, errors, the step sampler."""
import numpy as np
import pytest
import torch
from PIL import Image

from duodiff_fast.training import (
    ImageFolderDataset,
    NpzDataset,
    StepSampler,
    SyntheticDataset,
    TensorDataset,
    build_dataset,
    check_dataset,
    iterate_batches,
    parse_data_spec,
)


def _save_image(path, w, h, colour, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format=fmt)


# ------------------------------------------------------------------------------- image folder
def test_image_folder_crop_resize_scale_and_labels(tmp_path):
    root = tmp_path / "imgs"
    _save_image(root / "cat" / "a.png", 20, 12, (255, 0, 0))
    _save_image(root / "cat" / "deep" / "b.jpg", 12, 12, (0, 255, 0), fmt="JPEG")
    _save_image(root / "dog" / "c.png", 8, 30, (0, 0, 255))
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, img_size=8, conditional=True)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and ds.num_labels == 2
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 0
    torch.testing.assert_close(x[0], torch.ones(8, 8))  # pure red -> +1 / -1
    torch.testing.assert_close(x[1], -torch.ones(8, 8))
    assert ds[2][1] == 1
    assert float(ds[1][0].min()) >= -1.0 and float(ds[1][0].max()) <= 1.0
    # build_dataset through a string spec, checked against a 2-class (+ null) model.
    ds2 = build_dataset(f"folder:{root}", img_size=8, in_chans=3, num_classes=3)
    assert len(ds2) == 3


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(empty, 8)
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "nope", 8)
    loose = tmp_path / "loose"
    _save_image(loose / "x.png", 8, 8, (1, 2, 3))
    assert len(ImageFolderDataset(loose, 8)) == 1  # fine unconditionally
    with pytest.raises(ValueError, match="sub-folder"):
        ImageFolderDataset(loose, 8, conditional=True)
    many = tmp_path / "many"
    for k in range(3):
        _save_image(many / f"c{k}" / "x.png", 8, 8, (k, k, k))
    with pytest.raises(ValueError, match="3 classes"):
        build_dataset(str(many), 8, 3, num_classes=3)  # room for 2 classes + null


# ------------------------------------------------------------------------------------- npz
def test_npz_pixels_nhwc_and_nchw_agree(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", arr_0=pix, labels=np.arange(5))
    np.savez(tmp_path / "nchw.npz", images=pix.transpose(0, 3, 1, 2))
    a = NpzDataset(tmp_path / "nhwc.npz", channels=3, conditional=True)
    b = build_dataset(str(tmp_path / "nchw.npz"), 8, 3, num_classes=0)
    xa, ya = a.get_batch(torch.arange(5))
    xb, _ = b.get_batch(torch.arange(5))
    torch.testing.assert_close(xa, xb)
    torch.testing.assert_close(xa, torch.from_numpy(pix).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert torch.equal(ya, torch.arange(5)) and a.num_labels == 5
    assert a.is_pixels


def test_npz_latents_used_as_is(tmp_path):
    lat = np.random.default_rng(1).standard_normal((4, 4, 8, 8)).astype(np.float32) * 3
    np.savez(tmp_path / "lat.npz", latents=lat, y=np.array([0, 1, 2, 0]))
    ds = build_dataset({"source": "npz", "path": str(tmp_path / "lat.npz"), "key": "latents"}, 8, 4, num_classes=4)
    x, y = ds.get_batch(torch.arange(4))
    assert torch.equal(x, torch.from_numpy(lat)) and torch.equal(y, torch.tensor([0, 1, 2, 0]))
    scaled = NpzDataset(tmp_path / "lat.npz", 4, key="latents", scale=0.5)
    torch.testing.assert_close(scaled[0][0], torch.from_numpy(lat[0]) * 0.5)


def test_npz_errors(tmp_path):
    pix = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "p.npz", arr_0=pix)
    with pytest.raises(KeyError, match="no array 'images'"):
        NpzDataset(tmp_path / "p.npz", 3, key="images")
    with pytest.raises(KeyError, match="no labels array"):
        build_dataset(str(tmp_path / "p.npz"), 8, 3, num_classes=11)
    with pytest.raises(ValueError, match=r"expects \(C, H, W\) = \(3, 16, 16\)"):
        build_dataset(str(tmp_path / "p.npz"), 16, 3, num_classes=0)
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((3, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        NpzDataset(tmp_path / "f.npz", 4)
    np.savez(tmp_path / "e.npz", arr_0=np.zeros((0, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no samples"):
        NpzDataset(tmp_path / "e.npz", 3)
    np.savez(tmp_path / "two.npz", a=pix, b=pix)
    with pytest.raises(KeyError, match="several arrays"):
        NpzDataset(tmp_path / "two.npz", 3)
    with pytest.raises(FileNotFoundError):
        NpzDataset(tmp_path / "missing.npz", 3)


# ---------------------------------------------------------------------- synthetic and specs
def test_synthetic_is_deterministic_and_labelled():
    a = SyntheticDataset(16, 8, 3, num_classes=4, seed=7)
    b = SyntheticDataset(16, 8, 3, num_classes=4, seed=7)
    c = SyntheticDataset(16, 8, 3, num_classes=4, seed=8)
    assert torch.equal(a.data, b.data) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.data, c.data)
    assert a.data.min() >= -1 and a.data.max() <= 1 and a.data.std() > 0.1
    assert int(a.labels.max()) < 4 and a.num_labels == 4
    assert SyntheticDataset(4, 8, 3).labels is None


def test_parse_data_spec(tmp_path):
    assert parse_data_spec("synthetic") == {"source": "synthetic"}
    assert parse_data_spec("synthetic:32") == {"source": "synthetic", "num_samples": 32}
    assert parse_data_spec("npz:/a/b.npz") == {"source": "npz", "path": "/a/b.npz"}
    assert parse_data_spec(str(tmp_path)) == {"source": "folder", "path": str(tmp_path)}
    with pytest.raises(ValueError, match="cannot tell"):
        parse_data_spec(str(tmp_path / "nothing.bin"))
    with pytest.raises(ValueError, match="unknown key"):
        parse_data_spec({"source": "npz", "path": "x.npz", "kee": "arr_0"})
    with pytest.raises(ValueError, match="source"):
        parse_data_spec({"path": "x"})


def test_check_dataset_against_model():
    unlabelled = TensorDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no labels"):
        check_dataset(unlabelled, 8, 3, num_classes=5)
    check_dataset(unlabelled, 8, 3, num_classes=0)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\)"):
        check_dataset(unlabelled, 8, 4, num_classes=0)
    labelled = TensorDataset(torch.zeros(2, 3, 8, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="5 classes"):
        check_dataset(labelled, 8, 3, num_classes=5)  # id 4 would collide with the null class
    with pytest.raises(ValueError, match="empty"):
        TensorDataset(torch.zeros(0, 3, 8, 8))


# --------------------------------------------------------------------------------- sampler
def test_step_sampler_epochs_shards_and_reproducibility():
    n, gb = 10, 4
    full = StepSampler(n, gb, seed=3)
    stream = torch.cat([full.indices(s)[0] for s in range(5)])  # 20 samples = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a fresh permutation each epoch
    r0, r1 = StepSampler(n, gb, rank=0, world_size=2, seed=3), StepSampler(n, gb, rank=1, world_size=2, seed=3)
    for s in range(5):
        assert torch.equal(torch.cat([r0.indices(s)[0], r1.indices(s)[0]]), full.indices(s)[0])
    fresh = StepSampler(n, gb, seed=3)
    assert torch.equal(fresh.indices(4)[0], full.indices(4)[0])  # no hidden state
    flips = StepSampler(n, gb, seed=3, hflip=True)
    f = torch.cat([flips.indices(s)[1] for s in range(50)])
    assert 0.3 < f.float().mean() < 0.7
    assert not full.indices(0)[1].any()
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(n, 3, world_size=2)


def test_iterate_batches_direct_and_dataloader_paths_agree(tmp_path):
    ds = SyntheticDataset(12, 8, 3, num_classes=3, seed=0)
    sampler = StepSampler(len(ds), 4, seed=1, hflip=True)
    direct = iterate_batches(ds, sampler, start_step=2)
    folder_like = torch.utils.data.Subset(ds, range(len(ds)))  # no get_batch: DataLoader path
    loader = iterate_batches(folder_like, sampler, start_step=2)
    for _ in range(4):
        (xa, ya), (xb, yb) = next(direct), next(loader)
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)


def test_one_channel_data_in_every_layout(tmp_path):
    """1-channel pixels as uint8 NHWC (and NHW), float NCHW and a grayscale image folder, with labels."""
    from PIL import Image

    from duodiff_fast.training.data import build_dataset

    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", images=pix, labels=labels)
    np.savez(tmp_path / "nhw.npz", arr_0=pix[..., 0], y=labels)
    as_float = pix.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.savez(tmp_path / "nchw.npz", images=as_float, label=labels)
    want = torch.from_numpy(as_float)
    for name in ("nhwc", "nhw", "nchw"):
        ds = build_dataset(f"npz:{tmp_path / name}.npz", 8, 1, num_classes=4)
        x, y = ds.get_batch(torch.arange(6))
        assert x.shape == (6, 1, 8, 8) and y.tolist() == labels.tolist(), name
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 100, 50)).save(root / cls / "0.png")
    ds = build_dataset(f"folder:{root}", 8, 1, num_classes=3)
    x, y = ds[1]
    assert x.shape == (1, 8, 8) and y == 1
    gray = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    assert x[0, 0, 0].item() == pytest.approx(gray / 127.5 - 1, abs=1e-6)
