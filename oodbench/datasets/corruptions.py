"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich 2019) in their released .npy layout:
``cifar_c``.

``<root>/<corruption>.npy`` holds the 10,000 test images once per severity, severity 1
first (50,000 x 32 x 32 x 3 uint8), and ``<root>/labels.npy`` the 50,000 labels; ``root``
is ``CIFAR-10-C`` (or ``CIFAR-100-C``). Severity s is rows (s-1)*10,000 .. s*10,000, in
the CIFAR test set's order. The arrays are memory-mapped, so one severity is read, not
the whole file; the fingerprint hashes both files' contents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import ImageSpec, register_dataset
from oodbench.datasets.imagelist import ArrayImages, first, require
from oodbench.errors import OodbenchError

SEVERITIES = 5
HINT = "extract CIFAR-10-C.tar (or CIFAR-100-C.tar) from the ImageNet-C / CIFAR-C release (zenodo) into the data root"


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OodbenchError(f"cannot read {path} ({exc}); expected a .npy array of the CIFAR-C release") from None


@register_dataset("cifar_c")
def cifar_c(data_root: Path, image: ImageSpec, corruption: str, severity: int, root: str = "CIFAR-10-C",
            limit: int | None = None) -> Dataset:
    """One corruption and severity of CIFAR-10-C / CIFAR-100-C (<root>/<corruption>.npy + labels.npy)."""
    if severity not in range(1, SEVERITIES + 1):
        raise OodbenchError(f"cifar_c: severity must be 1..{SEVERITIES}, got {severity!r}")
    images_path = require(data_root / root / f"{corruption}.npy", f"{root} {corruption}", HINT)
    labels_path = require(data_root / root / "labels.npy", f"{root} labels", HINT)
    images, labels = load_npy(images_path), load_npy(labels_path)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or images.shape[0] % SEVERITIES:
        raise OodbenchError(f"{images_path} holds a {images.dtype} array of shape {images.shape}; expected "
                            f"uint8 N x 32 x 32 x 3 with N = {SEVERITIES} x (test images)")
    if labels.shape != (images.shape[0],):
        raise OodbenchError(f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images in {images_path}")
    per = images.shape[0] // SEVERITIES
    rows = slice((severity - 1) * per, severity * per)
    return first(ArrayImages(images[rows], np.asarray(labels[rows], dtype=np.int64),
                             f"{root}/{corruption}.npy severity {severity} ({per} images)",
                             [images_path, labels_path]), limit)
