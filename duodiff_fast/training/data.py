"""Training data: image folders, ``.npz`` arrays and a synthetic source, plus a reproducible sampler.

Every dataset returns samples as ``(x, y)``: ``x`` a float32 (C, H, W) tensor (pixels scaled to
[-1, 1], or latents as stored) and ``y`` an int class id (0 when the data has no labels).
In-memory datasets also provide ``get_batch(indices) -> (x (B, C, H, W), y (B,) int64)``.

Which samples a step uses, and which of them are flipped, is a pure function of
``(seed, step, rank)`` (see :class:`StepSampler`): a resumed run sees exactly the batches the
uninterrupted run would have seen, without any sampler state to carry around.

Data source specs (``TrainConfig.data``):
    "synthetic" or {"source": "synthetic", "num_samples": 256, "seed": 0}
    "folder:/path" or {"source": "folder", "path": "/path", "hflip": True}
    "npz:/path.npz" or {"source": "npz", "path": ..., "key": "arr_0", "labels_key": "labels",
                        "scale": 1.0}
    a bare path: a directory is a folder, a ``*.npz`` file an npz source.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..seeding import mix_seed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABEL_KEY_CANDIDATES = ("labels", "label", "y")

DataSpec = Union[str, "os.PathLike[str]", Dict[str, Any]]


# --------------------------------------------------------------------------------- datasets
def _pil_to_tensor(img, img_size: int, channels: int) -> torch.Tensor:
    """Center-crop to a square, resize to ``img_size`` and scale to [-1, 1]; -> (C, H, W) float32."""
    from PIL import Image

    if channels == 3:
        img = img.convert("RGB")
    elif channels == 1:
        img = img.convert("L")
    else:
        raise ValueError(f"image folders hold 1- or 3-channel images; the model wants {channels} channels")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != img_size:
        img = img.resize((img_size, img_size), resample=Image.BICUBIC, reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()  # (C, H, W) in [0, 255]
    return x / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """PNG/JPEG images found recursively under ``root``.

    Args:
        root: directory to scan (recursively; hidden entries are skipped).
        img_size: output side; each image is center-cropped to a square and resized to it.
        channels: 3 (RGB) or 1 (grayscale).
        conditional: take the class label from the first-level sub-folder name (classes sorted by
            name, ids 0..K-1); images lying directly in ``root`` are then an error.
    """

    def __init__(self, root: str, img_size: int, channels: int = 3, conditional: bool = False):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        self.root = root
        self.img_size = int(img_size)
        self.channels = int(channels)
        self.files: List[str] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append(os.path.join(dirpath, name))
        if not self.files:
            raise ValueError(
                f"image folder {root!r} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.classes: Optional[List[str]] = None
        self.labels: Optional[List[int]] = None
        if conditional:
            rel_first = [os.path.relpath(f, root).split(os.sep)[0] for f in self.files]
            loose = [f for f, first in zip(self.files, rel_first) if first == os.path.basename(f)]
            if loose:
                raise ValueError(
                    f"class-conditional training takes labels from sub-folder names, but {len(loose)} "
                    f"image(s) lie directly in {root!r} (e.g. {loose[0]!r}); move them into class folders"
                )
            self.classes = sorted(set(rel_first))
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[c] for c in rel_first]

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.img_size, self.img_size)

    @property
    def num_labels(self) -> Optional[int]:
        """Number of distinct classes, or None for unlabelled data."""
        return None if self.classes is None else len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as img:
                x = _pil_to_tensor(img, self.img_size, self.channels)
        except OSError as e:
            raise OSError(f"cannot read image {path!r}: {e}") from e
        return x, (self.labels[i] if self.labels is not None else 0)


class TensorDataset(Dataset):
    """In-memory samples: ``data`` (N, C, H, W) uint8 pixels or float values, optional labels (N,).

    uint8 pixels are scaled to [-1, 1] per batch (so memory stays at one byte a pixel); floats are
    multiplied by ``scale`` and used as they are.
    """

    def __init__(self, data: torch.Tensor, labels: Optional[torch.Tensor] = None, scale: float = 1.0,
                 num_labels: Optional[int] = None):
        if data.dim() != 4:
            raise ValueError(f"data must have shape (N, C, H, W), got {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise ValueError("the dataset is empty (0 samples)")
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).long()
            if labels.shape[0] != data.shape[0]:
                raise ValueError(f"{data.shape[0]} samples but {labels.shape[0]} labels")
            if int(labels.min()) < 0:
                raise ValueError(f"labels must be >= 0, got a minimum of {int(labels.min())}")
        self.data = data
        self.labels = labels
        self.scale = float(scale)
        self._num_labels = num_labels

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return tuple(self.data.shape[1:])

    @property
    def num_labels(self) -> Optional[int]:
        if self.labels is None:
            return None
        return self._num_labels if self._num_labels is not None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.data.shape[0]

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            return x.float() / 127.5 - 1.0
        x = x.float()
        return x * self.scale if self.scale != 1.0 else x

    def get_batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,) int64 indices -> x (B, C, H, W) float32, y (B,) int64."""
        x = self._convert(self.data[indices])
        y = self.labels[indices] if self.labels is not None else torch.zeros(len(indices), dtype=torch.long)
        return x, y

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        y = int(self.labels[i]) if self.labels is not None else 0
        return self._convert(self.data[i]), y


def _pick_key(keys: Sequence[str], key: Optional[str], path: str) -> str:
    if key is not None:
        if key not in keys:
            raise KeyError(f"{path!r} has no array {key!r}; its arrays are {sorted(keys)}")
        return key
    if "arr_0" in keys:
        return "arr_0"
    data_keys = [k for k in keys if k not in LABEL_KEY_CANDIDATES and k != "arr_1"]
    if len(data_keys) == 1:
        return data_keys[0]
    raise KeyError(f"{path!r} holds several arrays {sorted(keys)}; name the data array with 'key'")


def _to_nchw(arr: np.ndarray, channels: int, path: str) -> np.ndarray:
    """uint8 pixels in NHWC or NCHW (or NHW for one channel) -> NCHW; floats must be NCHW already."""
    if arr.ndim == 3 and channels == 1:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"the array in {path!r} must be 4-D (N, C, H, W) or (N, H, W, C), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        if arr.shape[1] == channels and arr.shape[2] == arr.shape[3]:
            return arr
        if arr.shape[3] == channels:
            return arr.transpose(0, 3, 1, 2)
        raise ValueError(
            f"uint8 pixels in {path!r} have shape {arr.shape}: neither NCHW nor NHWC with {channels} channels"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"the array in {path!r} must be uint8 pixels or floats, got dtype {arr.dtype}")
    if arr.shape[1] != channels:
        raise ValueError(
            f"float arrays in {path!r} are used as-is and must be NCHW with {channels} channels, "
            f"got shape {arr.shape}"
        )
    return arr


class NpzDataset(TensorDataset):
    """Samples from an ``.npz`` file.

    Args:
        path: the ``.npz`` file.
        channels: the model's input channels (used to tell NHWC from NCHW uint8 pixels).
        key: data array name (default "arr_0", or the only non-label array).
        labels_key: label array name; None picks "labels"/"label"/"y" when ``conditional``.
        conditional: labels are required.
        scale: multiplier for float (latent) arrays, e.g. 0.18215 for raw KL-f8 latents.
    """

    def __init__(self, path: str, channels: int, key: Optional[str] = None, labels_key: Optional[str] = None,
                 conditional: bool = False, scale: float = 1.0):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"npz file {path!r} does not exist")
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            data_key = _pick_key(keys, key, path)
            arr = _to_nchw(z[data_key], channels, path)
            labels = None
            if labels_key is None and conditional:
                labels_key = next((k for k in LABEL_KEY_CANDIDATES if k in keys), None)
                if labels_key is None:
                    raise KeyError(
                        f"the model is class-conditional but {path!r} has no labels array "
                        f"(looked for {LABEL_KEY_CANDIDATES}; arrays: {sorted(keys)}); name it with 'labels_key'"
                    )
            if labels_key is not None:
                if labels_key not in keys:
                    raise KeyError(f"{path!r} has no labels array {labels_key!r}; its arrays are {sorted(keys)}")
                labels = z[labels_key]
                if not np.issubdtype(labels.dtype, np.integer):
                    raise TypeError(f"labels {labels_key!r} in {path!r} must be integers, got {labels.dtype}")
                labels = torch.from_numpy(labels.astype(np.int64).reshape(-1))
        if arr.shape[0] == 0:
            raise ValueError(f"array {data_key!r} in {path!r} holds no samples")
        data = torch.from_numpy(np.ascontiguousarray(arr))
        if data.is_floating_point():
            data = data.float()
        super().__init__(data, labels, scale=scale)
        self.path = path
        self.key = data_key
        self.is_pixels = data.dtype == torch.uint8


class SyntheticDataset(TensorDataset):
    """Deterministic smooth images (sums of gaussian blobs) for tests and smoke runs.

    Each sample holds ``blobs`` gaussian bumps with random centres and widths on a dark
    background, values in [-1, 1]. With ``num_classes > 0`` every class has its own colour, so
    labels carry information. The same ``seed`` always gives the same data.
    """

    def __init__(self, num_samples: int, img_size: int, channels: int, num_classes: int = 0,
                 seed: int = 0, blobs: int = 2):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        g = torch.Generator().manual_seed(int(seed))
        n, s = int(num_samples), int(img_size)
        coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # pixel centres in (0, 1)
        centres = torch.rand(n, blobs, 2, generator=g) * 0.6 + 0.2  # (N, K, 2)
        widths = torch.rand(n, blobs, 1, 1, generator=g) * 0.15 + 0.12  # (N, K, 1, 1)
        dy = coords.view(1, 1, s, 1) - centres[..., 0].view(n, blobs, 1, 1)
        dx = coords.view(1, 1, 1, s) - centres[..., 1].view(n, blobs, 1, 1)
        bumps = torch.exp(-(dx ** 2 + dy ** 2) / (2 * widths ** 2))  # (N, K, S, S)
        labels = None
        if num_classes > 0:
            labels = torch.randint(0, num_classes, (n,), generator=g)
            palette = torch.rand(num_classes, channels, generator=g) * 2 - 1  # (K_cls, C)
            colour = palette[labels].view(n, 1, channels, 1, 1).expand(n, blobs, channels, 1, 1)
        else:
            colour = torch.rand(n, blobs, channels, 1, 1, generator=g) * 2 - 1
        img = (bumps.unsqueeze(2) * (colour + 1.0)).sum(1) - 0.8  # (N, C, S, S)
        super().__init__(img.clamp(-1.0, 1.0).contiguous(), labels,
                         num_labels=num_classes if num_classes > 0 else None)


# ------------------------------------------------------------------------------ spec parsing
_SPEC_KEYS = {
    "synthetic": {"num_samples", "seed", "blobs", "hflip"},
    "folder": {"path", "hflip"},
    "npz": {"path", "key", "labels_key", "scale", "hflip"},
}


def parse_data_spec(spec: DataSpec) -> Dict[str, Any]:
    """Normalise a data spec (string, path or dict) to a dict with a ``source`` entry."""
    if isinstance(spec, dict):
        spec = dict(spec)
        source = spec.get("source")
        if source not in _SPEC_KEYS:
            raise ValueError(f"data spec needs 'source' in {sorted(_SPEC_KEYS)}, got {spec!r}")
        unknown = set(spec) - _SPEC_KEYS[source] - {"source"}
        if unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} for data source {source!r}; "
                f"valid: {sorted(_SPEC_KEYS[source])}"
            )
        if source != "synthetic" and not spec.get("path"):
            raise ValueError(f"data source {source!r} needs a 'path'")
        return spec
    text = os.fspath(spec) if not isinstance(spec, str) else spec
    if not text:
        raise ValueError("empty data spec")
    if text == "synthetic":
        return {"source": "synthetic"}
    for source in ("synthetic", "folder", "npz"):
        if text.startswith(source + ":"):
            rest = text[len(source) + 1:]
            if source == "synthetic":
                return {"source": "synthetic", "num_samples": int(rest)}
            return {"source": source, "path": rest}
    if text.endswith(".npz"):
        return {"source": "npz", "path": text}
    if os.path.isdir(text):
        return {"source": "folder", "path": text}
    raise ValueError(
        f"cannot tell what data {text!r} is: use 'synthetic', 'folder:PATH', 'npz:PATH.npz', "
        "an existing directory or a .npz file"
    )


def build_dataset(spec: DataSpec, img_size: int, in_chans: int, num_classes: int) -> Dataset:
    """Build the dataset a spec names, for a model with the given input shape and classes.

    ``num_classes`` counts the null class, as the model does (<= 0: unconditional). The result is
    checked against the model with :func:`check_dataset`.
    """
    spec = parse_data_spec(spec)
    conditional = num_classes > 0
    source = spec["source"]
    if source == "synthetic":
        ds = SyntheticDataset(
            spec.get("num_samples", 256), img_size, in_chans,
            num_classes=num_classes - 1 if conditional else 0,
            seed=spec.get("seed", 0), blobs=spec.get("blobs", 2),
        )
    elif source == "folder":
        ds = ImageFolderDataset(spec["path"], img_size, channels=in_chans, conditional=conditional)
    else:
        ds = NpzDataset(spec["path"], in_chans, key=spec.get("key"), labels_key=spec.get("labels_key"),
                        conditional=conditional, scale=spec.get("scale", 1.0))
    check_dataset(ds, img_size, in_chans, num_classes)
    return ds


def default_hflip(spec: DataSpec, dataset: Dataset) -> bool:
    """Random horizontal flips: the spec's ``hflip`` if given, else on for pixel data from files
    (folders, uint8 npz) and off for latents and synthetic data."""
    spec = parse_data_spec(spec)
    if spec.get("hflip") is not None:
        return bool(spec["hflip"])
    if spec["source"] == "folder":
        return True
    if spec["source"] == "npz":
        return bool(getattr(dataset, "is_pixels", False))
    return False


def check_dataset(dataset: Dataset, img_size: int, in_chans: int, num_classes: int) -> None:
    """Raise a clear error when the dataset does not fit the model's input shape or classes."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty (0 samples)")
    shape = tuple(getattr(dataset, "sample_shape", ()))
    want = (in_chans, img_size, img_size)
    if shape and shape != want:
        raise ValueError(f"dataset samples have shape {shape} but the model expects (C, H, W) = {want}")
    if num_classes > 0:
        k = getattr(dataset, "num_labels", None)
        if k is None:
            raise ValueError(
                f"the model is class-conditional (num_classes={num_classes}, null class {num_classes - 1}) "
                "but the dataset has no labels"
            )
        if k > num_classes - 1:
            raise ValueError(
                f"the dataset has {k} classes but the model has room for {num_classes - 1} "
                f"(num_classes={num_classes} includes the null class)"
            )


# --------------------------------------------------------------------------------- sampling
class StepSampler:
    """Maps a training step to the sample indices (and flip flags) of one rank.

    The stream of samples is the concatenation of per-epoch permutations of the dataset, each
    seeded by ``(seed, epoch)``. Global step ``s`` takes the next ``global_batch`` samples of the
    stream; rank ``r`` gets the ``r``-th slice of ``global_batch / world_size`` of them. Nothing
    depends on earlier calls, so resuming at any step reproduces the same batches.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, hflip: bool = False):
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the world size {world_size}")
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // world_size
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.hflip = bool(hflip)
        self._cache: "OrderedDict[int, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def _epoch(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
            perm = torch.randperm(self.num_samples, generator=g)
            g.manual_seed(mix_seed(self.seed, epoch, 1))
            flips = torch.rand(self.num_samples, generator=g) < 0.5
            self._cache[epoch] = (perm, flips)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[epoch]

    def epoch_at(self, step: int) -> float:
        """Epochs (fractional) completed before ``step``."""
        return step * self.global_batch / self.num_samples

    def indices(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (indices (b,) int64, flip (b,) bool) of this rank at ``step``."""
        start = step * self.global_batch + self.rank * self.local_batch
        pos = torch.arange(start, start + self.local_batch, dtype=torch.long)
        epochs = pos // self.num_samples
        pos = pos % self.num_samples
        idx = torch.empty_like(pos)
        flip = torch.zeros(self.local_batch, dtype=torch.bool)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            perm, flips = self._epoch(int(e))
            idx[sel] = perm[pos[sel]]
            flip[sel] = flips[pos[sel]]
        if not self.hflip:
            flip.zero_()
        return idx, flip


def _apply_flips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    if bool(flip.any()):
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


class _FlippedItems(Dataset):
    """Dataset view whose items are addressed by (index, flip) pairs (for DataLoader workers)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: Tuple[int, bool]) -> Tuple[torch.Tensor, int]:
        i, flip = item
        x, y = self.base[i]
        return (x.flip(-1) if flip else x), y


class _StepBatches:
    """Batch sampler over steps start, start+1, ... yielding lists of (index, flip) pairs."""

    def __init__(self, sampler: StepSampler, start_step: int):
        self.sampler = sampler
        self.start_step = start_step

    def __iter__(self):
        step = self.start_step
        while True:
            idx, flip = self.sampler.indices(step)
            yield list(zip(idx.tolist(), flip.tolist()))
            step += 1


def iterate_batches(dataset: Dataset, sampler: StepSampler, start_step: int = 0, num_workers: int = 0,
                    pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless iterator of (x (b, C, H, W) float32, y (b,) int64) batches from ``start_step`` on.

    In-memory datasets are gathered directly; others go through a DataLoader with
    ``num_workers`` worker processes (the order is the sampler's either way).
    """
    if num_workers == 0 and hasattr(dataset, "get_batch"):
        step = start_step
        while True:
            idx, flip = sampler.indices(step)
            x, y = dataset.get_batch(idx)
            x = _apply_flips(x, flip)
            yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)
            step += 1
    loader = DataLoader(
        _FlippedItems(dataset),
        batch_sampler=_StepBatches(sampler, start_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.long)
