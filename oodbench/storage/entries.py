"""The file format of every cache entry: raw tensors read memory-mapped, written in place.

An entry file is ``MAGIC``, then each tensor's bytes (C order, each at a 64-byte aligned
offset), then a JSON header (the entry's full key, each tensor's dtype, shape and offset,
its JSON scalars and the checksum), then the header's length (8 bytes, little-endian) and
``MAGIC`` again. Its size is known before any value is (`EntryLayout`), so a writer
reserves the whole file up front (`posix_fallocate`: a full disk fails before any work,
not in the middle of it) and fills rows in place as they are computed; a reader maps the
file (copy-on-write: a method that writes into a tensor changes its own pages, never the
file) and hashes the tensors straight from the mapping, so reading a 15 GiB entry costs
page cache the kernel can drop, not resident memory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oodbench.identity import tensors_checksum

MAGIC = b"OODBENCH-ENTRY-1"
ALIGN = 64
CHECKSUM_CHARS = 128  # sha256 of the tensors and sha256 of the scalars, in hex


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


@dataclass
class EntryLayout:
    """Where each tensor of an entry lies: name -> (dtype name, shape, byte offset)."""

    table: dict[str, tuple[str, tuple[int, ...], int]]

    @classmethod
    def of(cls, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> "EntryLayout":
        """The layout of tensors of these (dtype, shape), in name order."""
        table, offset = {}, _aligned(len(MAGIC))
        for name in sorted(specs):
            dtype, shape = specs[name]
            table[name] = (str(dtype).removeprefix("torch."), tuple(int(s) for s in shape), offset)
            offset = _aligned(offset + _nbytes(dtype, shape))
        return cls(table)

    @property
    def data_end(self) -> int:
        if not self.table:
            return _aligned(len(MAGIC))
        return max(_aligned(offset + _nbytes(_dtype(dtype), shape)) for dtype, shape, offset in self.table.values())

    def header(self, key: str, scalars: dict[str, Any], checksum: str) -> bytes:
        table = {name: [dtype, list(shape), offset] for name, (dtype, shape, offset) in self.table.items()}
        return json.dumps({"key": key, "tensors": table, "scalars": scalars, "checksum": checksum},
                          sort_keys=True).encode()

    def size(self, key: str, scalars: dict[str, Any]) -> int:
        """The whole file's size in bytes (the checksum has a fixed length)."""
        return self.data_end + len(self.header(key, scalars, "0" * CHECKSUM_CHARS)) + 8 + len(MAGIC)

    def views(self, buffer) -> dict[str, torch.Tensor]:
        """The tensors inside `buffer` (a mapping of the file), sharing its memory."""
        out = {}
        for name, (dtype, shape, offset) in self.table.items():
            torch_dtype = _dtype(dtype)
            count = _numel(shape)
            flat = (torch.frombuffer(buffer, dtype=torch_dtype, count=count, offset=offset) if count
                    else torch.empty(0, dtype=torch_dtype))
            out[name] = flat.view(shape)
        return out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _nbytes(dtype: torch.dtype, shape) -> int:
    return _numel(shape) * torch.empty(0, dtype=dtype).element_size()


def entry_checksum(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> str:
    """What an entry stores and its reader compares: sha256 of the tensors (streamed over
    their buffers) and of the scalars' JSON."""
    return tensors_checksum(tensors) + hashlib.sha256(json.dumps(scalars, sort_keys=True).encode()).hexdigest()


def map_file(path: Path, writable: bool = False) -> mmap.mmap:
    """The whole file mapped: shared and writable (a writer filling it), or copy-on-write."""
    with open(path, "r+b" if writable else "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)


def read_entry(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], str]:
    """(key, tensors mapped from the file, scalars, stored checksum); ValueError when `path`
    is not a whole entry (truncated, another format, a damaged header)."""
    size = path.stat().st_size
    if size < 2 * len(MAGIC) + 8:
        raise ValueError("not an oodbench cache entry (too short)")
    buffer = map_file(path)
    trailer = buffer[size - 8 - len(MAGIC):]
    if buffer[:len(MAGIC)] != MAGIC or trailer[8:] != MAGIC:
        raise ValueError("not an oodbench cache entry (truncated or another format)")
    (length,) = struct.unpack("<Q", trailer[:8])
    start = size - 8 - len(MAGIC) - length
    try:
        header = json.loads(buffer[start:start + length])
        table = {name: (dtype, tuple(shape), int(offset)) for name, (dtype, shape, offset) in header["tensors"].items()}
        layout = EntryLayout(table)
        if layout.data_end > start:
            raise ValueError("its tensors overlap its header")
        return header["key"], layout.views(buffer), header["scalars"], header["checksum"]
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"its header is damaged ({type(exc).__name__})") from None


class EntryFile:
    """An entry being written in place at `path` (a partial file, renamed into place by `finish`).

    The file is reserved at its final size first, so a full disk fails before any work (on a
    filesystem without fallocate, in `write_rows`, as an OSError: writes go through `pwrite`,
    never a mapping, which would die of SIGBUS instead)."""

    def __init__(self, path: Path, layout: EntryLayout, key: str, scalars: dict[str, Any], fresh: bool = True):
        self.path, self.layout, self.key, self.scalars = path, layout, key, scalars
        path.parent.mkdir(parents=True, exist_ok=True)
        size = layout.size(key, scalars)
        if fresh or not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as handle:
                handle.write(MAGIC)
                reserve(handle.fileno(), size)
        self.fd = os.open(path, os.O_RDWR)

    def write_rows(self, name: str, start: int, values: torch.Tensor) -> None:
        """Rows ``start ...`` of tensor `name` (whole tensor: start 0)."""
        dtype, shape, offset = self.layout.table[name]
        row = _nbytes(_dtype(dtype), shape[1:]) if shape else 0
        data = memoryview(values.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        if start < 0 or start * row + len(data) > _nbytes(_dtype(dtype), shape) or values.dtype != _dtype(dtype):
            raise ValueError(f"rows {start}+{len(values)} of {name} do not fit its layout")
        position = offset + start * row
        while len(data):
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def sync(self) -> None:
        """The rows written so far reach the disk (before a journal says they did)."""
        os.fsync(self.fd)

    def finish(self, destination: Path) -> None:
        """Checksum what was written (read back through a mapping), write the header, fsync
        and rename to `destination`."""
        checksum = entry_checksum(self.layout.views(map_file(self.path)), self.scalars)
        header = self.layout.header(self.key, self.scalars, checksum)
        os.pwrite(self.fd, header + struct.pack("<Q", len(header)) + MAGIC, self.layout.data_end)
        os.fsync(self.fd)
        self.close()
        os.replace(self.path, destination)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reserve(fd: int, size: int) -> None:
    """Allocate `size` bytes of the file on disk now (filesystems without fallocate: extend it)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def write_entry(temporary: Path, path: Path, key: str, tensors: dict[str, torch.Tensor],
                scalars: dict[str, Any]) -> None:
    """Write whole tensors as one entry: into `temporary`, then renamed to `path`."""
    layout = EntryLayout.of({name: (value.dtype, tuple(value.shape)) for name, value in tensors.items()})
    entry = EntryFile(temporary, layout, key, scalars)
    try:
        for name, value in tensors.items():
            entry.write_rows(name, 0, value)
        entry.finish(path)
    finally:
        entry.close()
