"""Identity in one place: every key of a reused value is built here, from what produced it.

A cached or stored value may only be reused when its key names everything that went
into it (DESIGN.md, "Identity and reuse"):

- **data split**: the files actually read (relative path and content hash, or size and
  modification time for image files this cache has not hashed, plus the contents of a
  seeded sample of them; see `oodbench.file_state.FileState`), which
  layout was picked, the selected indices after ``parts``/``limit``, and the
  preprocessing (`split_fingerprint`);
- **benchmark**: its resolved definition and the fingerprints of the splits used, never
  only its name and version (`benchmark_fingerprint`);
- **model**: its identity string and the bytes of its weights (`ModelAdapter.weights_hash`;
  built-in models also the training recipe, `model_weights_key`);
- **cell**: model + the fingerprints of the splits it read + postprocessor, its code and
  settings + the convention profile (`cell_fingerprint`).

Content hashes are remembered by (path, size, mtime, inode) (`oodbench.file_state`).
Every cache file stores its full key text (`key_text`) and the reader compares it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from typing import Any, Iterable

import numpy as np
import torch

EXTRACTOR_VERSION = 4  # 3: keys name the data content; entries store their key; 4: memory-mapped entry files
LAYERS_VERSION = 1  # bump when a reduction of `oodbench.models.layers` changes
SCORE_VERSION = 2  # bump when the way a cell turns scores into metrics changes (2: cells store their scores)


def digest(payload: Any, length: int = 16) -> str:
    """A stable hex digest of a JSON-able payload (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def key_text(payload: Any) -> str:
    """The full, human-readable key a cache file stores and its reader compares."""
    return json.dumps(payload, sort_keys=True, default=str)


def key_of(text: str) -> str:
    """The file name of the entry whose full key is `text`."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of a dict of tensors. The bytes are hashed
    straight from each tensor's buffer (a memory-mapped cache entry's pages, never a copy)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            hasher.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return hasher.hexdigest()


def array_digest(*arrays: np.ndarray | torch.Tensor) -> str:
    """sha256 of arrays' shapes, dtypes and bytes (decoded images held in memory)."""
    hasher = hashlib.sha256()
    for array in arrays:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().contiguous().numpy()
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.shape}:{array.dtype}".encode())
        hasher.update(array.view(np.uint8).reshape(-1).data)
    return hasher.hexdigest()[:32]


def code_digest(cls: type) -> str:
    """Hash of the module defining `cls` (and of its ``code_modules``, the modules a composite
    method's parts come from): editing a method's code changes its keys. A method
    that computes its scores one of two ways depending on what is installed (KNN: faiss or
    torch) names the one in use with a ``backend()`` static method, which is hashed too."""
    text = ""
    for module in (cls.__module__, *getattr(cls, "code_modules", ())):  # a composite's parts live elsewhere
        try:
            text += inspect.getsource(sys.modules[module])
        except (OSError, TypeError, KeyError):
            text += f"{module}.{cls.__qualname__}"
    backend = getattr(cls, "backend", None)
    if callable(backend):
        text += f"\0backend={backend()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- files


# --------------------------------------------------------------------------- keys


def split_fingerprint(source_fingerprint: str, ref_payload: dict, image_key: str, ood: bool,
                      source_version: int) -> str:
    """One dataset split: the data read, how it is selected and preprocessed."""
    return digest({"data": source_fingerprint, "ref": ref_payload, "image": image_key, "ood": ood,
                   "source_version": source_version}, 24)


def benchmark_fingerprint(definition: dict, splits: dict[str, str]) -> str:
    """A benchmark as run: its resolved definition and the fingerprint of every split used."""
    return digest({"definition": definition, "splits": dict(sorted(splits.items()))}, 12)


def output_key_text(model_identity: str, weights_hash: str, split: str) -> str:
    return key_text({"kind": "outputs", "model": model_identity, "weights": weights_hash, "split": split,
                     "extractor": EXTRACTOR_VERSION})


def layer_key_text(output_key: str, statistic: str) -> str:
    """Per-sample statistics of a model's intermediate layers (`oodbench.models.layers`) on one
    split: the split's output key (model, weights, data) and the statistic's name (reduction,
    its arguments, the layers)."""
    return key_text({"kind": "layers", "outputs": output_key, "statistic": statistic, "version": LAYERS_VERSION})


def fit_key_text(method: Any, output_keys: Iterable[str]) -> str:
    """The method's class and code, the params its `fit` depends on, the outputs it saw."""
    cls = type(method)
    names = method.params if cls.fit_params is None else cls.fit_params
    return key_text({"kind": "fit", "class": f"{cls.__module__}.{cls.__qualname__}", "code": code_digest(cls),
                     "params": {name: method.params[name] for name in names}, "outputs": list(output_keys)})


ATTACK_VERSION = 2  # bump when `oodbench.tasks.attacks` changes the images an attack produces (2: KNN's bank normalised)


def attack_key_text(method: Any, fit_keys: Iterable[str], output_key: str, attack: dict, eps: float,
                    direction: str) -> str:
    """Attacked images of one split: the split's output key (model, weights, data), the
    attacked method (class, code, every hyperparameter, the outputs it was fitted on), the
    threat model and budget, and which way the score is pushed (``raise`` / ``lower``)."""
    cls = type(method)
    return key_text({"kind": "attack", "outputs": output_key, "class": f"{cls.__module__}.{cls.__qualname__}",
                     "code": code_digest(cls), "params": dict(method.params), "fit": list(fit_keys),
                     "attack": attack, "eps": float(eps), "direction": direction, "version": ATTACK_VERSION})


def model_weights_key_text(name: str, recipe: dict, recipe_version: int, data: str) -> str:
    """A built-in model's weights: its name, training recipe and training data."""
    return key_text({"kind": "builtin-weights", "model": name, "recipe": recipe, "recipe_version": recipe_version,
                     "data": data})


def cell_fingerprint(*, model_identity: str, weights_hash: str, postprocessor: type, setting: str,
                     params: dict, search_space: dict, splits: dict[str, str],
                     conventions: dict | None = None) -> str:
    """One cell of the store: model, method (class, code, settings), the splits it read and the
    convention profile (`oodbench.benchmark.conventions`; the default ``paper`` profile adds nothing, so
    its cells keep the keys they had before profiles existed)."""
    payload = {"model": model_identity, "weights": weights_hash,
               "postprocessor": f"{postprocessor.__module__}.{postprocessor.__qualname__}",
               "code": code_digest(postprocessor), "setting": setting, "params": params,
               "search_space": search_space, "splits": dict(sorted(splits.items())),
               "score_version": SCORE_VERSION}
    if conventions is not None and conventions.get("name") != "paper":
        payload["conventions"] = conventions
    return digest(payload, 16)
