"""The built-in offline sets of the `digits` benchmark: nothing to download.

- ``sklearn_digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images,
  pixel values 0..16 scaled to [0,1]), optionally restricted to some classes.
- ``skimage_textures``: square patches cut at seeded random places from scikit-image's
  bundled texture photographs (brick, grass, gravel), resized to the benchmark size.
- ``gaussian_noise`` / ``uniform_noise``: seeded noise images of the benchmark's shape,
  N(mean, std) clipped to [0,1] and U(0,1).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from oodbench.datasets.base import TensorImages, register_dataset
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@register_dataset("sklearn_digits")
def sklearn_digits(data_root: Path, image: ImageSpec, classes: list[int] | None = None) -> TensorImages:
    """scikit-learn's 8x8 handwritten digits (1,797 images; `classes` keeps those digits), bundled: no files."""
    images, labels = _digits()
    keep = np.isin(labels, classes) if classes is not None else np.ones(labels.size, bool)
    return TensorImages(torch.from_numpy(images[keep]).unsqueeze(1), labels[keep])


TEXTURES = ("brick", "grass", "gravel")


@register_dataset("skimage_textures")
def skimage_textures(
    data_root: Path,
    image: ImageSpec,
    textures: list[str] = list(TEXTURES),
    patches_per_texture: int = 200,
    patch_size: int = 64,
    seed: int = 0,
) -> TensorImages:
    """Seeded random patches of scikit-image's bundled texture photos (one class per texture),
    greyscale, resized to the benchmark's size; no files."""
    import skimage.data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    patches, labels = [], []
    for label, name in enumerate(textures):
        if name not in TEXTURES:
            raise OodbenchError(f"unknown texture '{name}' (scikit-image has: {', '.join(TEXTURES)})")
        photo = getattr(skimage.data, name)().astype(np.float32)
        photo = photo / 255.0 if photo.max() > 1 else photo
        if photo.ndim == 3:
            photo = photo.mean(axis=2)
        rows = rng.integers(0, photo.shape[0] - patch_size, patches_per_texture)
        cols = rng.integers(0, photo.shape[1] - patch_size, patches_per_texture)
        for r, c in zip(rows, cols):
            patch = photo[r : r + patch_size, c : c + patch_size]
            patches.append(resize(patch, (image.size, image.size), anti_aliasing=True))
            labels.append(label)
    tensor = torch.from_numpy(np.stack(patches).astype(np.float32)).unsqueeze(1)
    return TensorImages(tensor.clamp(0, 1), np.asarray(labels))


@register_dataset("gaussian_noise")
def gaussian_noise(data_root: Path, image: ImageSpec, count: int = 1000, mean: float = 0.5,
                   std: float = 0.25, seed: int = 0) -> TensorImages:
    """`count` images of seeded Gaussian noise N(mean, std^2) per pixel, clipped to [0, 1]; no files."""
    generator = torch.Generator().manual_seed(seed)
    shape = (count, image.channels, image.size, image.size)
    images = (torch.randn(shape, generator=generator) * std + mean).clamp(0, 1)
    recipe = {"source": "gaussian_noise", "mean": mean, "std": std, "seed": seed, "generator": "torch.randn"}
    return TensorImages(images, np.zeros(count, dtype=np.int64), recipe=recipe)


@register_dataset("uniform_noise")
def uniform_noise(data_root: Path, image: ImageSpec, count: int = 1000, seed: int = 0) -> TensorImages:
    """`count` images of seeded uniform noise in [0, 1] per pixel; no files."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand((count, image.channels, image.size, image.size), generator=generator)
    recipe = {"source": "uniform_noise", "seed": seed, "generator": "torch.rand"}
    return TensorImages(images, np.zeros(count, dtype=np.int64), recipe=recipe)
