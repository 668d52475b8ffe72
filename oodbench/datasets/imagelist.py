"""Image files on disk: OpenOOD image lists, plain image folders, Tiny ImageNet, and
``any_of`` (the first of several layouts that is present).

- ``imglist``: an OpenOOD v1.5 image list, ``benchmark_imglist/<id>/<split>.txt`` under the
  data root, one ``relative/path label`` per line (OOD sets use label -1), the paths
  relative to ``images_classic/`` (option ``images``).
- ``image_folder``: every image under ``path`` (relative to the data root), in sorted path
  order; images in a first-level subfolder get that subfolder's index (among all sorted
  class folders, an empty one included, as torchvision's ImageFolder; or the order of
  ``classes``) as label, images directly in ``path`` get 0. For a user's own OOD set
  (``textures/``, ``places365/``, ``odin/LSUN_resize``...) and class folders. Hidden files
  and folders (``.ipynb_checkpoints/``, ``._x.jpg``) are skipped by every folder source;
  empty class folders are named in one warning line.
- ``tiny_imagenet``: Tiny ImageNet in its release layout under ``tin/``: ``val`` reads
  ``val/val_annotations.txt`` (the 10,000 labelled val images, in file order), ``test``
  the unlabelled ``test/images/``, ``train`` ``train/<wnid>/images/``. Labels index the
  sorted ``wnids.txt``. Greyscale images are replicated to RGB by the common transform.
- ``any_of``: ``candidates`` is a list of dataset references (``dataset``, ``options``,
  ``parts``/``part``); the first whose files are present is used, so a benchmark can
  prefer OpenOOD's lists and fall back to the raw release.

``imglist`` and ``image_folder`` take ``resize_crop: [256, 224]``: resize the short side,
then center-crop, as ImageNet test transforms do (before the benchmark's own transform,
which then has nothing left to do at ``image.size`` 224). A model with its own transform
(timm's data config, torchvision weights: `ImageSpec.origin`) gets the original images.
``as_is: true`` instead reads the images at their stored size under every transform, a
model's own included (only converted to a tensor; the model normalises): OpenOOD's
ImageNetCPreProcessor, for ImageNet-C's 224 x 224 images.

Every source takes ``limit``: keep the first N samples in the source's order. Images are
decoded lazily; a missing or unreadable image is one error line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import DatasetRef, Selection, dataset_labels, register_dataset
from oodbench.datasets.files import (IMAGE_EXTENSIONS, ImageFiles, benchmark_crop, check_files_exist, child_path,
                                     first, folder_images, hidden, read_text_lines, require)
from oodbench.datasets.parts import describe_parts, stratified_parts
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError

OPENOOD_HINT = ("`oodbench data fetch openood-v1.5:<table>` gets OpenOOD v1.5's lists and images for a table "
                "(`oodbench data fetch openood` names the tables)")
TIN_HINT = "`oodbench data fetch tin` says how to get Tiny ImageNet"


@register_dataset("imglist")
def imglist(data_root: Path, image: ImageSpec, list: str, images: str = "images_classic",
            resize_crop: Sequence[int] | None = None, as_is: bool = False, limit: int | None = None) -> Dataset:
    """OpenOOD image list: benchmark_imglist/<id>/<split>.txt + images_classic/."""
    list_path = require(data_root / list, "OpenOOD image list", OPENOOD_HINT)
    image_root = require(data_root / images, "OpenOOD image folder", OPENOOD_HINT)
    folder = str(image_root)
    paths, targets = [], []
    for number, line in enumerate(read_text_lines(list_path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            label = int(fields[-1])
        except ValueError:
            label = None
        if len(fields) < 2 or label is None:
            raise OodbenchError(f"{list_path} line {number}: expected 'relative/path label', got {line.strip()!r}")
        paths.append(child_path(folder, " ".join(fields[:-1])))
        targets.append(label)
    check_files_exist(paths, str(list_path))
    crop = benchmark_crop(image, resize_crop, as_is)
    return first(ImageFiles(paths, targets, f"{list} ({len(paths)} images)", crop, as_is), limit)


@register_dataset("image_folder")
def image_folder(data_root: Path, image: ImageSpec, path: str, classes: list[str] | None = None,
                 resize_crop: Sequence[int] | None = None, as_is: bool = False, limit: int | None = None) -> Dataset:
    """Every image under a folder of the data root, sorted; subfolders are classes."""
    folder = require(data_root / path, f"image folder '{path}'",
                     "put the images there (any depth; first-level subfolders are classes)")
    crop = benchmark_crop(image, resize_crop, as_is)
    paths, targets = folder_images(folder, classes)
    if not paths:
        raise DatasetMissing(f"no images ({', '.join(IMAGE_EXTENSIONS[:3])}...) under {folder}")
    return first(ImageFiles(paths, targets, f"{path}/ ({len(paths)} images)", crop, as_is), limit)


@register_dataset("tiny_imagenet", "tin")
def tiny_imagenet(data_root: Path, image: ImageSpec, split: str = "val", root: str = "tin",
                  limit: int | None = None) -> Dataset:
    """Tiny ImageNet (200 classes, 64x64) in its release layout under tin/."""
    base = data_root / root
    if split not in ("train", "val", "test"):
        raise OodbenchError(f"tiny_imagenet: split must be train, val or test, got '{split}'")
    if split == "test":
        folder = require(base / "test" / "images", "Tiny ImageNet test images", TIN_HINT)
        paths = sorted((p for p in folder.glob("*.JPEG") if not hidden(p.name)), key=lambda p: _numbered(p.stem))
        return first(ImageFiles(paths, np.zeros(len(paths), np.int64), f"{root}/test ({len(paths)} images)"), limit)
    wnids_path = require(base / "wnids.txt", "Tiny ImageNet class list", TIN_HINT)
    wnids = sorted(w.strip() for w in read_text_lines(wnids_path) if w.strip())
    label_of = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        paths, targets = folder_images(require(base / "train", "Tiny ImageNet train images", TIN_HINT), wnids)
        return first(ImageFiles(paths, targets, f"{root}/train ({len(paths)} images)"), limit)
    annotations = require(base / "val" / "val_annotations.txt", "Tiny ImageNet val annotations", TIN_HINT)
    images = str(base / "val" / "images")
    paths, targets = [], []
    for number, line in enumerate(read_text_lines(annotations), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in label_of:
            raise OodbenchError(f"{annotations} line {number}: expected '<file>\\t<wnid from wnids.txt>\\t...', "
                                f"got {line.strip()[:60]!r}")
        paths.append(child_path(images, fields[0]))
        targets.append(label_of[fields[1]])
    check_files_exist(paths, str(annotations))
    return first(ImageFiles(paths, targets, f"{root}/val ({len(paths)} images)"), limit)


def _numbered(stem: str) -> tuple[str, int]:
    prefix, _, number = stem.rpartition("_")
    return (prefix, int(number)) if number.isdigit() else (stem, -1)


@register_dataset("any_of")
def any_of(data_root: Path, image: ImageSpec, candidates: list[dict]) -> Dataset:
    """The first of several dataset references whose files are present."""
    if not candidates:
        raise OodbenchError("any_of: 'candidates' is empty")
    from oodbench.registry import DATASETS

    reasons = []
    for number, raw in enumerate(candidates):
        ref = DatasetRef.parse(raw, f"any_of candidate {number + 1}")
        try:
            source = DATASETS.get(ref.dataset)(data_root, image, **ref.options)
        except DatasetMissing as exc:
            reasons.append(str(exc))
            continue
        if ref.parts is not None:
            indices = stratified_parts(dataset_labels(source), ref.parts, ref.seed)[ref.part]
            source = Selection(source, indices, f"{getattr(source, 'origin', ref.dataset)}, part '{ref.part}' "
                                                f"of {describe_parts(ref.parts)}")
        if number:  # not the first choice (a benchmark's published list): results say the split differs
            source.fallback = f"{ref.dataset} (candidate {number + 1} of {len(candidates)})"
        return source
    raise DatasetMissing(" | or: ".join(reasons))
