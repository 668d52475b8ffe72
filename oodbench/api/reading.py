"""Reading the data a Python API user hands over into one float tensor of [0,1] images
(N x C x H x W) and its labels: a `Split`, which `oodbench.api.data.registered` then lends to
the harness.

Accepted forms, each image a [0,1] tensor (uint8 images are divided by 255):

- a tensor or array of images (N x C x H x W, N x H x W x C with 1 or 3 channels, or
  N x H x W for grey): OOD sets only;
- ``(images, labels)``, labels a sequence of class indices, or a dict ``{head: labels}``
  when the model has several heads (see `oodbench.api.operating_point`); ``(images,)``
  for an OOD set;
- a dict with the images under one of `IMAGE_KEYS` (``"image"``, ``"images"``,
  ``"input"``, ...) and the labels under one of `LABEL_KEYS` (``"label"``, ``"labels"``,
  ``"target"``, ...);
- a map-style ``Dataset`` of items in any of the forms above: ``(image, label)``,
  ``(image,)``, an image alone, or a dict (images alone for OOD sets); PIL images are
  converted with ``to_tensor``;
- a ``DataLoader`` yielding batches in any of those forms (``DataLoader(TensorDataset(images))``
  yields ``[images]``); a shuffling loader is read in order (the same dataset, batch size
  and collate function without the shuffle), so that the same data keeps its key.

OOD sets (`ood_sets`) are ``{name: data}``, a list of data objects (named ``ood0``,
``ood1``, ... in order), or one data object.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError

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


IMAGE_KEYS = ("image", "images", "img", "input", "inputs", "pixel_values", "x")
LABEL_KEYS = ("label", "labels", "target", "targets", "class", "y")
FORMS = ("a DataLoader or Dataset of (images, labels) batches or items (or dicts with 'image' and 'label' keys), "
         "(images, labels), or an images tensor")


def ood_sets(ood: Any, what: str) -> dict[str, Any]:
    """``{name: data}`` of an `ood` argument: a dict of sets, a list of sets (named ``<what>0``,
    ``<what>1``, ...), or one data object (named `what`). A 2-tuple whose second entry looks like
    labels is one ``(images, labels)`` set, not two sets."""
    if ood is None:
        return {}
    if isinstance(ood, Mapping) and not _keyed_split(ood):
        if not ood:
            raise OodbenchError(f"{what} is empty")
        return {str(name): value for name, value in ood.items()}
    if isinstance(ood, (list, tuple)) and not (len(ood) == 2 and _looks_like_labels(ood[1])):
        if not ood:
            raise OodbenchError(f"{what} is empty")
        return {f"{what}{index}": value for index, value in enumerate(ood)}
    return {what: ood}


def read_split(data: Any, what: str, labeled: bool) -> Split:
    """`data` in any accepted form as a `Split` (see the module doc); `labeled`: labels are
    required (ID splits). Bad input raises `OodbenchError` in one line naming `what` and the
    accepted forms."""
    if isinstance(data, Split):
        return data
    if isinstance(data, DataLoader):
        images, labels = _read_batches(_in_order(data), what)
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=READ_BATCH, shuffle=False, collate_fn=_collate_items(what))
        images, labels = _read_batches(loader, what)
    elif isinstance(data, (tuple, list, Mapping, torch.Tensor, np.ndarray)):
        images, labels = _unpack(data, what)
        images, labels = _as_images(images, what), None if labels is None else _as_labels(labels, what)
    else:
        raise OodbenchError(f"{what}: expected {FORMS}; got {_describe(data)}")
    if labels is None:
        if labeled:
            raise OodbenchError(f"{what}: labels are needed (give (images, labels), a Dataset of (image, label) "
                                "items or a DataLoader of (images, labels) batches, or dicts with a 'label' key)")
        labels = torch.zeros(len(images), dtype=torch.long)
    for head, values in (labels.items() if isinstance(labels, dict) else [(None, labels)]):
        if values.shape != (len(images),):
            name = f" of head '{head}'" if head else ""
            raise OodbenchError(f"{what}: {len(images)} images but labels{name} of shape {list(values.shape)}")
    if len(images) == 0:
        raise OodbenchError(f"{what} has no images")
    return Split(images, labels)


def _keyed_split(data: Mapping) -> bool:
    """A dict holding one split's images (and labels) under the documented keys."""
    return any(key in data for key in IMAGE_KEYS) and all(key in IMAGE_KEYS + LABEL_KEYS for key in data)


def _looks_like_labels(value: Any) -> bool:
    """Class indices (1-D integers) or labels per head, as opposed to images or another data set."""
    if isinstance(value, Mapping):
        return not _keyed_split(value) and all(_looks_like_labels(v) for v in value.values())
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value)


def _unpack(batch: Any, what: str) -> tuple[Any, Any]:
    """(images, labels or None) of one batch, item or whole split in a documented form."""
    if isinstance(batch, Mapping):
        image_key = next((key for key in IMAGE_KEYS if key in batch), None)
        if image_key is None:
            raise OodbenchError(f"{what}: a dict needs its images under one of the keys {', '.join(IMAGE_KEYS)} "
                                f"(and labels under {', '.join(LABEL_KEYS)}); got keys {', '.join(map(str, batch))}")
        label_key = next((key for key in LABEL_KEYS if key in batch), None)
        return batch[image_key], batch[label_key] if label_key else None
    if isinstance(batch, (tuple, list)) and batch and not _is_number(batch[0]):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2 or _looks_like_labels(batch[1]):  # (images, labels, index...) as some datasets yield
            return batch[0], batch[1]
    return batch, None  # images as they are (nested lists of numbers included)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number))


def _describe(data: Any) -> str:
    """What the user passed, in a few words: its type, and the first entry's for a list or tuple."""
    name = type(data).__name__
    if isinstance(data, (list, tuple)) and data:
        return f"a {name} of {type(data[0]).__name__}"
    return f"{name} {data!r}" if isinstance(data, (str, Path, int, float, type(None))) else f"a {name}"


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


def _collate_items(what: str):
    """A collate function for a Dataset's items in any documented form (images stacked)."""

    def collate(items: list) -> tuple[torch.Tensor, Any]:
        pairs = [_unpack(item, what) for item in items]
        images = [_image_tensor(image, what) for image, _ in pairs]
        shapes = sorted({"x".join(map(str, image.shape)) for image in images})
        if len(shapes) > 1:
            raise OodbenchError(f"{what}: items have images of different shapes ({', '.join(shapes)}); "
                                "resize them to one size first")
        labels = [label for _, label in pairs]
        if any(label is None for label in labels):
            return torch.stack(images), None
        if isinstance(labels[0], Mapping):
            return torch.stack(images), {head: torch.as_tensor([label[head] for label in labels]) for head in labels[0]}
        return torch.stack(images), _as_labels([np.asarray(label) for label in labels], what)

    return collate


def _image_tensor(image: Any, what: str) -> torch.Tensor:
    from PIL import Image

    if isinstance(image, Image.Image):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(image)
    if not isinstance(image, (torch.Tensor, np.ndarray)):
        raise OodbenchError(f"{what}: dataset items must be (image, label), an image, or a dict with an 'image' key, "
                            f"the image a tensor, an array or a PIL image; got {_describe(image)}")
    return _tensor(image, what, "images")


def _read_batches(batches, what: str) -> tuple[torch.Tensor, Any]:
    images, labels = [], []
    for batch in _batches(batches, what):
        batch_images, batch_labels = _unpack(batch, what)
        images.append(_as_images(batch_images, what))
        labels.append(batch_labels)
    if not images:
        raise OodbenchError(f"{what} has no images")
    shapes = sorted({"x".join(map(str, batch.shape[1:])) for batch in images})
    if len(shapes) > 1:
        raise OodbenchError(f"{what}: batches have images of different shapes ({', '.join(shapes)}); "
                            "resize them to one size first")
    if any(label is None for label in labels):
        return torch.cat(images), None
    if isinstance(labels[0], Mapping):
        return torch.cat(images), {head: torch.cat([_as_labels(b[head], what) for b in labels]) for head in labels[0]}
    return torch.cat(images), torch.cat([_as_labels(b, what) for b in labels])


def _batches(loader, what: str) -> Iterator[Any]:
    """The batches of a user's loader; its own collate failing (images of different sizes,
    items that are not tensors) is reported in one line."""
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except (RuntimeError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OodbenchError(f"{what}: the DataLoader cannot make a batch ({first}); its items must be images "
                                "of one shape, or (image, label) pairs") from None


def _tensor(value: Any, what: str, kind: str) -> torch.Tensor:
    """`value` as a CPU tensor; a value that is not numbers is named, with the expected form."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise OodbenchError(f"{what}: {kind} must be a tensor or array of numbers, got {_describe(value)} "
                            f"(expected {FORMS})") from None


def _as_images(images: Any, what: str) -> torch.Tensor:
    tensor = _tensor(images, what, "images")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.ndim != 4:
        raise OodbenchError(f"{what}: images must be N x C x H x W (or N x H x W), got shape {list(tensor.shape)} "
                            f"(expected {FORMS})")
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
    tensor = _tensor(labels, what, "labels")
    if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.ndim != 1:
        raise OodbenchError(f"{what}: labels must be one integer class index per image, got {tensor.dtype} of "
                            f"shape {list(tensor.shape)}")
    return tensor.long()
