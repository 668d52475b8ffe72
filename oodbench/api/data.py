"""In-memory data for the Python API: DataLoaders, Datasets and tensors as benchmark splits.

`read_split` reads what a user hands over once into one float tensor of [0,1] images
(N x C x H x W) and its labels, and names it by a content hash of both
(`oodbench.identity.array_digest`), so the same images give the same output-cache key in
any process. While an API call runs, `registered` lends the splits to the dataset source
``python`` (``DatasetRef("python", {"key": <hash>})``), through which the harness reads
them like any other dataset: fingerprints, `limit`, preprocessing to the benchmark's shape,
extraction and its cache are the ones of `oodbench run`.

Accepted forms, each image a [0,1] tensor (uint8 images are divided by 255):

- a tensor or array of images (N x C x H x W, N x H x W x C with 1 or 3 channels, or
  N x H x W for grey): OOD sets only;
- ``(images, labels)``, labels a sequence of class indices, or a dict ``{head: labels}``
  when the model has several heads (see `oodbench.api.operating_point`);
- a map-style ``Dataset`` of ``(image, label)`` items (or images alone, for OOD sets);
  PIL images are converted with ``to_tensor``;
- a ``DataLoader`` yielding ``(images, labels)`` batches; a shuffling loader is read in
  order (the same dataset, batch size and collate function without the shuffle), so that
  the same data keeps its key.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from oodbench.datasets.base import DatasetRef, ImageSpec, TensorImages, register_dataset
from oodbench.errors import OodbenchError
from oodbench.identity import array_digest

SOURCE = "python"
READ_BATCH = 256


@dataclass
class Split:
    """One split read into memory: images N x C x H x W (float32, [0,1]) and labels
    (N class indices, or ``{head: N class indices}``)."""

    images: torch.Tensor
    labels: torch.Tensor | dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.images.shape[0]

    def labels_for(self, head: str | None) -> torch.Tensor:
        """The labels of one head (the only labels when they are not per head)."""
        if not isinstance(self.labels, dict):
            return self.labels
        if head is None:
            raise OodbenchError(f"labels are given per head ({', '.join(self.labels)}): evaluate one head at a time "
                                "with output=<head>, or all with oodbench.operating_point(heads=...)")
        if head not in self.labels:
            raise OodbenchError(f"labels are given per head ({', '.join(self.labels)}), but not for '{head}'")
        return self.labels[head]


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


def read_split(data: Any, what: str, labeled: bool) -> Split:
    """`data` in any accepted form as a `Split` (see the module doc); `labeled`: labels are
    required (ID splits). Bad input raises `OodbenchError` in one line naming `what`."""
    if isinstance(data, Split):
        return data
    if isinstance(data, DataLoader):
        images, labels = _read_batches(_in_order(data), what)
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=READ_BATCH, shuffle=False, collate_fn=_collate_items)
        images, labels = _read_batches(loader, what)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = _as_images(data[0], what), _as_labels(data[1], what)
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        images, labels = _as_images(data, what), None
    else:
        raise OodbenchError(f"{what}: expected a DataLoader, a Dataset, (images, labels) or an images tensor, "
                            f"got {type(data).__name__}")
    if labels is None:
        if labeled:
            raise OodbenchError(f"{what}: labels are needed (give (images, labels), a Dataset of (image, label) "
                                "items or a DataLoader of (images, labels) batches)")
        labels = torch.zeros(len(images), dtype=torch.long)
    for head, values in (labels.items() if isinstance(labels, dict) else [(None, labels)]):
        if values.shape != (len(images),):
            name = f" of head '{head}'" if head else ""
            raise OodbenchError(f"{what}: {len(images)} images but labels{name} of shape {list(values.shape)}")
    if len(images) == 0:
        raise OodbenchError(f"{what} has no images")
    return Split(images, labels)


def image_spec(split: Split, what: str) -> ImageSpec:
    """The benchmark's image shape, from the ID test images (square, 1 or 3 channels)."""
    _, channels, height, width = split.images.shape
    if height != width:
        raise OodbenchError(f"{what}: images are {height}x{width}; oodbench's benchmarks take square images "
                            "(resize or crop them first)")
    return ImageSpec(int(height), int(channels))


def _in_order(loader: DataLoader) -> DataLoader:
    """A shuffling loader over a map-style dataset, read in index order instead."""
    if isinstance(loader.sampler, RandomSampler) and hasattr(loader.dataset, "__getitem__"):
        return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    return loader


def _collate_items(items: list) -> tuple[torch.Tensor, Any]:
    pairs = [(item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
             for item in items]
    images = torch.stack([_image_tensor(image) for image, _ in pairs])
    labels = [label for _, label in pairs]
    if all(label is None for label in labels):
        return images, None
    if isinstance(labels[0], Mapping):
        return images, {head: torch.as_tensor([label[head] for label in labels]) for head in labels[0]}
    return images, torch.as_tensor(np.asarray([np.asarray(label) for label in labels]))


def _image_tensor(image: Any) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, Image.Image):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(image)
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise OodbenchError(f"dataset items must be (image, label) with the image a tensor, an array or a PIL image, "
                            f"got {type(image).__name__}")
    return torch.as_tensor(image)


def _read_batches(batches, what: str) -> tuple[torch.Tensor, Any]:
    images, labels = [], []
    for batch in batches:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            images.append(_as_images(batch[0], what))
            labels.append(batch[1])
        else:
            images.append(_as_images(batch, what))
            labels.append(None)
    if not images:
        raise OodbenchError(f"{what} has no images")
    if any(label is None for label in labels):
        return torch.cat(images), None
    if isinstance(labels[0], Mapping):
        return torch.cat(images), {head: torch.cat([_as_labels(b[head], what) for b in labels]) for head in labels[0]}
    return torch.cat(images), torch.cat([_as_labels(b, what) for b in labels])


def _as_images(images: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise OodbenchError(f"{what}: images must be N x C x H x W (or N x H x W), got shape {list(tensor.shape)}")
    if tensor.shape[1] not in (1, 3) and tensor.shape[3] in (1, 3):  # channel-last arrays (N x H x W x C)
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.dtype == torch.uint8:
        tensor = tensor.float().div(255)
    elif not tensor.is_floating_point():
        raise OodbenchError(f"{what}: images must be float in [0,1] or uint8, got {tensor.dtype}")
    tensor = tensor.float().contiguous()
    if tensor.numel() and (tensor.min() < -1e-6 or tensor.max() > 1 + 1e-6):
        warnings.warn(f"{what}: image values span [{tensor.min():.3g}, {tensor.max():.3g}], not [0,1]; oodbench "
                      "expects [0,1] images and normalises inside the model (pass normalization=(mean, std))",
                      stacklevel=4)
    return tensor


def _as_labels(labels: Any, what: str) -> Any:
    if isinstance(labels, Mapping):
        return {str(head): _as_labels(values, f"{what} (head '{head}')") for head, values in labels.items()}
    tensor = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).detach().cpu()
    if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.ndim != 1:
        raise OodbenchError(f"{what}: labels must be one integer class index per image, got {tensor.dtype} of "
                            f"shape {list(tensor.shape)}")
    return tensor.long()
