"""FID: Frechet distance against scipy, the Inception feature pipeline with random weights, stats cache."""
import os

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.eval import fid  # noqa: E402


def _scipy_fid(mu1, s1, mu2, s2):
    """tr(sqrt(S1 S2)) as tr(sqrt(S1^(1/2) S2 S1^(1/2))), a symmetric PSD form that is exact for singular S."""
    import scipy.linalg

    r1 = scipy.linalg.sqrtm(s1).real
    r1 = (r1 + r1.T) / 2
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _stats(rng, n, d, scale=1.0):
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * scale + rng.standard_normal(d)
    return fid.compute_stats(feats)


def test_frechet_distance_matches_scipy_full_rank():
    pytest.importorskip("scipy", reason="scipy not installed (it is in the [test] extra)")
    rng = np.random.default_rng(0)
    a, b = _stats(rng, 200, 12), _stats(rng, 150, 12, scale=1.3)
    got = fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    want = _scipy_fid(a.mu, a.sigma, b.mu, b.sigma)
    assert got == pytest.approx(want, rel=1e-8)
    assert got > 1.0
    assert fid.fid_from_stats(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_scipy_near_singular():
    """Fewer samples than dimensions: both covariances are rank-deficient (what a small run gives)."""
    pytest.importorskip("scipy", reason="scipy not installed (it is in the [test] extra)")
    rng = np.random.default_rng(1)
    a, b = _stats(rng, 9, 40), _stats(rng, 11, 40, scale=0.7)
    assert np.linalg.matrix_rank(a.sigma) < 40 and np.linalg.matrix_rank(b.sigma) < 40
    # and one that is singular up to a tiny perturbation
    c = fid.FIDStats(b.mu + 0.1, b.sigma + 1e-9 * np.eye(40))
    for x, y in ((a, b), (a, c), (c, b)):
        got = fid.fid_from_stats(x, y)
        want = _scipy_fid(x.mu, x.sigma, y.mu, y.sigma)
        assert np.isfinite(got)
        # The zero eigenvalues of a singular product come out as rounding noise ~ eps * scale, and
        # their square roots, summed over D of them, bound how far any two methods can agree.
        scale = np.trace(x.sigma) + np.trace(y.sigma)
        assert got == pytest.approx(want, rel=1e-6, abs=40 * np.sqrt(1e-15 * scale))


def test_frechet_distance_bad_inputs():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="different dimensions"):
        fid.frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu \\(D,\\) and sigma"):
        fid.frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.compute_stats(np.zeros((1, 4)))


@pytest.fixture(scope="module")
def extractor():
    return fid.InceptionFeatures.random(seed=0, device="cpu", batch_size=2)


def test_random_inception_features_shapes_layouts_and_resizing(extractor):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    f = extractor.features(nhwc)  # 3 images, batch size 2: two forward passes
    assert f.shape == (3, fid.FEATURE_DIM) and f.dtype == np.float64
    assert np.isfinite(f).all() and f.std() > 0
    assert not np.allclose(f[0], f[1])
    # the same images in (N, C, H, W) give the same features; one at a time too (batching)
    np.testing.assert_allclose(extractor.features(nhwc[:1].transpose(0, 3, 1, 2)), f[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extractor.features(nhwc[2:]), f[2:], rtol=1e-5, atol=1e-6)
    # grayscale is replicated to RGB; other sizes are resized to 299 inside the network
    gray = rng.integers(0, 256, (1, 40, 40, 1), dtype=np.uint8)
    np.testing.assert_allclose(extractor.features(gray), extractor.features(np.repeat(gray, 3, axis=3)),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="uint8"):
        extractor.features(nhwc.astype(np.float32))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extractor.features(np.zeros((1, 8, 8, 4), np.uint8))


def test_folder_and_npz_sources_batch_across_files(extractor, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for k, im in enumerate(imgs):  # a nested folder and mixed extensions; sorted by path
        where = folder / "sub" if k >= 2 else folder
        Image.fromarray(im).save(where / f"{k:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    batches = list(fid.iter_image_batches(folder, 2))
    assert [len(b) for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    want = extractor.features(imgs)
    np.testing.assert_allclose(extractor.features_of(folder), want, rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "imgs.npz", arr_0=imgs)
    np.testing.assert_allclose(extractor.features_of(tmp_path / "imgs.npz"), want, rtol=1e-5, atol=1e-6)
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        extractor.features_of(tmp_path / "float.npz")


def test_stats_cache_round_trip(extractor, tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(3)
    folder = tmp_path / "ref"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    cache = tmp_path / "cache"
    first = fid.reference_stats(folder, extractor, cache_dir=cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz") and extractor.weights_id in files[0]
    assert first.count == 3 and first.meta["inception"] == extractor.weights_id

    def boom(*a, **k):
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(extractor, "features_of", boom)
    again = fid.reference_stats(folder, extractor, cache_dir=cache)
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert again.count == 3 and again.meta == first.meta
    # the cache file is itself a stats .npz (keys mu, sigma), readable as a reference
    direct = fid.reference_stats(cache / files[0])
    np.testing.assert_array_equal(direct.mu, first.mu)


def test_uvit_style_stats_file_loads(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(6), np.cov(rng.standard_normal((20, 6)), rowvar=False)
    np.savez(tmp_path / "fid_stats_cifar10_train_pytorch.npz", mu=mu, sigma=sigma)  # U-ViT's keys only
    st = fid.reference_stats(tmp_path / "fid_stats_cifar10_train_pytorch.npz")
    np.testing.assert_array_equal(st.mu, mu)
    np.testing.assert_array_equal(st.sigma, sigma)
    assert st.count == 0 and st.meta == {}
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="needs a|holds images|arr_0"):
        fid.reference_stats(tmp_path / "bad.npz", None)


def test_missing_inception_weights_error_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as e:
        fid.InceptionFeatures.from_file(None)
    msg = str(e.value)
    assert fid.INCEPTION_FILENAME in msg and "--inception-weights" in msg
    assert str(tmp_path / "torch_home") in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        fid.load_inception_state_dict(tmp_path / "nope.pth")
    # pytorch-fid's copy in the same cache folder is found when torch-fidelity's is absent
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / fid.PYTORCH_FID_FILENAME).write_bytes(b"")
    assert fid.default_inception_path() == str(folder / fid.PYTORCH_FID_FILENAME)
    (folder / fid.INCEPTION_FILENAME).write_bytes(b"")
    assert fid.default_inception_path() == str(folder / fid.INCEPTION_FILENAME)


def test_real_weights_file_is_loaded_safely(tmp_path):
    """A weights file goes through torch.load(weights_only=True) and torch-fidelity's strict load."""
    import torch

    sd = fid.random_inception_state_dict(seed=5)
    path = tmp_path / fid.INCEPTION_FILENAME
    torch.save(sd, path)
    ex = fid.InceptionFeatures.from_file(path, device="cpu")
    assert ex.weights_id == "sha256:" + fid.file_sha256(path)
    assert not ex.is_standard  # random weights do not carry the published file's hash
    bad = dict(sd)
    bad.pop("fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        fid.InceptionFeatures.from_file(tmp_path / "bad.pth", device="cpu")
