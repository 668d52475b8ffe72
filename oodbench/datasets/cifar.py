"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), 32x32 RGB, from either layout of the data root:

- ``pickle``: the python version torchvision downloads, ``cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``) or ``cifar-100-python/`` (``train``, ``test``);
  each batch a pickle of ``data`` (N x 3072 uint8, channel-major) and ``labels``
  (``fine_labels`` for CIFAR-100), read with ``encoding="latin1"`` as torchvision does.
  There is no md5 check: a partial batch is read as what it is (and said so).
- ``folder``: ``cifar10/<split>/<class>/*.png|jpg`` (``cifar100/...``), labels in the
  official class order.

``format: auto`` (the default) reads the pickle when it holds the whole split, else the
image folder when present, else a partial pickle (with a warning either way).
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import register_dataset
from oodbench.datasets.files import ArrayImages, ImageFiles, first, folder_images
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


@dataclass(frozen=True)
class CifarLayout:
    name: str
    pickle_dir: str
    batches: dict[str, tuple[str, ...]]
    label_key: str
    folder: str
    classes: tuple[str, ...]
    split_sizes: dict[str, int]
    url: str


CIFAR10 = CifarLayout(
    "CIFAR-10", "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "labels", "cifar10", CIFAR10_CLASSES, {"train": 50000, "test": 10000},
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
)
CIFAR100 = CifarLayout(
    "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
    "fine_labels", "cifar100", tuple(CIFAR100_CLASSES), {"train": 50000, "test": 10000},
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
)


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch -> (N x 32 x 32 x 3 uint8, N labels)."""
    expected = f"a CIFAR python-pickle batch (a dict with 'data' N x 3072 uint8 and '{label_key}')"
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError, MemoryError, OSError) as exc:
        reason = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise OodbenchError(f"cannot read {path} ({reason}); expected {expected}") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise OodbenchError(f"{path} is not {expected}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.size:
        raise OodbenchError(f"{path}: 'data' is {data.dtype} {data.shape} with {labels.size} labels; expected {expected}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_pickle_split(root: Path, layout: CifarLayout, split: str) -> ArrayImages:
    folder = root / layout.pickle_dir
    parts = [read_batch(folder / name, layout.label_key) for name in layout.batches[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= len(layout.classes)):
        raise OodbenchError(f"{folder}: labels outside 0..{len(layout.classes) - 1}; is this {layout.name}?")
    return ArrayImages(images, labels, f"{layout.pickle_dir}/ {split} ({labels.size} images, original pixels)",
                       files=[folder / name for name in layout.batches[split]])


def read_folder_split(root: Path, layout: CifarLayout, split: str) -> ImageFiles:
    folder = root / layout.folder / split
    paths, targets = folder_images(folder, layout.classes)
    if not paths:
        raise DatasetMissing(f"no images under {folder}; expected {layout.folder}/{split}/<class>/*.png|jpg")
    return ImageFiles(paths, targets, f"{layout.folder}/{split}/ ({len(paths)} image files)")


def load_cifar(root: Path, layout: CifarLayout, split: str, format: str) -> Dataset:
    if split not in layout.batches:
        raise OodbenchError(f"{layout.name}: split must be one of {', '.join(layout.batches)}, got '{split}'")
    if format not in ("auto", "pickle", "folder"):
        raise OodbenchError(f"{layout.name}: format must be auto, pickle or folder, got '{format}'")
    pickle_files = [root / layout.pickle_dir / name for name in layout.batches[split]]
    has_pickle = all(p.is_file() for p in pickle_files)
    has_folder = (root / layout.folder / split).is_dir()
    how = (f"`oodbench data fetch {layout.folder}` downloads {layout.url} into the data root, "
           f"or put the images in {root / layout.folder / split}/<class>/")
    if format == "pickle" or (format == "auto" and has_pickle):
        if not has_pickle:
            absent = next(p for p in pickle_files if not p.is_file())
            raise DatasetMissing(f"{layout.name} {split} not found: expected {absent}; {how}")
        data = read_pickle_split(root, layout, split)
        expected = layout.split_sizes[split]
        if format == "pickle" or len(data) == expected:
            return data
        if has_folder:
            warnings.warn(f"{root / layout.pickle_dir} holds {len(data)} of the {expected} {layout.name} {split} "
                          f"images; reading {root / layout.folder / split} instead (format: pickle forces the "
                          "pickle)", stacklevel=2)
            return read_folder_split(root, layout, split)
        warnings.warn(f"{root / layout.pickle_dir} holds only {len(data)} of the {expected} {layout.name} {split} "
                      "images", stacklevel=2)
        return data
    if not has_folder:
        raise DatasetMissing(f"{layout.name} {split} not found: expected {pickle_files[0]} or "
                             f"{root / layout.folder / split}/<class>/; {how}")
    return read_folder_split(root, layout, split)


@register_dataset("cifar10")
def cifar10(data_root: Path, image: ImageSpec, split: str = "test", format: str = "auto",
            limit: int | None = None) -> Dataset:
    """CIFAR-10 from cifar-10-batches-py/ or cifar10/<split>/<class>/."""
    return first(load_cifar(data_root, CIFAR10, split, format), limit)


@register_dataset("cifar100")
def cifar100(data_root: Path, image: ImageSpec, split: str = "test", format: str = "auto",
             limit: int | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from cifar-100-python/ or cifar100/<split>/<class>/."""
    return first(load_cifar(data_root, CIFAR100, split, format), limit)
