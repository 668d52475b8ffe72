"""In-memory data for the Python API as benchmark splits: the dataset source ``python``.

`oodbench.api.reading.read_split` reads what a user hands over once into one float tensor of
[0,1] images (N x C x H x W) and its labels, and names it by a content hash of both
(`oodbench.identity.array_digest`), so the same images give the same output-cache key in
any process. While an API call runs, `registered` lends the splits to the dataset source
``python`` (``DatasetRef("python", {"key": <hash>})``), through which the harness reads
them like any other dataset: fingerprints, `limit`, preprocessing to the benchmark's shape,
extraction and its cache are the ones of `oodbench run`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from oodbench.datasets.base import DatasetRef, TensorImages, register_dataset
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError
from oodbench.identity import array_digest

SOURCE = "python"

_LIVE: dict[str, TensorImages] = {}


@register_dataset(SOURCE)
def python_data(data_root: Path, image: ImageSpec, key: str) -> TensorImages:
    """The in-memory split registered under `key` by the API call that is running."""
    if key not in _LIVE:
        raise OodbenchError(f"in-memory data {key} is not loaded in this process: it exists only during the "
                            "oodbench.evaluate (or detector, operating_point) call that registered it")
    return _LIVE[key]


@contextmanager
def registered(splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[dict[str, DatasetRef]]:
    """Lend ``{name: (images, labels)}`` to the ``python`` dataset source for the duration of
    the block; yields ``{name: DatasetRef}`` for a benchmark definition."""
    refs, added = {}, []
    for name, (images, labels) in splits.items():
        key = array_digest(images, labels)
        if key not in _LIVE:
            _LIVE[key] = TensorImages(images, labels)
            added.append(key)
        refs[name] = DatasetRef(SOURCE, {"key": key})
    try:
        yield refs
    finally:
        for key in added:
            _LIVE.pop(key, None)
        _forget_listings(added)


def _forget_listings(keys: list[str]) -> None:
    """Drop the runs' memoized listings of these splits, so that no image tensor outlives its call."""
    from oodbench.datasets import base

    memo = getattr(base, "_MEMO", {})
    for entry in [k for k in memo if len(k) > 2 and k[1] == SOURCE and any(key in str(k[2]) for key in keys)]:
        memo.pop(entry, None)
