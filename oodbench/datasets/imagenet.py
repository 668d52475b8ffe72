"""ImageNet-1K in torchvision's ImageFolder / ImageNet layout: ``imagenet_folder``.

``<root>/<split>/<wnid>/*.JPEG`` (``root`` default ``imagenet``, ``split`` train or
val), one folder per WordNet id. Labels are the index of the wnid among the sorted
wnids, which is the standard ImageNet-1K class index (torchvision, timm and OpenOOD's
lists). That index is only right when every class folder is there, so the source
insists on exactly ``num_classes`` (1000) wnid folders: a partial copy would shift
every label after a missing class. Hidden folders (``.ipynb_checkpoints``) and files are
skipped, as by every folder source. ``resize_crop`` as for ``image_folder``.

``imagenet_c``: ImageNet-C in its release layout, ``<root>/<corruption>/<severity>/<wnid>/``
(``root`` default ``ImageNet-C``), the same labels; a covariate-shifted copy of the ID
validation set, read as is (224 x 224: no resize or crop, under a model's own transform too).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from oodbench.datasets.base import register_dataset
from oodbench.datasets.files import (IMAGE_EXTENSIONS, ImageFiles, benchmark_crop, class_folders, first, folder_images,
                                     require)
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

WNID = re.compile(r"^n\d{8}$")
IMAGENET_HINT = ("put ImageNet's validation images in <data root>/imagenet/val/<wnid>/*.JPEG "
                 "(torchvision's layout), or OpenOOD's benchmark_imglist/ + images_largescale/")


@register_dataset("imagenet_folder")
def imagenet_folder(data_root: Path, image: ImageSpec, split: str = "val", root: str = "imagenet",
                    num_classes: int = 1000, resize_crop: Sequence[int] | None = None,
                    limit: int | None = None) -> Dataset:
    """ImageNet from <root>/<split>/<wnid>/*.JPEG; labels = index among the sorted wnids."""
    if split not in ("train", "val"):
        raise OodbenchError(f"imagenet_folder: split must be train or val, got '{split}'")
    folder = require(data_root / root / split, f"ImageNet {split} folder", IMAGENET_HINT)
    return first(wnid_folder(folder, f"{root}/{split}", num_classes, benchmark_crop(image, resize_crop)), limit)


@register_dataset("imagenet_c")
def imagenet_c(data_root: Path, image: ImageSpec, corruption: str, severity: int, root: str = "ImageNet-C",
               num_classes: int = 1000, resize_crop: Sequence[int] | None = None, as_is: bool | None = None,
               limit: int | None = None) -> Dataset:
    """ImageNet-C (Hendrycks & Dietterich 2019) as released: <root>/<corruption>/<severity 1-5>/<wnid>/*.JPEG,
    read as is (224 x 224, no resize or crop under any transform, as OpenOOD) unless ``resize_crop`` is given."""
    as_is = resize_crop is None if as_is is None else as_is
    if severity not in (1, 2, 3, 4, 5):
        raise OodbenchError(f"imagenet_c: severity must be 1..5, got {severity!r}")
    folder = require(data_root / root / corruption / str(severity), f"ImageNet-C {corruption} severity {severity}",
                     f"extract ImageNet-C's tar files into <data root>/{root}/ (<corruption>/<severity>/<wnid>/)")
    crop = benchmark_crop(image, resize_crop, as_is)
    return first(wnid_folder(folder, f"{root}/{corruption}/{severity}", num_classes, crop, as_is), limit)


def wnid_folder(folder: Path, origin: str, num_classes: int, resize_crop: Sequence[int] | None,
                as_is: bool = False) -> ImageFiles:
    """Images under folder/<wnid>/, labelled by the wnid's index among all `num_classes` sorted wnids."""
    wnids = class_folders(folder)
    strays = [w for w in wnids if not WNID.match(w)]
    if strays:
        raise OodbenchError(f"{folder}: '{strays[0]}' is not a WordNet id folder (n########); expected "
                            f"{num_classes} class folders only")
    if len(wnids) != num_classes:
        raise OodbenchError(f"{folder} has {len(wnids)} class folders, expected {num_classes}: the class "
                            "index is the position among all sorted wnids, so a partial copy would mislabel")
    paths, targets = folder_images(folder, wnids)
    if not paths:
        raise DatasetMissing(f"no images ({', '.join(IMAGE_EXTENSIONS[:3])}...) under {folder}")
    return ImageFiles(paths, targets, f"{origin}/ ({len(paths)} images)", resize_crop, as_is)
