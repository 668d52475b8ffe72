"""The caches: model outputs, layer statistics and fit states, as verified files.

`OutputCache`: one forward pass per (model, dataset split), reused by everything. An entry
holds logits, penultimate features, labels, the classifier's (W, b) and the model's extras
(auxiliary tensors it was asked for, ``extra:<name>``), so feature methods never load the
model. Its key (`oodbench.identity.output_key_text`) names the model identity and weights
hash, the split's fingerprint (the data actually read, the selection and the preprocessing)
and the extractor version; entries are written by `oodbench.benchmark.extraction.extract`.

`LayerCache` keeps per-sample statistics of intermediate layers (`oodbench.models.layers`)
that GRAM or MDS-Ensemble read, one entry per (model, split, statistic).
`FitStateCache` keeps what a postprocessor's `fit` computed under the same rules, keyed
by the method, its code, its hyperparameters and the keys of the outputs it was fitted on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from oodbench.identity import fit_key_text
from oodbench.outputs import Outputs
from oodbench.storage.files import VerifiedFiles, lock_exclusive


EXTRA = "extra:"  # prefix of the model's extras among an entry's tensors


class OutputCache(VerifiedFiles):
    """Model outputs per (model, split), under ``<cache>/outputs``; keys from
    `oodbench.identity.output_key_text`."""

    kind = "outputs"
    what = "output cache entry"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def load(self, key: str) -> Outputs | None:
        """The entry, or None when absent or invalid (then it is removed)."""
        entry = self.read(key)
        if entry is None:
            return None
        tensors, scalars = entry
        return outputs_of(tensors, scalars.get("meta"))

    def save(self, key: str, outputs: Outputs) -> None:
        weight, bias = outputs.fc
        self.write(key, {"logits": outputs.logits, "features": outputs.features, "labels": outputs.labels,
                         "fc_weight": weight, "fc_bias": bias,
                         **{EXTRA + name: value for name, value in outputs.extras.items()}}, {"meta": outputs.meta})


class LayerCache(VerifiedFiles):
    """Per-sample statistics of intermediate layers per (model, split, statistic), under
    ``<cache>/layers``; keys from `oodbench.identity.layer_key_text`, values one N x K
    tensor per layer call (``"0"``, ``"1"``, ...)."""

    kind = "layers"
    what = "layer statistics cache entry"

    def load(self, key: str) -> list[torch.Tensor] | None:
        entry = self.read(key)
        return None if entry is None else [entry[0][str(i)] for i in range(len(entry[0]))]

    def save(self, key: str, values: list[torch.Tensor]) -> None:
        self.write(key, {str(i): value for i, value in enumerate(values)}, {})


class FitStateCache(VerifiedFiles):
    """Fitted postprocessor state on disk (tensors plus JSON scalars), under ``<cache>/fits``."""

    kind = "fits"
    what = "fit cache entry"

    @staticmethod
    def key(method, output_keys: list[str]) -> str:
        """From the method's class and code, the params its `fit` depends on, and the outputs."""
        return fit_key_text(method, output_keys)

    def load(self, key: str) -> dict | None:
        entry = self.read(key)
        return None if entry is None else {**entry[0], **entry[1]}

    @contextmanager
    def computing(self, key: str) -> Iterator[None]:
        """Held while the state for `key` is looked up, fitted and saved: jobs that need the
        same state at once (Ray tasks on one machine or sharing the cache folder: two models
        with the same weights, a method listed under two settings) fit it once; the others
        wait, then load it. The lock file beside the entry is empty and stays."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as handle:
            lock_exclusive(handle)
            yield

    def save(self, key: str, state: dict) -> bool:
        """Store `state` when it is tensors and JSON scalars only; False (not stored) otherwise."""
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if not all(isinstance(v, (bool, int, float, str, type(None))) for v in scalars.values()):
            return False
        self.write(key, tensors, scalars)
        return True


def outputs_of(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Outputs:
    """An entry's tensors (names as `OutputCache.save` writes them) as `Outputs`."""
    return Outputs(logits=tensors["logits"], features=tensors["features"], labels=tensors["labels"],
                   fc=(tensors["fc_weight"], tensors["fc_bias"]), meta=dict(meta or {}),
                   extras={name[len(EXTRA):]: value for name, value in tensors.items() if name.startswith(EXTRA)})
