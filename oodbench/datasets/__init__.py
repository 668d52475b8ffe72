"""Dataset sources: each reads a standard on-disk format (or builds a built-in set) and
returns a torch Dataset of ([0,1] image tensor, label) pairs at the benchmark's image size."""

from oodbench.datasets.base import DatasetRef, load_dataset, register_dataset
from oodbench.datasets.transform import ImageSpec

__all__ = ["DatasetRef", "ImageSpec", "load_dataset", "register_dataset"]
