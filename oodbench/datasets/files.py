"""What every source that reads image files or decoded arrays builds on: the sample classes
(`ImageFiles` decoded on access, `ArrayImages` already in memory), the optional
``resize_crop`` before the benchmark's transform, folder listings (hidden files skipped,
first-level subfolders as classes), ``limit`` (`first`), and the checks that turn a missing
or unreadable file into one error line naming it.
"""

from __future__ import annotations

import os
import warnings
from operator import attrgetter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset

from oodbench.datasets.base import LabeledSamples, Selection
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import DatasetMissing, OodbenchError
from oodbench.identity import array_digest
from oodbench.file_state import FileState, folder_and_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def open_image(path: str | Path):
    """The decoded PIL image at `path`, or one readable error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise OodbenchError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise OodbenchError(f"cannot decode image {path} ({type(exc).__name__}: {exc}); expected a readable "
                            "PNG/JPEG image") from None


class ArrayImages(LabeledSamples):
    """Images already decoded into one uint8 array (N x H x W or N x H x W x C) from
    `files` (a pickle, idx or .mat file): fingerprinted by those files' contents."""

    def __init__(self, images: np.ndarray, targets: Sequence[int] | np.ndarray, origin: str,
                 files: Sequence[Path] = ()):
        super().__init__(targets)
        self.images = images
        self.origin = origin
        self.files = list(files)

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def fingerprint(self, files: FileState) -> str:
        return files.content(self.files) if self.files else "array:" + array_digest(self.images, self.targets)


class ImageFiles(LabeledSamples):
    """Image files decoded on access; fingerprinted by their paths, contents (or size and
    mtime, see `oodbench.file_state.FileState`) and labels. The paths are kept as the text
    ``os.fspath`` gives (``locations``): a listing of tens of thousands of files builds no
    `Path` objects unless ``paths`` is asked for."""

    def __init__(self, paths: Sequence[str | Path], targets: Sequence[int] | np.ndarray, origin: str,
                 resize_crop: Sequence[int] | None = None, as_is: bool = False):
        super().__init__(targets)
        self.locations = [os.fspath(path) for path in paths]
        self._paths: list[Path] | None = None
        self.origin = origin
        self.resize_crop = check_resize_crop(resize_crop)
        self.as_is = as_is  # read at the stored size under every transform (`oodbench.datasets.transform.Transformed`)

    @property
    def paths(self) -> list[Path]:
        """The image files, as `Path` objects (built on first use)."""
        if self._paths is None:
            self._paths = [Path(location) for location in self.locations]
        return self._paths

    def load(self, index: int):
        image = open_image(self.locations[index])
        return image if self.resize_crop is None else resize_then_crop(image, *self.resize_crop)

    def fingerprint(self, files: FileState) -> str:
        return f"{files.describe(self.locations)}:{array_digest(self.targets)}{self._crop_key()}"

    def selection_fingerprint(self, indices: np.ndarray, files: FileState) -> str:
        """Some of the files (a part, a limit): every path by name and every label (the
        indices refer to their order), and the selected files by content or size and mtime.
        The names are computed once per listing and `files` (the parts of a source share them)."""
        selected = files.describe([self.locations[i] for i in indices.tolist()])
        names = files.once(self, "names", lambda: files.names(self.locations))
        return f"{names}:{array_digest(self.targets)}{self._crop_key()}:{selected}"

    def _crop_key(self) -> str:
        # ":rgb": the mode conversion happens before the resize (before it, after: other pixels)
        return "" if self.resize_crop is None else f":resize_crop{list(self.resize_crop)}:rgb"


def check_resize_crop(value: Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value) or value[1] > value[0]):
        raise OodbenchError(f"option 'resize_crop' must be [resize, crop] with crop <= resize, got {value!r}")
    return int(value[0]), int(value[1])


def benchmark_crop(image: ImageSpec, resize_crop: Sequence[int] | None, as_is: bool = False) -> tuple[int, int] | None:
    """A source's ``resize_crop`` is part of the benchmark's transform: under a model's own
    transform (``image.origin``) the source reads the original images instead. A source read
    ``as_is`` takes none."""
    checked = check_resize_crop(resize_crop)
    if as_is is not False and (as_is is not True or checked is not None):
        raise OodbenchError(f"option 'as_is' must be true or false and goes without 'resize_crop', got as_is "
                            f"{as_is!r}" + (f" with resize_crop {list(checked)}" if checked else ""))
    return None if image.origin else checked


def resize_then_crop(image, resize: int, crop: int):
    """torchvision's Resize(resize) (short side, bilinear, PIL) then CenterCrop(crop): the
    ImageNet test transform (256 -> 224) that a single resize-and-crop to 224 is not.

    An image in any mode but RGB or L (RGBA, LA, palette, 1-bit, CMYK, 16-bit) is converted to
    RGB first, as OpenOOD's ``Convert('RGB')`` and torchvision's ImageFolder loader do before
    they resize: PIL's ``convert("RGB")`` drops the alpha channel (the colour under a
    transparent pixel shows, not a background). Resizing in the file's mode instead moves
    pixels by up to 190/255 (1-bit), and PIL's premultiplied RGBA resize turns a transparent
    white background black. L stays L: grey resized then replicated equals RGB resized."""
    from PIL import Image

    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def first(dataset: Dataset, limit: int | None) -> Dataset:
    """The first `limit` samples of `dataset` (all when `limit` is None)."""
    if limit is None:
        return dataset
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise OodbenchError(f"option 'limit' must be a positive integer, got {limit!r}")
    if limit >= len(dataset):
        return dataset
    origin = getattr(dataset, "origin", "")
    return Selection(dataset, np.arange(limit), f"{origin}, first {limit}")


def require(path: Path, what: str, hint: str) -> Path:
    """`path` if it exists, else DatasetMissing naming it and how to obtain it."""
    if not path.exists():
        raise DatasetMissing(f"{what} not found: expected {path}; {hint}")
    return path


def read_text_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OodbenchError(f"cannot read {path} ({exc}); expected a text file") from None


def child_path(folder: str, relative: str) -> str:
    """``str(Path(folder) / relative)`` for `folder` the text of a `Path`, by joining text when
    that gives the same string (a relative '/'-separated path without empty or '.' parts,
    which pathlib would drop, under a folder other than '.'): a list of tens of thousands of
    files builds no `Path` per line."""
    framed = f"/{relative}/"  # an empty part (a leading, trailing or doubled '/') or a '.' part shows here
    if os.sep != "/" or folder == "." or "//" in framed or "/./" in framed:
        return str(Path(folder) / relative)
    return (folder if folder.endswith("/") else folder + "/") + relative


def check_files_exist(paths: Sequence[str | Path], listed_in: str) -> None:
    """Every path is a file; each folder is listed once (no stat per file)."""
    files: dict[str, set[str]] = {}
    for line, path in enumerate(paths, start=1):
        folder, name = folder_and_name(path)
        if folder not in files:
            try:
                with os.scandir(folder or ".") as entries:
                    files[folder] = {entry.name for entry in entries if entry.is_file()}
            except OSError:
                files[folder] = set()
        if name not in files[folder] and not os.path.isfile(path):  # isfile: case-insensitive file systems
            raise OodbenchError(f"{listed_in} line {line} names {path}, which does not exist; "
                                "the image list and the image folder do not match")


def hidden(name: str) -> bool:
    """Dot-files and dot-folders (``.ipynb_checkpoints``, macOS's ``._x.jpg``, ``.DS_Store``) are
    never images or classes of a data set: every folder source skips them."""
    return name.startswith(".")


def class_folders(folder: Path) -> list[str]:
    """The sorted names of the first-level subfolders of `folder` that are classes: not hidden,
    not symlinks (as `image_entries`, which does not enter them)."""
    with os.scandir(folder) as listing:
        return sorted(entry.name for entry in listing if not hidden(entry.name) and entry.is_dir(follow_symlinks=False))


def visible_entries(folder: str) -> list[os.DirEntry] | None:
    """The entries of `folder` that are not hidden, sorted by name; None when it may not be read."""
    try:
        with os.scandir(folder) as listing:
            return sorted((entry for entry in listing if not hidden(entry.name)), key=attrgetter("name"))
    except PermissionError:
        return None


def image_entries(entries: Sequence[os.DirEntry], top: str | None = None) -> Iterator[tuple[str | None, str]]:
    """(first-level subfolder, None for a file directly in the folder; path) of every image
    file in or under the folder whose `visible_entries` are `entries`, as ``Path.rglob``
    finds them (symlinked files yes, symlinked folders not entered) but without hidden files
    and folders, from one directory listing per folder rather than a stat per file. Sorted
    as paths by their parts: each folder's entries by name, a subfolder's files where its
    name sorts (two entries of one folder differ in name, so comparing two paths' parts is
    deciding at the folder where they part)."""
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from image_entries(visible_entries(entry.path) or (), entry.name if top is None else top)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():  # the name has no leading dot
            yield top, entry.path


def folder_images(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """Image paths under `folder` (sorted as paths: by their parts; as text, ``str`` of their
    `Path`) and their first-level subfolder's class index: the position in `classes`, or by
    default among all the sorted class folders (`class_folders`), as torchvision's
    ImageFolder numbers them. An empty class folder keeps its index (its images are missing,
    not its class) and is named in one warning line, since a class folder without images
    usually means an incomplete copy."""
    entries = visible_entries(str(folder))
    found = list(image_entries(entries or ()))
    if classes is not None:
        names = list(classes)
    elif entries is None:  # unreadable: `class_folders` says so in its error
        names = class_folders(folder)
    else:  # the class folders from the same listing (`class_folders` would list the folder again)
        names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    index = {name: i for i, name in enumerate(names)}
    targets = []
    for top, _ in found:
        if top is None:
            targets.append(0)
        elif top in index:
            targets.append(index[top])
        else:
            raise OodbenchError(f"{folder}: subfolder '{top}' is not one of the {len(names)} expected "
                                f"classes ({', '.join(names[:5])}...)")
    paths = [path for _, path in found]
    empty = [] if classes is not None else sorted(set(names) - {top for top, _ in found if top is not None})
    if empty and len(empty) < len(names):
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        warnings.warn(f"{folder}: {len(empty)} of the {len(names)} class folders hold no images ({shown}); they "
                      "keep their class index (the position among the sorted class folders), so the other "
                      "labels do not shift, but those classes are missing from the data", stacklevel=2)
    return paths, targets

