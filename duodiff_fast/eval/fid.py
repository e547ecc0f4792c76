"""Frechet Inception Distance through torch-fidelity's Inception-v3 (an optional dependency).

Why torch-fidelity: it ships the TF-ported Inception-v3 of the original FID (the
``pt_inception-2015-12-05`` graph, weights file ``weights-inception-2015-12-05-6726825d.pth``)
together with its TF-1.x-exact bilinear resize to 299x299, and torchmetrics' FID itself wraps the
same extractor. Install it with ``pip install 'duodiff-fast[eval]'``.

Nothing is downloaded here. The Inception weights come from a path the user gives
(``--inception-weights``) or from torch.hub's cache, where torch-fidelity itself keeps them
(:func:`default_inception_path`); a missing file raises an error that says where to put it. The
file is read with ``torch.load(weights_only=True)`` (no pickled code runs) and handed to
torch-fidelity's constructor as an in-memory state dict. For tests and CPU smoke checks,
:func:`random_inception_state_dict` generates a randomly initialised state dict of the same
layout (so the whole pipeline runs without the real weights; the numbers are then meaningless).

Pipeline: uint8 images (N, H, W, C) or (N, C, H, W) (C = 1 or 3) -> Inception pool3 features
(N, 2048) float64 -> statistics (mu (2048,), sigma (2048, 2048)) -> Frechet distance, computed by
torch-fidelity's ``fid_statistics_to_metric``.

Reference statistics (:func:`reference_stats`): a ``.npz`` with ``mu`` and ``sigma`` (U-ViT's
``fid_stats_*.npz`` files, or one this module wrote) is used as is; an image ``.npz`` (``arr_0``)
or an image folder is featurised once and the result cached as ``.npz`` (mu, sigma, count and a
JSON ``meta`` naming the source and the Inception weights' SHA-256), keyed by source and weights.
Note: U-ViT's precomputed stats were made with pytorch-fid, whose resize and input scaling differ
slightly from TF's (torch-fidelity follows TF); for exact consistency compute the reference stats
here from the dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Dict, Iterator, Optional, Union

import numpy as np
import torch

__all__ = [
    "INCEPTION_FILENAME", "PYTORCH_FID_FILENAME", "INCEPTION_URL", "FEATURE_DIM", "require_torch_fidelity", "default_inception_path",
    "load_inception_state_dict", "random_inception_state_dict", "InceptionFeatures", "FIDStats",
    "compute_stats", "frechet_distance", "fid_from_stats", "iter_image_batches", "reference_stats", "file_sha256",
]

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's (and U-ViT's) name for it
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub's naming: the file's SHA-256 starts with this
FEATURE_DIM = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

PathLike = Union[str, "os.PathLike[str]"]


def require_torch_fidelity():
    """The ``torch_fidelity`` module, or an ImportError that says how to install it."""
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "FID needs the optional dependency torch-fidelity: pip install 'duodiff-fast[eval]' "
            f"(or pip install torch-fidelity); import failed: {e}") from e
    return torch_fidelity


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def default_inception_path() -> str:
    """Where torch-fidelity caches the weights: ``<torch.hub.get_dir()>/checkpoints/<INCEPTION_FILENAME>``.

    When only pytorch-fid's copy (``PYTORCH_FID_FILENAME``, the same weights under torchvision's
    key names, which torch-fidelity's module shares) sits in that folder, that file is returned.
    """
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    ours, theirs = os.path.join(folder, INCEPTION_FILENAME), os.path.join(folder, PYTORCH_FID_FILENAME)
    return theirs if not os.path.isfile(ours) and os.path.isfile(theirs) else ours


def load_inception_state_dict(path: Optional[PathLike] = None) -> Dict[str, torch.Tensor]:
    """The Inception-v3 state dict from ``path`` (default: :func:`default_inception_path`).

    Raises FileNotFoundError naming where the file is expected and where it comes from.
    """
    where = os.fspath(path) if path is not None else default_inception_path()
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"Inception-v3 weights not found at {where}. FID needs torch-fidelity's "
            f"{INCEPTION_FILENAME} (the pt_inception-2015-12-05 weights, {INCEPTION_URL}; pytorch-fid's "
            f"{PYTORCH_FID_FILENAME} holds the same network under the same key names); nothing is "
            f"downloaded at run time: copy the file to {default_inception_path()} (torch.hub's cache, "
            "$TORCH_HOME) or pass its path with --inception-weights")
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{where} is not a readable PyTorch state dict (read with weights_only=True): {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{where} does not hold a state dict of tensors")
    return obj


def _extractor_class():
    require_torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def _state_dict_bytes(state_dict: Dict[str, torch.Tensor]) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return buf


def _inception_layout() -> Dict[str, tuple]:
    """{key: (shape, dtype)} of the extractor's state dict, read off a module built without weights."""
    cls = _extractor_class()

    class _Skeleton(cls):  # only to read the layout: skip the weight load of the constructor
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    with torch.device("meta"):
        skeleton = _Skeleton("inception-layout", ["2048"], feature_extractor_weights_path=_state_dict_bytes({}))
    return {k: (tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}


def random_inception_state_dict(seed: int = 0) -> Dict[str, torch.Tensor]:
    """A randomly initialised state dict with the layout of torch-fidelity's Inception-v3.

    Convolutions are drawn He-normal (std sqrt(2 / fan_in)) and every batch norm is the identity,
    so activations keep their scale through the 94 conv layers and the features are neither zero
    nor overflowing. For tests and smoke checks only: the features mean nothing.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in _inception_layout().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=dtype)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            out[key] = torch.ones(shape, dtype=dtype)
        elif key.endswith("running_mean") or key.endswith("bn.bias") or key == "fc.bias":
            out[key] = torch.zeros(shape, dtype=dtype)
        else:  # conv / fc weights: (out, in, kh, kw) or (out, in)
            fan_in = int(np.prod(shape[1:]))
            out[key] = torch.randn(shape, generator=g, dtype=torch.float32).mul_((2.0 / fan_in) ** 0.5).to(dtype)
    return out


def _as_nchw_uint8(images, name: str = "images") -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> uint8 (N, 3, H, W) tensor on the CPU."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a numpy array or a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 in [0, 255] (convert float samples with "
                        f"duodiff_fast.samplers.to_uint8), got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (N, H, W, C) or (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)  # NHWC (the .npz layout, preferred when ambiguous) -> NCHW
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels, got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous()


class InceptionFeatures:
    """Inception-v3 pool3 features (torch-fidelity's extractor) of uint8 images.

    Args:
        state_dict: the extractor's weights (:func:`load_inception_state_dict` or
            :func:`random_inception_state_dict`).
        device: where the network runs (default: cuda when available).
        batch_size: images per forward pass.
        weights_id: a label of the weights for caches and reports (e.g. the file's SHA-256, or
            "random-seed0").

    ``features(images)`` -> (N, 2048) float64 numpy array; images are resized to 299x299 inside
    torch-fidelity's module (TF-1.x bilinear), uint8 in.
    """

    def __init__(self, state_dict: Dict[str, torch.Tensor], device=None, batch_size: int = 64,
                 weights_id: str = "unknown"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cls = _extractor_class()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.weights_id = weights_id
        # torch-fidelity's own constructor loads the weights (strictly) from the in-memory file.
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=_state_dict_bytes(state_dict))
        self.net.to(self.device).eval()

    @classmethod
    def from_file(cls, path: Optional[PathLike] = None, device=None, batch_size: int = 64) -> "InceptionFeatures":
        """Real weights from ``path`` or torch.hub's cache (see :func:`load_inception_state_dict`)."""
        where = os.fspath(path) if path is not None else default_inception_path()
        sd = load_inception_state_dict(where)
        return cls(sd, device, batch_size, weights_id="sha256:" + file_sha256(where))

    @classmethod
    def random(cls, seed: int = 0, device=None, batch_size: int = 64) -> "InceptionFeatures":
        """Randomly initialised weights (tests and smoke checks: the FID values mean nothing)."""
        return cls(random_inception_state_dict(seed), device, batch_size, weights_id=f"random-seed{seed}")

    @property
    def is_standard(self) -> bool:
        """True for the pt_inception-2015-12-05 file (its SHA-256 starts with 6726825d)."""
        return self.weights_id.startswith("sha256:" + INCEPTION_SHA256_PREFIX)

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """(N, 2048) float64 features of uint8 images (N, H, W, C) or (N, C, H, W), in batches."""
        x = _as_nchw_uint8(images)
        out = []
        for k in range(0, x.shape[0], self.batch_size):
            (feat,) = self.net(x[k:k + self.batch_size].to(self.device))
            out.append(feat.double().cpu().numpy())
        if not out:
            return np.zeros((0, FEATURE_DIM))
        return np.concatenate(out)

    def features_of(self, source: PathLike, progress: bool = False) -> np.ndarray:
        """Features of every image of an image ``.npz`` (``arr_0``) or an image folder."""
        from tqdm import tqdm

        feats = []
        with tqdm(desc="inception", unit="img", disable=not progress) as bar:
            for batch in iter_image_batches(source, self.batch_size):
                feats.append(self.features(batch))
                bar.update(len(batch))
        if not feats:
            raise ValueError(f"{os.fspath(source)} holds no images")
        return np.concatenate(feats)


def _folder_files(folder: str) -> list:
    files = []
    for root, _, names in os.walk(folder):
        files.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(files)


def iter_image_batches(source: PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches (n <= batch_size, H, W, C) of an image ``.npz`` (``arr_0``) or a folder.

    Folder images (recursive, sorted by path) are read with PIL and converted to RGB; a batch ends
    early where the image size changes (sizes may differ across the folder).
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        from PIL import Image

        batch, size = [], None
        for path in _folder_files(source):
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if batch and (len(batch) == batch_size or arr.shape != size):
                yield np.stack(batch)
                batch = []
            batch.append(arr)
            size = arr.shape
        if batch:
            yield np.stack(batch)
        return
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no image folder or .npz file at {source}")
    with np.load(source) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{source} has no 'arr_0' image array (keys: {data.files})")
        arr = data["arr_0"]
    if arr.dtype != np.uint8:
        raise ValueError(f"{source}: arr_0 must be uint8 images (N, H, W, C), got dtype {arr.dtype} "
                         "(latents must be decoded into images first)")
    for k in range(0, arr.shape[0], batch_size):
        yield arr[k:k + batch_size]


@dataclasses.dataclass
class FIDStats:
    """Feature statistics: mu (D,), sigma (D, D) float64, the number of images and provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0
    meta: Dict[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"FID statistics need mu (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("FID statistics hold non-finite values")

    def save(self, path: PathLike) -> None:
        """Write an ``.npz`` with keys mu, sigma (U-ViT's layout), count and meta (JSON), atomically."""
        from ..io_utils import atomic_write

        with atomic_write(path, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=np.int64(self.count),
                     meta=np.array(json.dumps(self.meta, sort_keys=True)))

    @classmethod
    def load(cls, path: PathLike) -> "FIDStats":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (U-ViT's fid_stats files or :meth:`save`'s)."""
        path = os.fspath(path)
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise ValueError(f"{path} is not an FID statistics file: it needs keys 'mu' and 'sigma', "
                                 f"has {data.files}")
            count = int(data["count"]) if "count" in data.files else 0
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            return cls(data["mu"], data["sigma"], count, meta)


def compute_stats(features: np.ndarray, meta: Optional[Dict[str, object]] = None) -> FIDStats:
    """mu and sigma (unbiased covariance, as the original FID) of (N, D) features, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need features (N, D) with N >= 2, got shape {features.shape}")
    return FIDStats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0], dict(meta or {}))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), by torch-fidelity.

    torch-fidelity takes tr((sigma1 sigma2)^(1/2)) as the sum of square roots of the eigenvalues
    of sigma1 sigma2 (real parts), which stays finite for singular covariances (fewer images than
    feature dimensions).
    """
    require_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a, b = FIDStats(mu1, sigma1), FIDStats(mu2, sigma2)
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"FID statistics of different dimensions: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(out[KEY_METRIC_FID])


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """FID between two :class:`FIDStats`."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _source_key(source: str) -> str:
    """A short id of an image source: its absolute path plus size/mtime (file) or file list (folder)."""
    h = hashlib.sha256(os.path.abspath(source).encode())
    if os.path.isdir(source):
        for path in _folder_files(source):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, source)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        st = os.stat(source)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def reference_stats(source: PathLike, extractor: Optional[InceptionFeatures] = None,
                    cache_dir: Optional[PathLike] = None, progress: bool = False) -> FIDStats:
    """Reference statistics from ``source``.

    ``source`` is a statistics ``.npz`` (keys mu, sigma: used as is, no extractor needed), an image
    ``.npz`` (``arr_0``) or an image folder. Images are featurised with ``extractor`` once; the
    statistics are cached in ``cache_dir`` (default ``~/.cache/duodiff_fast/fid_stats``) under a
    name made of the source's path/size/mtime and the extractor's weights id, and read back on the
    next call.
    """
    source = os.fspath(source)
    if os.path.isfile(source) and source.endswith(".npz"):
        with np.load(source, allow_pickle=False) as data:
            is_stats = "mu" in data.files and "sigma" in data.files
        if is_stats:
            return FIDStats.load(source)
    elif not os.path.isdir(source):
        raise FileNotFoundError(f"FID reference not found: {source} (expected a stats .npz, an image .npz or a folder)")
    if extractor is None:
        raise ValueError(f"{source} holds images: computing reference statistics needs the Inception network")
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(
        os.path.expanduser("~"), ".cache", "duodiff_fast", "fid_stats")
    weights = "".join(c if c.isalnum() else "-" for c in extractor.weights_id)[:24]
    name = os.path.basename(os.path.normpath(source)).replace(".", "_")
    cache = os.path.join(cache_dir, f"{name}-{_source_key(source)}-{weights}.npz")
    if os.path.isfile(cache):
        return FIDStats.load(cache)
    feats = extractor.features_of(source, progress=progress)
    stats = compute_stats(feats, meta={"source": os.path.abspath(source), "inception": extractor.weights_id})
    stats.save(cache)
    return stats
