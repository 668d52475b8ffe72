"""The MNIST family in torchvision's layout, ``<Name>/raw/*-idx?-ubyte`` (or ``.gz``):

- ``mnist`` (LeCun et al. 1998), ``fashion_mnist`` (Xiao et al. 2017), ``kmnist``
  (Clanuwat et al. 2018): ``train-images-idx3-ubyte`` / ``t10k-...``; ``split`` is
  train, test or all (train + test, OpenOOD's 70,000 MNIST far-OOD images).
- ``emnist`` (Cohen et al. 2017): ``emnist-<subset>-<train|test>-images-idx3-ubyte``;
  subset ``letters`` by default. EMNIST stores its images transposed; they are turned
  upright here (torchvision's class leaves them transposed).
- ``qmnist`` (Yadav & Bottou 2019): ``qmnist-<train|test>-images-idx3-ubyte`` with
  ``qmnist-...-labels-idx2-int`` (column 0 is the class). ``what``: train, test,
  test10k (the reconstructed MNIST test set) or test50k (the 50,000 lost MNIST test
  digits, a writer shift).

torchvision's classes insist on the uncompressed files in ``raw/`` and check md5 sums;
these loaders read the same files, compressed or not, with the idx header (magic
number, dimensions, length) checked so a wrong or truncated file is one error line.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import register_dataset
from oodbench.datasets.files import ArrayImages, first
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FETCHABLE = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST", "emnist": "EMNIST",
             "qmnist": "QMNIST"}


def idx_file(raw: Path, stem: str, dataset: str) -> Path:
    """`raw/stem` or `raw/stem.gz`, else DatasetMissing saying how to get it."""
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    name = {folder: source for source, folder in FETCHABLE.items()}.get(raw.parent.name, dataset)
    raise DatasetMissing(f"{dataset} file not found: expected {raw / stem}(.gz); "
                         f"`oodbench data fetch {name}` downloads it into the data root")


def read_idx(path: Path, dims: int, dtype_code: int = 0x08) -> np.ndarray:
    """An idx array (big-endian header: 0, 0, type, dims; then the sizes; then the data)."""
    expected = f"an idx file with a {dims}-dimensional {np.dtype(IDX_TYPES[dtype_code]).name} array " \
               f"(magic number {dtype_code * 256 + dims:#010x})"
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            content = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise OodbenchError(f"cannot read {path} ({type(exc).__name__}: {exc}); expected {expected}") from None
    if len(content) < 4 + 4 * dims:
        raise OodbenchError(f"{path} is truncated ({len(content)} bytes); expected {expected}")
    magic = int.from_bytes(content[:4], "big")
    if magic != dtype_code * 256 + dims:
        raise OodbenchError(f"{path} has magic number {magic:#010x}; expected {expected}")
    shape = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    dtype = np.dtype(IDX_TYPES[dtype_code])
    size = int(np.prod(shape)) * dtype.itemsize
    body = memoryview(content)[4 + 4 * dims:]  # one copy of the data (bytearray: a writable array), not two
    if len(body) != size:
        raise OodbenchError(f"{path} holds {len(body)} data bytes, its header says {shape} ({size} bytes); "
                            "the file is truncated or corrupt")
    return np.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


def read_pair(raw: Path, images_stem: str, labels_stem: str, dataset: str, label_dims: int = 1,
              label_code: int = 0x08) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(images, labels, the two files read) of an idx image/label pair."""
    images_path = idx_file(raw, images_stem, dataset)
    labels_path = idx_file(raw, labels_stem, dataset)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, label_dims, label_code)
    labels = (labels if label_dims == 1 else labels[:, 0]).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise OodbenchError(f"{images_path} holds {images.shape[0]} images but {labels_path} "
                            f"{labels.shape[0]} labels; expected one label per image")
    return images, labels, [images_path, labels_path]


def classic(data_root: Path, folder: str, dataset: str, split: str, limit: int | None) -> Dataset:
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
    if split not in prefixes:
        raise OodbenchError(f"{dataset}: split must be train, test or all, got '{split}'")
    raw = data_root / folder / "raw"
    parts = [read_pair(raw, f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte", dataset) for p in prefixes[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return first(ArrayImages(images, labels, f"{folder}/raw {split} ({labels.size} images)",
                             files=[f for p in parts for f in p[2]]), limit)


@register_dataset("mnist")
def mnist(data_root: Path, image: ImageSpec, split: str = "test", limit: int | None = None) -> Dataset:
    """MNIST handwritten digits from MNIST/raw/ (idx, optionally gzipped)."""
    return classic(data_root, "MNIST", "MNIST", split, limit)


@register_dataset("fashion_mnist")
def fashion_mnist(data_root: Path, image: ImageSpec, split: str = "test", limit: int | None = None) -> Dataset:
    """Fashion-MNIST clothing images from FashionMNIST/raw/."""
    return classic(data_root, "FashionMNIST", "Fashion-MNIST", split, limit)


@register_dataset("kmnist")
def kmnist(data_root: Path, image: ImageSpec, split: str = "test", limit: int | None = None) -> Dataset:
    """Kuzushiji-MNIST (cursive Japanese characters) from KMNIST/raw/."""
    return classic(data_root, "KMNIST", "KMNIST", split, limit)


@register_dataset("emnist")
def emnist(data_root: Path, image: ImageSpec, subset: str = "letters", split: str = "test",
           limit: int | None = None) -> Dataset:
    """EMNIST (letters by default) from EMNIST/raw/, turned upright."""
    if split not in ("train", "test"):
        raise OodbenchError(f"EMNIST: split must be train or test, got '{split}'")
    prefix = f"emnist-{subset}-{split}"
    images, labels, files = read_pair(data_root / "EMNIST" / "raw", f"{prefix}-images-idx3-ubyte",
                                      f"{prefix}-labels-idx1-ubyte", f"EMNIST {subset}")
    images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return first(ArrayImages(images, labels, f"EMNIST/raw {prefix} ({labels.size} images)", files), limit)


@register_dataset("qmnist")
def qmnist(data_root: Path, image: ImageSpec, what: str = "test50k", limit: int | None = None) -> Dataset:
    """QMNIST from QMNIST/raw/; test50k = the 50,000 lost MNIST test digits."""
    ranges = {"train": ("train", slice(None)), "test": ("test", slice(None)),
              "test10k": ("test", slice(0, 10000)), "test50k": ("test", slice(10000, None))}
    if what not in ranges:
        raise OodbenchError(f"QMNIST: 'what' must be one of {', '.join(ranges)}, got '{what}'")
    split, rows = ranges[what]
    images, labels, files = read_pair(data_root / "QMNIST" / "raw", f"qmnist-{split}-images-idx3-ubyte",
                                      f"qmnist-{split}-labels-idx2-int", "QMNIST", label_dims=2, label_code=0x0C)
    images, labels = images[rows], labels[rows]
    return first(ArrayImages(images, labels, f"QMNIST/raw {what} ({labels.size} images)", files), limit)
