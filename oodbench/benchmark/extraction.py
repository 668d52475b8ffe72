"""Extraction: one forward pass over a split, written into its output cache entry as it goes.

Images are decoded batch by batch; each batch's outputs go straight to their rows of the
entry's file (`oodbench.storage.entries`), a journal records verified shards so a killed
extraction resumes, and the finished entry is renamed into place (`oodbench.storage.caches`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from oodbench.errors import NoSpaceLeft, OodbenchError, debugging, worker_message
from oodbench.identity import tensors_checksum
from oodbench.outputs import Outputs
from oodbench.storage.caches import EXTRA, OutputCache, outputs_of
from oodbench.storage.entries import EntryFile, EntryLayout, map_file, read_entry
from oodbench.storage.files import lock_exclusive, out_of_space


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
    file, reserved at its final size after the first batch (`oodbench.storage.entries`),
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
        return outputs_of({**merged, "fc_weight": weight.float().cpu(), "fc_bias": bias.float().cpu()})
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
    return outputs_of(tensors, scalars.get("meta"))


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
