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
import fcntl
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from oodbench.benchmark.entries import EntryFile, EntryLayout, entry_checksum, map_file, read_entry, write_entry
from oodbench.identity import fit_key_text, key_of, tensors_checksum
from oodbench.errors import NoSpaceLeft, OodbenchError, debugging, disk_full, worker_message
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

    def read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, scalars) of the entry for `key`, or None when absent or failing a check
        (then it is removed, with one warning line naming the file). The tensors are
        memory-mapped from the file (`oodbench.benchmark.entries`): pages the kernel can drop."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored_key, tensors, scalars, checksum = read_entry(path)
            if stored_key != key:
                raise ValueError("it holds another key's values")
            if entry_checksum(tensors, scalars) != checksum:
                raise ValueError("checksum mismatch")
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"{self.what} {path} is invalid ({reason}); {self.redo}", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        return tensors, scalars

    def write(self, key: str, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        path = self.path(key)
        with atomic_temporary(path) as temporary:
            write_entry(temporary, path, key, {k: v.detach().cpu() for k, v in tensors.items()}, scalars)


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
        return _outputs(tensors, scalars.get("meta"))

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
    """torch.save to a temporary file, fsync, then rename into place (`atomic_temporary`)."""
    with atomic_temporary(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


@contextmanager
def atomic_temporary(path: Path, remedy: str = "free space on that disk or point --cache-dir (OODBENCH_CACHE) "
                                               "at another one, then rerun to resume"):
    """A temporary file beside `path` (named by host and process) for the body to write and
    rename into place; removed whatever happens. A full disk ends in `NoSpaceLeft` naming
    `path`, leaving no partial file and any entry at `path` as it was."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        yield temporary
    except (OSError, RuntimeError) as exc:
        if not out_of_space(exc, path.parent):
            raise
        raise NoSpaceLeft.writing(path, remedy) from None
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


def lock_exclusive(handle) -> None:
    """Wait for the exclusive lock of an open file (released when it is closed). On a
    filesystem without locks, go on unlocked: concurrent writers then compute the same values."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        pass


def shard_seconds() -> float:
    """How much extraction work a kill may lose: OODBENCH_SHARD_SECONDS, default 30."""
    value = os.environ.get("OODBENCH_SHARD_SECONDS", "30")
    try:
        return max(float(value), 0.0)
    except ValueError:
        return 30.0


PER_MODEL = ("fc_weight", "fc_bias")  # an output entry's tensors that are not one row per image


@torch.no_grad()
def extract(model, dataset: Dataset, batch_size: int = 256, num_workers: int = 0, device: str = "cpu",
            desc: str = "extract", cache: OutputCache | None = None, key: str | None = None) -> Outputs:
    """One forward pass over `dataset`: logits, penultimate features, labels and (W, b).

    Images are decoded batch by batch (by `num_workers` DataLoader processes, into pinned
    memory for a CUDA device), so memory holds a few batches of images, never the split.

    With `cache` and `key`, each batch's outputs go straight to their rows of the entry's
    file, reserved at its final size after the first batch (`oodbench.benchmark.entries`),
    and the entry comes back memory-mapped: memory does not grow with the split, and the
    disk holds the entry once. Every `shard_seconds()` (at batch boundaries) the rows so far
    are synced and a journal beside the file records them with their checksum: a killed
    extraction resumes after its last verified shard, and the entry equals an uninterrupted
    extraction bit for bit (the batches are the same). A full disk raises `NoSpaceLeft` and
    leaves neither a partial file nor a journal. Without a cache the outputs are gathered
    in memory.
    """
    if cache is None or key is None:
        chunks = [batch for _, batch in _batches(model, dataset, batch_size, num_workers, device, desc)]
        merged = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        weight, bias = model.fc
        return _outputs({**merged, "fc_weight": weight.float().cpu(), "fc_bias": bias.float().cpu()})
    path = cache.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.journal"), "a+") as journal:
        lock_exclusive(journal)  # one writer per entry; a second waits, then reads its result
        entry = cache.load(key)
        if entry is not None:
            return entry
        try:
            _extract_into(model, dataset, batch_size, num_workers, device, desc, key, path, journal)
        except (OSError, RuntimeError) as exc:
            if not out_of_space(exc, path.parent):
                raise
            _partial(path).unlink(missing_ok=True)
            journal.truncate(0)
            raise NoSpaceLeft.writing(path, "free space on that disk or point --cache-dir (OODBENCH_CACHE) at "
                                            "another one, then rerun") from None
        finally:
            if path.exists() or not _partial(path).exists():
                Path(journal.name).unlink(missing_ok=True)
    _, tensors, scalars, _ = read_entry(path)  # checksummed as it was finished: not hashed again
    return _outputs(tensors, scalars.get("meta"))


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _extract_into(model, dataset, batch_size, num_workers, device, desc, key, path, journal) -> None:
    """The body of a cached `extract`: fill the partial file, journal its shards, rename it to `path`."""
    rows, scalars = len(dataset), {"meta": {}}
    header = {"key": key, "batch_size": batch_size, "rows": rows}
    layout, done = _resume(journal, _partial(path), header)
    entry = None if layout is None else EntryFile(_partial(path), layout, key, scalars, fresh=False)
    weight, bias = model.fc
    fc = {"fc_weight": weight.float().cpu(), "fc_bias": bias.float().cpu()}
    last_flush, interval, start = time.monotonic(), shard_seconds(), done
    for first, batch in _batches(model, dataset, batch_size, num_workers, device, desc, done):
        if entry is None:  # the first batch gives each tensor's row shape
            specs = {name: (value.dtype, (rows, *value.shape[1:])) for name, value in batch.items()}
            specs.update({name: (value.dtype, tuple(value.shape)) for name, value in fc.items()})
            layout = EntryLayout.of(specs)
            entry = EntryFile(_partial(path), layout, key, scalars)
            _journal_write(journal, [{**header, "layout": layout.table}], truncate=True)
        for name, value in batch.items():
            entry.write_rows(name, first, value)
        done = first + len(batch["labels"])
        if time.monotonic() - last_flush >= interval:
            entry.sync()
            checksum = _rows_checksum(_partial(path), layout, start, done)
            _journal_write(journal, [{"start": start, "end": done, "checksum": checksum}])
            start, last_flush = done, time.monotonic()
    if entry is None:
        raise OodbenchError(f"cannot extract {desc}: the split has no images")
    for name, value in fc.items():
        entry.write_rows(name, 0, value)
    entry.finish(path)


def _batches(model, dataset, batch_size, num_workers, device, desc, skip: int = 0):
    """(first row, {features, logits, labels, extra:*} on the CPU) per batch, from row `skip`."""
    rest = dataset if skip == 0 else Subset(dataset, range(skip, len(dataset)))
    cuda = torch.device(device).type == "cuda"  # pinned batches copy to the GPU while the next ones decode
    loader = DataLoader(rest, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda)
    row = skip
    for images, targets in tqdm(_decoded(loader), total=len(loader), desc=desc, leave=False, unit="batch",
                                mininterval=1.0, disable=len(loader) < 20):
        images = images.to(device, non_blocking=cuda)
        if hasattr(model, "forward_with_extras"):
            feats, logit, extras = model.forward_with_extras(images)
        else:
            (feats, logit), extras = model.features(images), {}
        batch = {"features": feats.float().cpu(), "logits": logit.float().cpu(),
                 "labels": torch.as_tensor(targets).long(),
                 **{EXTRA + name: _stored(value) for name, value in extras.items()}}
        yield row, batch
        row += len(batch["labels"])


def _rows_checksum(partial: Path, layout: EntryLayout, start: int, end: int) -> str:
    """The checksum of rows [start, end) of a partial file's per-image tensors (a shard)."""
    views = layout.views(map_file(partial))
    return tensors_checksum({name: view[start:end] for name, view in views.items() if name not in PER_MODEL})


def _journal_write(journal, records: list[dict], truncate: bool = False) -> None:
    if truncate:
        journal.seek(0)
        journal.truncate()
    journal.write("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
    journal.flush()
    os.fsync(journal.fileno())


def _resume(journal, partial: Path, header: dict) -> tuple[EntryLayout | None, int]:
    """The layout of a killed extraction of the same key and batching and the rows its verified
    shards hold; (None, 0) to start afresh. The journal keeps only the verified shards."""
    journal.seek(0)
    lines = journal.read().splitlines()
    try:
        first = json.loads(lines[0])
        layout = EntryLayout({name: (dtype, tuple(shape), offset) for name, (dtype, shape, offset)
                              in first.pop("layout").items()})
        size = layout.size(header["key"], {"meta": {}})
        if first != header or not partial.exists() or partial.stat().st_size != size:
            return None, 0
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):
        return None, 0
    done, kept = 0, [lines[0]]
    for line in lines[1:]:
        try:
            record = json.loads(line)
            if record["start"] != done or _rows_checksum(partial, layout, done, record["end"]) != record["checksum"]:
                break
        except (KeyError, TypeError, ValueError):
            break
        done, kept = record["end"], [*kept, line]
    _journal_write(journal, [json.loads(line) for line in kept], truncate=True)
    return layout, done


def _outputs(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Outputs:
    return Outputs(logits=tensors["logits"], features=tensors["features"], labels=tensors["labels"],
                   fc=(tensors["fc_weight"], tensors["fc_bias"]), meta=dict(meta or {}),
                   extras={name[len(EXTRA):]: value for name, value in tensors.items() if name.startswith(EXTRA)})


def _decoded(loader: DataLoader) -> Iterator:
    """The loader's batches. An error a worker process raised (an image that cannot be decoded)
    comes back from torch with the worker's whole traceback in its message; it is raised here
    with its own one line again (``--debug`` shows the traceback)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except OodbenchError as exc:
            if debugging():
                raise
            raise type(exc)(worker_message(str(exc))) from None
        yield batch


def _stored(extra: torch.Tensor) -> torch.Tensor:
    """An extra as cached: on the CPU, floating point as float32 (like the logits)."""
    return extra.float().cpu() if extra.is_floating_point() else extra.cpu()
