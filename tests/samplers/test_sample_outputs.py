"""Output writers: uint8 conversion, npz round trip, PNG grids, raw tensors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from duodiff_fast.samplers import load_npz, make_grid, save_npz, save_png_grid, save_tensor, to_uint8


def test_to_uint8_values_and_layout():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0, 1 / 127.5 - 1]).view(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 3, 1)
    assert u[0, :, :, 0].tolist() == [[0, 0, 128], [255, 255, 1]]
    rgb = torch.zeros(2, 3, 4, 5)
    rgb[:, 1] = 1.0
    ur = to_uint8(rgb)
    assert ur.shape == (2, 4, 5, 3) and (ur[..., 1] == 255).all() and (ur[..., 0] == 128).all()
    with pytest.raises(TypeError, match="floating"):
        to_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        to_uint8(torch.zeros(3, 2, 2))


def test_npz_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 6, 5, generator=g) * 2 - 1
    labels = torch.tensor([3, 1, 0, 7])
    path = tmp_path / "sub" / "samples.npz"
    save_npz(path, images, labels)
    arr, lab = load_npz(path)
    assert arr.shape == (4, 6, 5, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, to_uint8(images))
    np.testing.assert_array_equal(lab, labels.numpy())
    with np.load(path) as d:  # the evaluator layout: arr_0 images, arr_1 labels
        assert sorted(d.files) == ["arr_0", "arr_1"]
    save_npz(path, images)  # overwrite without labels
    arr2, lab2 = load_npz(path)
    assert lab2 is None and np.array_equal(arr2, arr)
    assert [p for p in os.listdir(path.parent) if p != "samples.npz"] == []  # no temp files left
    with pytest.raises(ValueError, match="labels"):
        save_npz(path, images, torch.tensor([1, 2]))


def test_npz_float_latents(tmp_path):
    lat = torch.randn(2, 4, 3, 3) * 3  # outside [-1, 1]: must not be clamped
    save_npz(tmp_path / "lat.npz", lat, torch.tensor([0, 5]), as_uint8=False)
    arr, lab = load_npz(tmp_path / "lat.npz")
    assert arr.dtype == np.float32 and arr.shape == (2, 4, 3, 3)
    np.testing.assert_array_equal(arr, lat.numpy())
    assert lab.tolist() == [0, 5]


def test_png_grid_size_and_content(tmp_path):
    images = -torch.ones(5, 3, 4, 6)
    images[2] = 1.0  # third image white
    path = tmp_path / "grid.png"
    save_png_grid(path, images, nrow=3, padding=2)
    img = Image.open(path)
    assert img.mode == "RGB"
    # rows = ceil(5/3) = 2; H = 2*(4+2)+2 = 14, W = 3*(6+2)+2 = 26
    assert img.size == (26, 14)
    a = np.asarray(img)
    assert (a[2:6, 2 + 2 * 8 : 2 + 2 * 8 + 6] == 255).all()  # image 2: row 0, col 2
    assert (a[2:6, 2:8] == 0).all()
    # default nrow = ceil(sqrt(B)); grayscale works
    save_png_grid(tmp_path / "g2.png", torch.zeros(4, 1, 3, 3), padding=0)
    g2 = Image.open(tmp_path / "g2.png")
    assert g2.size == (6, 6) and g2.mode == "L"
    assert make_grid(torch.zeros(1, 3, 2, 2), padding=1).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        save_png_grid(tmp_path / "bad.png", torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match="nrow"):
        save_png_grid(tmp_path / "bad.png", torch.zeros(2, 3, 3, 3), nrow=0)


@pytest.mark.parametrize("name", ["lat.pt", "lat.safetensors"])
def test_save_tensor_round_trip(tmp_path, name):
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 2, 3])
    save_tensor(tmp_path / name, x, y)
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        d = load_file(str(tmp_path / name))
    else:
        d = torch.load(tmp_path / name, weights_only=True)
    assert torch.equal(d["images"], x) and torch.equal(d["labels"], y)
    with pytest.raises(TypeError):
        save_tensor(tmp_path / name, torch.zeros(2, dtype=torch.long))
