"""Find, read and validate Fashion-MNIST in its IDX form.

Sources, in order: an explicit directory (``--data-dir`` or ``FMNIST_DATA_DIR``), the
local cache, the Debian/Ubuntu package ``dataset-fashion-mnist``, torchvision's download
into the cache. A directory the user named is never silently replaced by another source.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.core.errors import InputError

SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {  # split -> (images file, labels file, number of images)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
HOW_TO_GET = (
    "install it with 'apt-get install dataset-fashion-mnist', "
    "or pass --data-dir DIR (or set FMNIST_DATA_DIR) to a directory holding the four IDX files"
)


@dataclass
class FashionMNIST:
    """The whole data set in memory: uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist"


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(directory: Path) -> bool:
    return all(
        _idx_path(directory, f) is not None for images, labels, _ in SPLITS.values() for f in (images, labels)
    )


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to read from, following the resolution order above."""
    explicit = data_dir if data_dir is not None else os.environ.get("FMNIST_DATA_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            problem = "is not a directory" if path.exists() else "does not exist"
            named_by = "" if data_dir is not None else " (named by FMNIST_DATA_DIR)"
            raise InputError(f"data directory {path}{named_by} {problem}; {HOW_TO_GET}")
        return path  # missing files in it are reported by name when read
    for candidate in (cache_dir(), SYSTEM_DATA_DIR):
        if _has_all_files(candidate):
            return candidate
    return _download_with_torchvision(cache_dir())


def _download_with_torchvision(target: Path) -> Path:
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        TorchvisionFashionMNIST(str(target / "download"), train=True, download=True)
        TorchvisionFashionMNIST(str(target / "download"), train=False, download=True)
    except Exception:  # no torchvision, no network: the remedy is the same
        raise InputError(f"Fashion-MNIST not found and could not be downloaded; {HOW_TO_GET}") from None
    raw = target / "download" / "FashionMNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for f in raw.iterdir():
        if f.suffix == ".gz":
            os.replace(f, target / f.name)
    return target


def read_idx(path: Path, magic: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Read one IDX file and check its magic number, item count and item shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged .gz
        raise InputError(f"cannot read {path} ({e}); replace it with a good copy") from None
    ndim = len(shape) + 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(f"{path} is not an IDX file (too short); replace it with a good copy")
    (found_magic,) = struct.unpack(">i", data[:4])
    if found_magic != magic:
        raise InputError(f"{path} has magic number {found_magic}, expected {magic}; is it the right file?")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if dims[0] != count or tuple(dims[1:]) != shape:
        raise InputError(
            f"{path} holds {dims[0]} items of shape {tuple(dims[1:])}, expected {count} of {shape}; "
            "replace it with the original file"
        )
    expected = header + count * int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise InputError(f"{path} is {len(data)} bytes, expected {expected} (truncated?); replace it")
    # bytearray: a writable array, as torch.from_numpy wants
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(count, *shape)


def _read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name, count = SPLITS[split]
    found = {}
    for name in (images_name, labels_name):
        path = _idx_path(directory, name)
        if path is None:
            raise InputError(f"{directory / name}[.gz] not found; {HOW_TO_GET}")
        found[name] = path
    images = read_idx(found[images_name], IMAGES_MAGIC, count, (28, 28))
    labels = read_idx(found[labels_name], LABELS_MAGIC, count, ())
    if labels.max() > 9:
        raise InputError(f"{found[labels_name]} has label {labels.max()}, expected 0-9; replace it")
    return images, labels.astype(np.int64)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> FashionMNIST:
    """Find and read both splits, validated, into memory."""
    directory = find_data_dir(data_dir)
    train_images, train_labels = _read_split(directory, "train")
    test_images, test_labels = _read_split(directory, "test")
    return FashionMNIST(train_images, train_labels, test_images, test_labels, directory)


def load_test_split(data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Only the 10,000 test images and labels (for scoring)."""
    return _read_split(find_data_dir(data_dir), "test")


def validation_split(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (training, validation) of the training set with ``size`` images held out for validation.

    Class-balanced: each class gives ``size // 10`` images (the first ``size % 10`` classes one more),
    drawn from ``seed`` alone, so a run and its resume, or every trial of a search, hold out the same
    images. Both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    classes = 10
    held_out = [
        rng.choice(np.flatnonzero(labels == c), size // classes + (c < size % classes), replace=False)
        for c in range(classes)
    ]
    validation = np.sort(np.concatenate(held_out))
    return np.setdiff1d(np.arange(len(labels)), validation), validation
