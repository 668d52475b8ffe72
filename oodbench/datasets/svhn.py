"""SVHN (Netzer et al. 2011), cropped digits, 32x32 RGB, from either layout:

- ``SVHN/<split>_32x32.mat`` (what torchvision downloads): MATLAB arrays ``X``
  (32 x 32 x 3 x N uint8) and ``y`` (N x 1, digit 0 stored as 10), read with scipy
  like torchvision does, without its md5 check;
- ``svhn/<split>/<class>/*.png|jpg``.

OpenOOD's far-OOD SVHN is the 26,032-image test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import register_dataset
from oodbench.datasets.files import ArrayImages, ImageFiles, first, folder_images
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

SPLITS = ("train", "test", "extra")
URL = "http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"


def read_mat(path: Path) -> ArrayImages:
    import scipy.io

    expected = "a MATLAB file with 'X' (32 x 32 x 3 x N uint8) and 'y' (N x 1 labels 1..10)"
    try:
        content = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises many types (MatReadError, ValueError, OSError...) on bad files
        raise OodbenchError(f"cannot read {path} ({type(exc).__name__}: {exc}); expected {expected}") from None
    if "X" not in content or "y" not in content:
        raise OodbenchError(f"{path} has no 'X'/'y' arrays; expected {expected}")
    images, labels = np.asarray(content["X"]), np.asarray(content["y"]).reshape(-1).astype(np.int64)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != labels.size:
        raise OodbenchError(f"{path}: 'X' is {images.shape} with {labels.size} labels; expected {expected}")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(images.transpose(3, 0, 1, 2)).astype(np.uint8, copy=False)
    return ArrayImages(images, labels, f"SVHN/{path.name} ({labels.size} images)", files=[path])


@register_dataset("svhn")
def svhn(data_root: Path, image: ImageSpec, split: str = "test", limit: int | None = None) -> Dataset:
    """SVHN from SVHN/<split>_32x32.mat or svhn/<split>/<class>/."""
    if split not in SPLITS:
        raise OodbenchError(f"SVHN: split must be one of {', '.join(SPLITS)}, got '{split}'")
    mat = data_root / "SVHN" / f"{split}_32x32.mat"
    folder = data_root / "svhn" / split
    if mat.is_file():
        return first(read_mat(mat), limit)
    if folder.is_dir():
        paths, targets = folder_images(folder, [str(d) for d in range(10)])
        return first(ImageFiles(paths, targets, f"svhn/{split}/ ({len(paths)} image files)"), limit)
    raise DatasetMissing(f"SVHN {split} not found: expected {mat} or {folder}/<digit>/; "
                         f"`oodbench data fetch svhn` downloads {URL.format(split=split)}")
