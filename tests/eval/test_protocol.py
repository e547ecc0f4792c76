"""The FID reference kinds `duodiff-fast eval` reads (ADM reference batch, U-ViT stats, images). The
recorded and printed protocol is tested end to end in tests/eval/test_caching_eval.py."""
import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'duodiff-fast[eval]')")
pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'duodiff-fast[eval]')")

from duodiff_fast.eval import fid  # noqa: E402
from duodiff_fast.eval.protocol import reference_info  # noqa: E402

D = fid.FEATURE_DIM


def _adm_batch(path, n=3, seed=0):
    """A small file in the layout of ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 uint8 NHWC + mu/sigma."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((8, D))
    np.savez(path, arr_0=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), mu=rng.standard_normal(D),
             sigma=a.T @ a / 8 + np.eye(D))
    return path


def test_reference_kinds(tmp_path):
    adm = _adm_batch(tmp_path / "VIRTUAL_tiny_labeled.npz")
    info = reference_info(str(adm))
    assert info["kind"].startswith("ADM reference batch") and info["images"] == 3
    assert info["sha256"] == fid.file_sha256(adm)
    with np.load(adm) as d:  # the stored statistics are used, not recomputed from arr_0
        stats = fid.reference_stats(str(adm))
        np.testing.assert_array_equal(stats.mu, d["mu"])
        np.testing.assert_array_equal(stats.sigma, d["sigma"])
    np.savez(tmp_path / "fid_stats_tiny.npz", mu=np.zeros(D), sigma=np.eye(D))
    info = reference_info(str(tmp_path / "fid_stats_tiny.npz"))
    assert info["kind"].startswith("statistics file") and info["images"] is None
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert reference_info(str(tmp_path / "imgs.npz"))["kind"].startswith("image npz")
    with pytest.raises(FileNotFoundError):
        reference_info(str(tmp_path / "missing.npz"))
