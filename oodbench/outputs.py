"""`Outputs`: what a model produced on one dataset split, the record every floor shares.

The caches store it (`oodbench.storage.caches`), the engine fills it
(`oodbench.benchmark.extraction`), postprocessors read it (`oodbench.postprocessors.base`
re-exports it for plugins: ``from oodbench import Outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Outputs:
    """Cached outputs of one model on one dataset split.

    ``logits``: N x C (for models that output probabilities, their log), ``features``:
    N x D penultimate activations, ``labels``: N class labels (-1 for OOD samples),
    ``fc``: the classifier's (W: C x D, b: C) that maps features to logits.
    ``model`` and ``inputs`` (a dataset of [0,1] images) are set only for methods that
    need the model. ``extras``: auxiliary per-sample tensors the model was asked for
    (name -> N x ...), cached with the logits.
    """

    logits: torch.Tensor
    features: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    fc: tuple[torch.Tensor, torch.Tensor] | None = None
    model: Any = None
    inputs: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)
