"""The output cache: one forward pass per (model, dataset split), reused by everything.

An entry holds logits, penultimate features, labels, the classifier's (W, b) and the
model's extras (auxiliary tensors it was asked for, ``extra:<name>``), so feature
methods never load the model. Its key (`oodbench.identity.output_key_text`) names
the model identity and weights hash, the split's fingerprint (the data actually read, the
selection and the preprocessing) and the extractor version. Each entry stores that full
key and a checksum of its tensors; the reader checks both, so a damaged file, or a valid
file copied over another key's path, is recomputed with one warning line naming it.
Entries are written to a temporary file and renamed into place.

`LayerCache` keeps per-sample statistics of intermediate layers (`oodbench.models.layers`)
that GRAM or MDS-Ensemble read, one entry per (model, split, statistic).
`FitStateCache` keeps what a postprocessor's `fit` computed under the same rules, keyed
by the method, its code, its hyperparameters and the keys of the outputs it was fitted on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from oodbench.identity import fit_key_text, key_of, tensors_checksum
from oodbench.errors import NoSpaceLeft, disk_full
from oodbench.postprocessors.base import Outputs


class VerifiedFiles:
    """Files of ``{"key": full key text, "tensors": {...}, "scalars": {...}, "checksum": ...}``
    under ``root/<kind>/``, named by a hash of the key; `load` verifies key and checksum."""

    kind = ""
    what = "cache entry"
    redo = "recomputing it"

    def __init__(self, root: str | Path):
        self.root = Path(root) / self.kind

    def path(self, key: str) -> Path:
        name = key_of(key)
        return self.root / name[:2] / f"{name}.pt"

    @staticmethod
    def checksum(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> str:
        return tensors_checksum(tensors) + hashlib.sha256(json.dumps(scalars, sort_keys=True).encode()).hexdigest()

    def read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, scalars) of the entry for `key`, or None when absent or failing a check
        (then it is removed, with one warning line naming the file)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or not {"key", "tensors", "scalars", "checksum"} <= set(payload):
                raise ValueError("not an oodbench cache entry")
            if payload["key"] != key:
                raise ValueError("it holds another key's values")
            if self.checksum(payload["tensors"], payload["scalars"]) != payload["checksum"]:
                raise ValueError("checksum mismatch")
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"{self.what} {path} is invalid ({reason}); {self.redo}", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        return payload["tensors"], payload["scalars"]

    def write(self, key: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_save({"key": key, "tensors": tensors, "scalars": scalars,
                     "checksum": self.checksum(tensors, scalars)}, self.path(key))


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
        extras = {name[len(EXTRA):]: value for name, value in tensors.items() if name.startswith(EXTRA)}
        return Outputs(logits=tensors["logits"], features=tensors["features"], labels=tensors["labels"],
                       fc=(tensors["fc_weight"], tensors["fc_bias"]), meta=dict(scalars.get("meta", {})),
                       extras=extras)

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


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename into place. A full disk ends in
    `NoSpaceLeft` naming `path`, and leaves no partial file and any entry at `path` as it was."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:
        if not out_of_space(exc, path.parent):
            raise
        raise NoSpaceLeft.writing(path, "free space on that disk or point --cache-dir (OODBENCH_CACHE) at another "
                                        "one, then rerun to resume") from None
    finally:
        temporary.unlink(missing_ok=True)


def out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of disk. torch.save reports a full disk as a RuntimeError
    ("unexpected pos"), with the OSError(ENOSPC) only as its context when it writes to a file
    object, so for a RuntimeError the free space left on `folder`'s disk decides."""
    for error in (exc, exc.__context__):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    return isinstance(exc, RuntimeError) and disk_full(folder)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of `path` whose writer (on this host) was killed."""
    host = socket.gethostname()
    for temporary in path.parent.glob(f".{path.name}.*.tmp"):
        owner, _, pid = temporary.name[len(path.name) + 2 : -len(".tmp")].rpartition(".")
        if owner == host and pid.isdigit() and not _process_alive(int(pid)):
            temporary.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def save(self, key: str, state: dict) -> bool:
        """Store `state` when it is tensors and JSON scalars only; False (not stored) otherwise."""
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if not all(isinstance(v, (bool, int, float, str, type(None))) for v in scalars.values()):
            return False
        self.write(key, tensors, scalars)
        return True


def shard_seconds() -> float:
    """How much extraction work a kill may lose: OODBENCH_SHARD_SECONDS, default 30."""
    value = os.environ.get("OODBENCH_SHARD_SECONDS", "30")
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 30.0


def _shard_key(key: str, batch_size: int, number: int) -> str:
    return f"{key}#batch_size={batch_size}#shard={number}"


@torch.no_grad()
def extract(model, dataset: Dataset, batch_size: int = 256, num_workers: int = 0, device: str = "cpu",
            desc: str = "extract", cache: OutputCache | None = None, key: str | None = None) -> Outputs:
    """One forward pass over `dataset`: logits, penultimate features, labels and (W, b).

    Images are decoded batch by batch (by `num_workers` DataLoader processes, into pinned
    memory for a CUDA device), so memory holds a few batches of images, never the split;
    what accumulates is each image's outputs (features, logits).

    With `cache` and `key`, the entry is saved under `key`, and the work is written as it
    goes in shards (every `shard_seconds()`, at batch boundaries, each verified like an
    entry): a killed extraction resumes from its last complete shard, and the entry equals
    an uninterrupted extraction bit for bit (the batches are the same).
    """
    sharded = cache is not None and key is not None
    chunks: list[dict[str, torch.Tensor]] = []
    done, number = 0, 0
    while sharded:  # resume from the shards a killed run left
        entry = cache.read(_shard_key(key, batch_size, number))
        if entry is None or entry[1].get("start") != done:
            break
        chunks.append(entry[0])
        done, number = entry[1]["end"], number + 1
    rest = dataset if done == 0 else Subset(dataset, range(done, len(dataset)))
    cuda = torch.device(device).type == "cuda"  # pinned batches copy to the GPU while the next ones decode
    loader = DataLoader(rest, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda)
    pending: list[dict[str, torch.Tensor]] = []
    last_flush = time.monotonic()
    interval = shard_seconds()

    def flush() -> None:
        nonlocal pending, done, number, last_flush
        merged = _concat(pending)
        end = done + len(merged["labels"])
        cache.write(_shard_key(key, batch_size, number), merged, {"start": done, "end": end})
        chunks.append(merged)
        pending, done, number, last_flush = [], end, number + 1, time.monotonic()

    for images, targets in tqdm(loader, desc=desc, leave=False, unit="batch", mininterval=1.0,
                                disable=len(loader) < 20):
        images = images.to(device, non_blocking=cuda)
        if hasattr(model, "forward_with_extras"):
            feats, logit, extras = model.forward_with_extras(images)
        else:
            (feats, logit), extras = model.features(images), {}
        pending.append({"features": feats.float().cpu(), "logits": logit.float().cpu(),
                        "labels": torch.as_tensor(targets).long(),
                        **{EXTRA + name: _stored(value) for name, value in extras.items()}})
        if sharded and time.monotonic() - last_flush >= interval:
            flush()
    chunks.extend(pending)
    merged = _concat(chunks)
    weight, bias = model.fc
    outputs = Outputs(logits=merged["logits"], features=merged["features"], labels=merged["labels"],
                      fc=(weight.float().cpu(), bias.float().cpu()),
                      extras={name[len(EXTRA):]: value for name, value in merged.items() if name.startswith(EXTRA)})
    if sharded:
        cache.save(key, outputs)
        for shard in range(number):
            cache.path(_shard_key(key, batch_size, shard)).unlink(missing_ok=True)
    return outputs


def _stored(extra: torch.Tensor) -> torch.Tensor:
    """An extra as cached: on the CPU, floating point as float32 (like the logits)."""
    return extra.float().cpu() if extra.is_floating_point() else extra.cpu()


def _concat(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = chunks[0] if chunks else ("features", "logits", "labels")
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in names}
