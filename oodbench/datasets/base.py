"""Dataset references, the sample classes sources build on, and loading a split.

A benchmark names each split as a `DatasetRef`: a registered source, its options, and
optionally a part of a seeded stratified split of that source (`oodbench.datasets.parts`).
Sources return any map-style dataset whose items are ``(image, label)`` with the image a PIL
image, a NumPy array or a tensor; `load_dataset` converts it to float [0,1] tensors of the
benchmark's `ImageSpec` (`oodbench.datasets.transform`).

Every dataset class says what it read through ``fingerprint(files)`` (files: an
`oodbench.file_state.FileState`): image files by path, size and mtime, decoded single-file
formats by content, in-memory images by their pixels or generating recipe, selections by
their indices. `split_fingerprint_of` turns that into the split's key (DESIGN.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from oodbench.datasets.parts import describe_parts, stratified_parts
from oodbench.datasets.transform import ImageSpec, Transformed
from oodbench.errors import OodbenchError
from oodbench.identity import array_digest, digest, split_fingerprint
from oodbench.file_state import FileState, dataset_fingerprint
from oodbench.registry import DATASETS

SOURCE_VERSION = 2  # bump when a source's decoding changes; part of every split's fingerprint


def register_dataset(*names: str) -> Callable:
    """Register a source ``fn(data_root, image, **options) -> Dataset``."""
    return DATASETS.register(*names)


@dataclass(frozen=True)
class DatasetRef:
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, Any] | None = None
    part: str | None = None
    seed: int = 0
    limit: int | None = None  # at most this many samples: a seeded stratified subset (after the part)

    @classmethod
    def parse(cls, raw: Any, where: str, seed: int = 0) -> "DatasetRef":
        if isinstance(raw, str):
            return cls(dataset=raw, seed=seed)
        if not isinstance(raw, dict) or "dataset" not in raw:
            raise OodbenchError(f"{where}: expected a mapping with a 'dataset' key, got {raw!r}")
        allowed = {"dataset", "options", "parts", "part", "seed", "limit"}
        extra = set(raw) - allowed
        if extra:
            raise OodbenchError(f"{where}: unknown key '{sorted(extra)[0]}' (allowed: {', '.join(sorted(allowed))})")
        ref = cls(
            dataset=str(raw["dataset"]),
            options=dict(raw.get("options") or {}),
            parts=dict(raw["parts"]) if raw.get("parts") else None,
            part=raw.get("part"),
            seed=int(raw.get("seed", seed)),
            limit=check_limit(raw.get("limit"), f"{where}: limit"),
        )
        if (ref.parts is None) != (ref.part is None):
            raise OodbenchError(f"{where}: 'parts' and 'part' go together")
        if ref.parts is not None and ref.part not in ref.parts:
            raise OodbenchError(f"{where}: part '{ref.part}' is not one of {sorted(ref.parts)}")
        return ref

    def payload(self) -> dict[str, Any]:
        """The reference as written (source, options, part, limit): one input of the split's fingerprint."""
        return asdict(self)


def check_limit(value: Any, what: str) -> int | None:
    """A sample limit: None or a positive integer (one error line otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OodbenchError(f"{what} must be a positive number of images, got {value!r}")
    return value


class TensorImages(Dataset):
    """Images already decoded into one float tensor (N x C x H x W, values in [0,1]).

    ``recipe``: for images generated deterministically (seeded noise), the parameters that
    generate them; the fingerprint is then the recipe rather than a hash of the pixels.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray, recipe: dict | None = None):
        self.images = images
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.recipe = recipe

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def fingerprint(self, files) -> str:
        if self.recipe is not None:
            return "recipe:" + digest({**self.recipe, "count": len(self), "shape": list(self.images.shape[1:])}, 32)
        return "tensor:" + array_digest(self.images, self.labels)


class LabeledSamples(Dataset):
    """Samples with their labels known up front, so splits never decode an image."""

    origin = ""

    def __init__(self, targets: Sequence[int] | np.ndarray):
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.targets.size)

    def load(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.load(index), int(self.targets[index])


class Selection(LabeledSamples):
    """Some samples of another dataset (a part of a split, or its first N), in `indices` order."""

    def __init__(self, base: Dataset, indices: np.ndarray, origin: str = ""):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        super().__init__(dataset_labels(base)[self.indices] if self.indices.size else [])
        self.origin = origin or getattr(base, "origin", "")

    def __getitem__(self, index: int):
        return self.base[int(self.indices[index])]

    def fingerprint(self, files) -> str:
        return "selection:" + digest([self.selection_fingerprint(np.arange(len(self)), files),
                                      array_digest(self.indices)], 32)

    def selection_fingerprint(self, indices: np.ndarray, files) -> str:
        """What the samples `indices` of this selection read: a base that can say what some of
        its samples read (image files: the listing by name, the selected files by content or
        size and mtime) names only those; any other base is fingerprinted whole."""
        chosen = self.indices[indices]
        select = getattr(self.base, "selection_fingerprint", None)
        if callable(select):
            return select(chosen, files)
        return digest([dataset_fingerprint(self.base, files), array_digest(chosen)], 32)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a source, without decoding images when the source exposes them."""
    for attribute in ("labels", "targets"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return np.asarray(labels)
    return np.asarray([dataset[i][1] for i in range(len(dataset))])


_MEMO: dict[tuple, Any] = {}
_MEMO_KEPT = 64


def _memoized(key: tuple, make: Callable[[], Any]) -> Any:
    """`make()`, kept per run token (the first item of `key`; None: not kept)."""
    if key[0] is None:
        return make()
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_KEPT:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = make()
    return _MEMO[key]


def load_source(ref: DatasetRef, data_root: str | Path, image: ImageSpec, memo: str | None = None) -> Dataset:
    """The samples `ref` names (its part, then at most `limit` of them), as the source returns them.

    With `memo` (a token naming one run), each source is listed once per run and process,
    and its parts computed once, for every split and job that reads it. The result's
    ``available`` is the number of samples before the limit.
    """
    root = Path(data_root).expanduser()
    source_key = (memo, ref.dataset, json.dumps(ref.options, sort_keys=True, default=str), str(root.resolve()),
                  image.source_key())
    source = _memoized(source_key, lambda: DATASETS.get(ref.dataset)(root, image, **ref.options))
    whole = source
    if ref.parts is not None:
        parts_key = (*source_key, json.dumps(ref.parts, sort_keys=True, default=str), ref.seed)
        indices = _memoized(parts_key, lambda: stratified_parts(dataset_labels(source), ref.parts, ref.seed))
        source = Selection(source, indices[ref.part], f"{getattr(source, 'origin', ref.dataset)}, part '{ref.part}'")
    if len(source) == 0:
        origin = getattr(whole, "origin", "") or f"dataset source '{ref.dataset}'"
        if ref.parts is not None and len(whole):
            raise OodbenchError(f"the '{ref.part}' part of {origin} has no images: the parts "
                                f"({describe_parts(ref.parts)}) leave it none of the {len(whole):,} there; give it more images or smaller parts")
        raise OodbenchError(f"{origin} has no images")
    available = len(source)
    if ref.limit is not None and ref.limit < available:
        keep = stratified_parts(dataset_labels(source), {"limit": ref.limit}, ref.seed)["limit"]
        source = Selection(source, keep, f"{getattr(source, 'origin', ref.dataset)}, {ref.limit} of {available}")
    source.available = available
    return source


def load_dataset(ref: DatasetRef, data_root: str | Path, image: ImageSpec, ood: bool = False,
                 memo: str | None = None) -> Transformed:
    """The samples `ref` names, as [0,1] tensors of shape `image`; OOD samples get label -1."""
    return Transformed(load_source(ref, data_root, image, memo), image, label_override=-1 if ood else None)


def split_fingerprint_of(dataset: Transformed, ref: DatasetRef, ood: bool, files: FileState) -> str:
    """The fingerprint of one loaded split (`load_dataset`): data read, selection, preprocessing."""
    return split_fingerprint(dataset_fingerprint(dataset, files), ref.payload(), dataset.image_key(), ood,
                             SOURCE_VERSION)
