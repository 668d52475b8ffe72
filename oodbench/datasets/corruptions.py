"""Covariate-shifted copies of ID test sets in their release layouts: the ``csid:`` sets of
the full-spectrum benchmarks (`oodbench.datasets.benchmarks`).

- ``cifar_c``: CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019) as released.
  ``<root>/<corruption>.npy`` holds the 10,000 test images once per severity, severity 1
  first (50,000 x 32 x 32 x 3 uint8), and ``<root>/labels.npy`` the 50,000 labels; ``root``
  is ``CIFAR-10-C`` (or ``CIFAR-100-C``). Severity s is rows (s-1)*10,000 .. s*10,000, in
  the CIFAR test set's order. ``corruption`` and ``severity`` may be lists: the blocks are
  concatenated, corruption by corruption, each severity in the order given; ``sample: N``
  keeps a seeded (``seed``), label-stratified N of them (all when there are fewer). The arrays
  are memory-mapped, so only the rows read are loaded; the fingerprint hashes the files' contents.
- ``imagenet_r``: ImageNet-R (Hendrycks et al. 2021) as released, ``imagenet-r/<wnid>/*.jpg``:
  200 of ImageNet-1K's classes. Labels are ImageNet-1K class indices, the wnid's position
  among the 1,000 sorted wnid folders of ``wnids_from`` (default ``imagenet/val``), so that
  they match the ID set read from the same ImageNet folder.
- ``imagenet_v2``: ImageNetV2 (Recht et al. 2019) as released,
  ``imagenetv2-matched-frequency-format-val/<class index>/*.jpeg`` (folders ``0`` .. ``999``;
  ``root`` names the threshold-0.7 or top-images variant instead). Labels are the folder
  numbers, ImageNet-1K class indices.

``imagenet_c`` (ImageNet-C's folders) lives with the other wnid-folder sources in
`oodbench.datasets.imagenet`. The ImageNet sources take ``resize_crop`` as ``image_folder``
(dropped under a model's own transform, which reads the original images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import Selection, check_limit, register_dataset
from oodbench.datasets.files import (ArrayImages, ImageFiles, benchmark_crop, class_folders, first, folder_images,
                                     require)
from oodbench.datasets.imagenet import WNID
from oodbench.datasets.parts import stratified_parts
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

SEVERITIES = 5
HINT = "extract CIFAR-10-C.tar (or CIFAR-100-C.tar) from the ImageNet-C / CIFAR-C release (zenodo) into the data root"
IMAGENET_CLASSES = 1000


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OodbenchError(f"cannot read {path} ({exc}); expected a .npy array of the CIFAR-C release") from None


class StackedArrays(ArrayImages):
    """Row blocks of several memory-mapped arrays read as one dataset (nothing copied)."""

    def __init__(self, blocks: list[np.ndarray], targets: np.ndarray, origin: str, files: Sequence[Path]):
        super().__init__(blocks[0], targets, origin, files)
        self.blocks = blocks
        self.starts = np.cumsum([0] + [len(block) for block in blocks])

    def load(self, index: int) -> np.ndarray:
        block = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.blocks[block][index - self.starts[block]]


def as_list(value, what: str, kind: type) -> list:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise OodbenchError(f"cifar_c: {what} must be a {kind.__name__} or a non-empty list of them, got {value!r}")
    return values


@register_dataset("cifar_c")
def cifar_c(data_root: Path, image: ImageSpec, corruption: str | list[str], severity: int | list[int],
            root: str = "CIFAR-10-C", sample: int | None = None, seed: int = 0,
            limit: int | None = None) -> Dataset:
    """Corruptions and severities of CIFAR-10-C / CIFAR-100-C (<root>/<corruption>.npy + labels.npy)."""
    corruptions, severities = as_list(corruption, "corruption", str), as_list(severity, "severity", int)
    if not all(s in range(1, SEVERITIES + 1) for s in severities):
        raise OodbenchError(f"cifar_c: severity must be 1..{SEVERITIES}, got {severity!r}")
    labels_path = require(data_root / root / "labels.npy", f"{root} labels", HINT)
    labels = load_npy(labels_path)
    blocks, targets, files = [], [], [labels_path]
    for name in corruptions:
        images_path = require(data_root / root / f"{name}.npy", f"{root} {name}", HINT)
        images = load_npy(images_path)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or images.shape[0] % SEVERITIES:
            raise OodbenchError(f"{images_path} holds a {images.dtype} array of shape {images.shape}; expected "
                                f"uint8 N x 32 x 32 x 3 with N = {SEVERITIES} x (test images)")
        if labels.shape != (images.shape[0],):
            raise OodbenchError(f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images in "
                                f"{images_path}")
        per = images.shape[0] // SEVERITIES
        for level in severities:
            rows = slice((level - 1) * per, level * per)
            blocks.append(images[rows])
            targets.append(np.asarray(labels[rows], dtype=np.int64))
        files.append(images_path)
    what = f"{root}/{corruptions[0]}.npy" if len(corruptions) == 1 else f"{root}/ {len(corruptions)} corruptions"
    levels = f"severity {severities[0]}" if len(severities) == 1 else f"severities {severities}"
    origin = f"{what} {levels} ({sum(map(len, blocks))} images)"
    stacked = StackedArrays(blocks, np.concatenate(targets), origin, files)
    if check_limit(sample, "cifar_c: sample") is not None and sample < len(stacked):
        keep = stratified_parts(stacked.targets, {"sample": sample}, seed)["sample"]
        stacked = Selection(stacked, keep, f"{origin}, a seeded {sample} (seed {seed})")
    return first(stacked, limit)


def imagenet_wnids(data_root: Path, wnids_from: str) -> list[str]:
    """The 1,000 ImageNet-1K wnids, sorted: the class folders of `wnids_from` under the data root."""
    folder = require(data_root / wnids_from, "ImageNet class folders (for the 1,000 class indices)",
                     "ImageNet-R's labels are ImageNet-1K indices: point wnids_from at a folder with the 1,000 "
                     "<wnid>/ class folders (ImageNet's val/ or train/)")
    wnids = [name for name in class_folders(folder) if WNID.match(name)]
    if len(wnids) != IMAGENET_CLASSES:
        raise OodbenchError(f"{folder} has {len(wnids)} wnid folders, expected {IMAGENET_CLASSES} (the class index "
                            "is the position among all sorted wnids)")
    return wnids


@register_dataset("imagenet_r")
def imagenet_r(data_root: Path, image: ImageSpec, root: str = "imagenet-r", wnids_from: str = "imagenet/val",
               resize_crop: Sequence[int] | None = None, limit: int | None = None) -> Dataset:
    """ImageNet-R as released: <root>/<wnid>/*.jpg, labelled by ImageNet-1K class index."""
    folder = require(data_root / root, "ImageNet-R folder", "extract imagenet-r.tar (ImageNet-R's release) into the "
                     "data root (imagenet-r/<wnid>/*.jpg)")
    paths, targets = folder_images(folder, imagenet_wnids(data_root, wnids_from))
    if not paths:
        raise DatasetMissing(f"no images under {folder}")
    return first(ImageFiles(paths, targets, f"{root}/ ({len(paths)} images)", benchmark_crop(image, resize_crop)),
                 limit)


@register_dataset("imagenet_v2")
def imagenet_v2(data_root: Path, image: ImageSpec, root: str = "imagenetv2-matched-frequency-format-val",
                resize_crop: Sequence[int] | None = None, limit: int | None = None) -> Dataset:
    """ImageNetV2 as released: <root>/<class index 0-999>/*.jpeg."""
    folder = require(data_root / root, "ImageNetV2 folder", "extract imagenetv2-matched-frequency.tar.gz "
                     "(ImageNetV2's release) into the data root (<class index>/*.jpeg)")
    classes = [str(i) for i in range(IMAGENET_CLASSES)]
    found = class_folders(folder)
    if sorted(found) != sorted(classes):
        stray = sorted(set(found) - set(classes))
        raise OodbenchError(f"{folder} has {len(found)} class folders" + (f" (e.g. '{stray[0]}')" if stray else "")
                            + f"; expected the {IMAGENET_CLASSES} folders 0..{IMAGENET_CLASSES - 1} of the release")
    paths, targets = folder_images(folder, classes)
    if not paths:
        raise DatasetMissing(f"no images under {folder}")
    return first(ImageFiles(paths, targets, f"{root}/ ({len(paths)} images)", benchmark_crop(image, resize_crop)),
                 limit)
