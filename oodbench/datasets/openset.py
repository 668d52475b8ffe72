"""Open-set recognition (OSR) splits of a labelled dataset: ``class_split``.

OpenOOD v1.5's OSR benchmarks (MNIST-6, CIFAR-6, CIFAR-50, TIN-20; seeds 1-5) take the
class splits of ARPL (Chen et al. 2021, ``split.py``, ``splits_2020``): per seed, a list
of known classes. The known classes are the ID task, **relabelled 0..K-1 in the order
of the list** (not sorted): MNIST-6 seed 1 lists [2, 4, 5, 9, 8, 3], so digit 2 is
class 0 and digit 3 is class 5. OpenOOD's released OSR LeNets follow exactly that
order (tests/test_osr.py checks it on the real checkpoints); every other class is OOD.

``class_split`` options: ``source`` (a dataset reference: ``dataset`` and ``options``),
``classes`` (the known classes in the source's labels, in split order), ``keep``
(``known``: those samples with labels 0..K-1; ``unknown``: the rest, with their source
labels) and ``limit``. Samples keep the source's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import DatasetRef, Selection, dataset_labels, register_dataset
from oodbench.datasets.files import first
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError
from oodbench.identity import array_digest, digest


class Relabelled(Selection):
    """Some samples of another dataset with new labels (`targets`, one per index)."""

    def __init__(self, base: Dataset, indices: np.ndarray, targets: np.ndarray, origin: str):
        super().__init__(base, indices, origin)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __getitem__(self, index: int):
        image, _ = self.base[int(self.indices[index])]
        return image, int(self.targets[index])

    def fingerprint(self, files) -> str:
        return "relabelled:" + digest([super().fingerprint(files), array_digest(self.targets)], 32)


def known_classes(classes: Any) -> list[int]:
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)):
        raise OodbenchError(f"class_split: 'classes' must be a non-empty list of class indices, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise OodbenchError(f"class_split: 'classes' lists a class twice: {classes}")
    return classes


@register_dataset("class_split")
def class_split(data_root: Path, image: ImageSpec, source: dict, classes: list[int], keep: str = "known",
                limit: int | None = None) -> Dataset:
    """The known classes of a source relabelled 0..K-1 in list order, or the other classes."""
    from oodbench.registry import DATASETS

    classes = known_classes(classes)
    if keep not in ("known", "unknown"):
        raise OodbenchError(f"class_split: 'keep' must be known or unknown, got '{keep}'")
    ref = DatasetRef.parse(source, "class_split source")
    if ref.parts is not None or ref.limit is not None:
        raise OodbenchError("class_split: give 'parts' and 'limit' on the class_split, not on its source")
    base = DATASETS.get(ref.dataset)(data_root, image, **ref.options)
    labels = dataset_labels(base)
    absent = sorted(set(classes) - set(labels.tolist()))
    if absent:
        where = getattr(base, "origin", "") or ref.dataset
        raise OodbenchError(f"class_split: known classes {absent} have no samples in {where} (its labels run "
                            f"{labels.min()}..{labels.max()})")
    is_known = np.isin(labels, classes)
    origin = getattr(base, "origin", ref.dataset)
    if keep == "known":
        indices = np.flatnonzero(is_known)
        position = {c: i for i, c in enumerate(classes)}
        targets = np.array([position[int(c)] for c in labels[indices]], dtype=np.int64)
        described = f"{origin}, known classes {classes} as 0..{len(classes) - 1}"
    else:
        indices = np.flatnonzero(~is_known)
        targets = labels[indices]
        described = f"{origin}, classes other than {classes}"
    return first(Relabelled(base, indices, targets, described), limit)
