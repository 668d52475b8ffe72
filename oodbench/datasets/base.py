"""Dataset references, seeded stratified parts, and the common image transform.

A benchmark names each split as a `DatasetRef`: a registered source, its options, and
optionally a part of a seeded stratified split of that source (``parts`` gives the part
sizes as counts or fractions, one of which may be ``rest``). Sources return any
map-style dataset whose items are ``(image, label)`` with the image a PIL image, a NumPy
array or a tensor; `load_dataset` converts it to float [0,1] tensors of the benchmark's
`ImageSpec` (resize the short side, center crop, grey replicated to 3 channels): the
benchmark's, or the model's own when it gives one (`ImageSpec.for_model`).

Every dataset class says what it read through ``fingerprint(files)`` (files: an
`oodbench.identity.FileState`): image files by path, size and mtime, decoded single-file
formats by content, in-memory images by their pixels or generating recipe, selections by
their indices. `split_fingerprint_of` turns that into the split's key (DESIGN.md).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from oodbench.errors import OodbenchError
from oodbench.identity import FileState, array_digest, dataset_fingerprint, digest, split_fingerprint
from oodbench.registry import DATASETS

SOURCE_VERSION = 2  # bump when a source's decoding changes; part of every split's fingerprint


def register_dataset(*names: str) -> Callable:
    """Register a source ``fn(data_root, image, **options) -> Dataset``."""
    return DATASETS.register(*names)


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


def describe_parts(parts: dict[str, Any]) -> str:
    """A split's ``parts`` in words: ``val 5,000, test the rest`` (fractions as percentages)."""
    return ", ".join(f"{name} " + ("the rest" if size == "rest" else f"{size:.0%}" if isinstance(size, float) and
                                   size <= 1 else f"{int(size):,}") for name, size in parts.items())


def stratified_parts(labels: np.ndarray, parts: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Split indices into named parts, stratified by label, deterministic given `seed`.

    Sizes are counts (int) or fractions (float <= 1) of the whole; one part may be
    ``rest``. Each class is spread over the parts in proportion (largest remainders).
    """
    labels = np.asarray(labels)
    n = labels.size
    sizes: dict[str, int] = {}
    rest = [k for k, v in parts.items() if v == "rest"]
    if len(rest) > 1:
        raise OodbenchError("only one part may be 'rest'")
    for key, value in parts.items():
        if value == "rest":
            continue
        sizes[key] = int(round(value * n)) if isinstance(value, float) and value <= 1 else int(value)
    taken = sum(sizes.values())
    if rest:
        sizes[rest[0]] = n - taken
    if taken > n or any(v < 0 for v in sizes.values()):
        raise OodbenchError(f"the parts ({describe_parts(parts)}) ask for more than the {n:,} images available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    # Walk the samples grouped by label (shuffled within each label) and hand each to the
    # part furthest behind its share: every part gets each class in proportion to its size.
    by_label = order[np.argsort(labels[order], kind="stable")]
    names = list(parts) + ["_unused"]
    choices = part_sequence(tuple(float(sizes[k]) for k in parts) + (float(n - sum(sizes.values())),), n)
    return {name: np.sort(by_label[choices == number]) for number, name in enumerate(names[:-1])}


@functools.lru_cache(maxsize=32)
def part_sequence(targets: tuple[float, ...], n: int) -> np.ndarray:
    """Which part each of `n` positions goes to: the part furthest behind its share
    (target x (position + 1) / n - filled; the first on ties; full parts never). It depends
    on the part sizes alone, so it is kept for the next split of the same sizes.

    Plain floats in a Python loop: the same float64 arithmetic, in the same order, as on
    NumPy arrays, at a fraction of the cost for the few parts of a split."""
    filled = [0.0] * len(targets)
    open_parts = [part for part, target in enumerate(targets) if target > 0]
    choices = np.empty(n, dtype=np.int64)
    for position in range(n):
        best, choice = -math.inf, 0
        for part in open_parts:
            behind = targets[part] * (position + 1) / n - filled[part]
            if behind > best:
                best, choice = behind, part
        choices[position] = choice
        filled[choice] += 1
        if filled[choice] >= targets[choice]:
            open_parts.remove(choice)
    choices.flags.writeable = False
    return choices


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
