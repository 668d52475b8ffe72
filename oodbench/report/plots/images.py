"""Images of a split as a model reads them, for the figures that run the model itself
(``pro-shift`` and ``landscape``) rather than read its cached outputs."""

from __future__ import annotations

import numpy as np
import torch

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.datasets.base import load_dataset


def split_images(experiment: CachedExperiment, spec, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
    """[0,1] images of a split (the ones at `indices`) as model `spec` reads them (its test
    transform), loaded from the data root."""
    ref = experiment.splits[split]
    dataset = load_dataset(ref.ref, experiment.config.data_root, experiment.context(spec).image, ood=ref.ood)
    indices = np.arange(len(dataset)) if indices is None else indices
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])


def subsample_images(experiment: CachedExperiment, spec, split: str, samples: int, seed: int) -> torch.Tensor:
    """At most `samples` images of `split`, drawn without replacement with `seed`, in index order."""
    size = len(experiment.outputs(experiment.config.models[0], split))
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(size, size=min(samples, size), replace=False))
    return split_images(experiment, spec, split, indices)

