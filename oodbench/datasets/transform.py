"""The common image transform: `ImageSpec` says it, `to_image_tensor` applies it, and
`Transformed` applies it to every item of a source.

Sources return items whose image is a PIL image, a NumPy array or a tensor; the transform
turns each into a float [0,1] tensor of the benchmark's `ImageSpec` (resize the short side,
center crop, grey replicated to 3 channels): the benchmark's, or the model's own when it
gives one (`ImageSpec.for_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from oodbench.errors import OodbenchError
from oodbench.file_state import dataset_fingerprint

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # torchvision's InterpolationMode names that PIL and torch share
PIL_FILTERS = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image.Resampling values (PIL imported lazily)


@dataclass(frozen=True)
class ImageSpec:
    """The test transform: resize the short side to `resize` (default `size`) with
    `interpolation`, center-crop `size` x `size`, `channels` channels, values in [0,1]
    (mean/std normalisation happens inside the model adapter).

    ``origin`` is empty for the benchmark's own transform, and names the model's when the
    model says how its inputs are prepared (timm's data config, a torchvision weights
    entry, a RobustBench preprocessing): then sources read the original images and leave
    out their own ``resize_crop`` (the benchmark's), so this transform alone applies."""

    size: int
    channels: int
    resize: int | None = None
    interpolation: str = "bilinear"
    origin: str = ""

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise OodbenchError(f"image interpolation '{self.interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
        if self.resize is not None and self.resize < self.size:
            raise OodbenchError(f"image resize {self.resize} is smaller than the crop {self.size}")

    @property
    def resize_to(self) -> int:
        return self.size if self.resize is None else self.resize

    def key(self) -> str:
        """Part of every split's fingerprint: the shape, and the resize and interpolation when
        they are not the plain resize-to-size bilinear ones (whose keys predate them)."""
        shape = f"{self.channels}x{self.size}x{self.size}"
        if self.resize_to == self.size and self.interpolation == "bilinear":
            return shape
        return f"{shape}:resize={self.resize_to}:{self.interpolation}"

    def source_key(self) -> str:
        """What a source's listing depends on: the shape, and whether it is the benchmark's transform."""
        return f"{self.channels}x{self.size}" + (":model" if self.origin else "")

    def describe(self, pre_crops: Iterable[tuple[int, int] | None] = ()) -> str:
        """In words, for table captions: ``resize 256 (bilinear), center crop 224``. `pre_crops`:
        the sources' own ``resize_crop`` of the splits read (what `source_crop` finds), applied
        to the files before this transform: the caption states what ran."""
        own = f"resize {self.resize_to} ({self.interpolation}), center crop {self.size}"
        crops = set(pre_crops)
        first = [f"resize {resize} (bilinear), center crop {crop}" for resize, crop in sorted(c for c in crops if c)]
        if not first:
            return own
        # after the source's crop to `size`, the plain resize-to-size and crop change nothing
        then = "" if (self.resize_to, self.interpolation) == (self.size, "bilinear") and all(
            c[1] == self.size for c in crops if c) else f", then {own}"
        if None not in crops:
            return " or ".join(first) + then
        return f"{' or '.join(first)}{then} on the sets whose source crops them, {own} on the others"

    def for_model(self, preprocessing: dict[str, Any] | None) -> "ImageSpec":
        """This (the benchmark's) transform, or the model's own when it gives one (``size``,
        ``resize``, ``interpolation``, ``origin``); the channel count stays the benchmark's."""
        if not preprocessing:
            return self
        return ImageSpec(int(preprocessing["size"]), self.channels, int(preprocessing["resize"]),
                         str(preprocessing["interpolation"]), str(preprocessing["origin"]))


def source_crop(dataset: Dataset) -> tuple[int, int] | None:
    """The ``resize_crop`` a source applies to its files before the benchmark's transform (None:
    none), found through the wrappers (`Transformed`, `Selection`) around it."""
    while dataset is not None:
        if getattr(dataset, "resize_crop", None):
            return tuple(dataset.resize_crop)
        dataset = getattr(dataset, "base", None)
    return None


class Transformed(Dataset):
    """Converts each item of a source to a [0,1] float tensor of the benchmark's shape; or, for
    a source read as is (``as_is``: its images keep their stored size, see `to_image_tensor`),
    to a tensor of the images' own size under every transform."""

    def __init__(self, base: Dataset, image: ImageSpec, label_override: int | None = None):
        self.base, self.image, self.label_override = base, image, label_override
        self.as_is = read_as_is(base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item, label = self.base[index]
        label = self.label_override if self.label_override is not None else int(label)
        return to_image_tensor(item, self.image, as_is=self.as_is), label

    def fingerprint(self, files) -> str:
        return dataset_fingerprint(self.base, files)

    def image_key(self) -> str:
        """The transform's part of the split's fingerprint: the spec's key, or for a source
        read as is only the channel count (every transform reads it alike)."""
        return f"{self.image.channels}:as-is" if self.as_is else self.image.key()


def read_as_is(source: Any) -> bool:
    """Whether a source (or the source a selection of it reads) keeps its images' stored size."""
    while source is not None:
        if getattr(source, "as_is", False):
            return True
        source = getattr(source, "base", None)
    return False


def resized_crop(height: int, width: int, size: int, resize: int | None = None
                 ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((new height, new width), (top, left)) of torchvision's ``Resize(resize)`` (the short
    side to `resize`, default `size`; the long one truncated) then ``CenterCrop(size)``."""
    resize = size if resize is None else resize
    if width <= height:
        new_height, new_width = int(resize * height / width), resize
    else:
        new_height, new_width = resize, int(resize * width / height)
    return (new_height, new_width), (int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0)))


def to_image_tensor(item: Any, image: ImageSpec, as_is: bool = False) -> torch.Tensor:
    """PIL / array / tensor -> float C x size x size in [0,1]: resize the short side to
    ``image.resize_to`` (``image.interpolation``), center crop ``image.size``, and match the
    channel count. `as_is`: no resize or crop (C x H x W of the stored image), as OpenOOD's
    ImageNetCPreProcessor (ToTensor, then the model's normalisation) reads ImageNet-C.

    Bit for bit what torchvision's Resize(resize, interpolation) + CenterCrop(size) +
    ToTensor give (PIL's resize for PIL images, antialiased bilinear/bicubic interpolation
    for tensors, plain nearest), without importing torchvision (seconds per process)."""
    from PIL import Image

    size, resize = image.size, image.resize_to
    resized = isinstance(item, Image.Image)
    if resized:
        item = item.convert("L" if image.channels == 1 else "RGB")
        if not as_is and (item.size != (size, size) or resize != size):
            # In PIL before ToTensor, as torchvision/OpenOOD test transforms do: PIL's resize
            # rounds to uint8, and FPR@95 moves by up to 0.3 points without it.
            (height, width), (top, left) = resized_crop(item.height, item.width, size, resize)
            if (height, width) != (item.height, item.width):
                item = item.resize((width, height), PIL_FILTERS[image.interpolation])
            item = item.crop((left, top, left + size, top + size))
        array = np.asarray(item, dtype=np.uint8)
        tensor = torch.from_numpy(array.reshape(item.height, item.width, -1).transpose(2, 0, 1).copy())
        tensor = tensor.float().div(255)
    elif isinstance(item, np.ndarray):
        array = item
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        tensor = tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()
    else:
        tensor = torch.as_tensor(item).float()
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
    if tensor.shape[0] != image.channels:
        if tensor.shape[0] == 1:
            tensor = tensor.expand(image.channels, -1, -1)
        elif image.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114])[: tensor.shape[0], None, None]
            tensor = (tensor * weights).sum(0, keepdim=True)
        else:
            tensor = tensor[: image.channels]
    if not resized and not as_is and (tuple(tensor.shape[1:]) != (size, size) or resize != size):
        (height, width), (top, left) = resized_crop(tensor.shape[1], tensor.shape[2], size, resize)
        if (height, width) != tuple(tensor.shape[1:]):
            mode = image.interpolation
            smooth = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
            tensor = torch.nn.functional.interpolate(tensor[None], size=[height, width], mode=mode, **smooth)[0]
        tensor = tensor[:, top : top + size, left : left + size]
    return tensor.contiguous()

