"""Verified files: the storage primitive every cache and checkpoint copy is built on.

A `VerifiedFiles` entry holds its full key text, tensors, JSON scalars and a checksum of
both (`oodbench.storage.entries`); the reader checks key and checksum, so a damaged file,
or a valid file copied over another key's path, is removed with one warning line naming
it and recomputed by its caller. Writes go to a temporary file beside the target
(`atomic_temporary`) and are renamed into place; a full disk ends in one `NoSpaceLeft` line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from oodbench.errors import NoSpaceLeft, disk_full
from oodbench.identity import key_of
from oodbench.storage.entries import entry_checksum, read_entry, write_entry


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
        memory-mapped from the file (`oodbench.storage.entries`): pages the kernel can drop.

        The checksum is computed once per file state in a process: a file whose (device,
        inode, size, mtime, ctime) are those it had when its checksum last matched here is
        not hashed again (a search reads the same entries for every job; at ImageNet-1K
        scale each hash streams gigabytes). Any write, replacement or touch of the file
        changes that state, and the key is compared on every read."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            before = file_state(path)
            stored_key, tensors, scalars, checksum = read_entry(path)
            if stored_key != key:
                raise ValueError("it holds another key's values")
            now = file_state(path)  # the same before and after mapping: the mapped file is the one stated
            if not (before == now == _VERIFIED.get(str(path))):
                if entry_checksum(tensors, scalars) != checksum:
                    raise ValueError("checksum mismatch")
                if before == now:
                    _VERIFIED[str(path)] = now
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


# path -> the file's state when its checksum last matched in this process
_VERIFIED: dict[str, tuple[int, ...]] = {}


def file_state(path: Path) -> tuple[int, ...]:
    """(device, inode, size, mtime ns, ctime ns): what any change to the file changes (ctime
    too when mtime is set back by hand)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


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


def lock_exclusive(handle) -> None:
    """Wait for the exclusive lock of an open file (released when it is closed). On a
    filesystem without locks, go on unlocked: concurrent writers then compute the same values."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        pass
