"""The files under a data root, for fingerprints (`oodbench.identity` builds the keys).

A file is named by its path relative to the data root and by its content hash when this
cache has hashed it at its current (size, mtime, inode), else by its size and mtime; a
seeded sample of every set is content-hashed by every run (`FileState.describe`). Content
hashes are remembered in ``<cache_dir>/state/hashes.sqlite``, as DVC's state cache does,
so re-hashing an unchanged file is a lookup.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from oodbench.identity import array_digest


SAMPLE_FILES = 1000  # files of a set content-hashed by every run (see FileState.describe)


WHOLE_SET_BYTES = 32 << 20  # a set of at most this many bytes is content-hashed whole


class FileState:
    """What the files under a data root are, for fingerprints.

    A file is named by its path relative to the data root and by its content hash when this
    cache has hashed it at its current (size, mtime, inode), else by its size and mtime.
    Single-file formats (`content`) and every file with ``verify`` (``--verify-data``) are
    hashed; hashes are remembered in ``<state_dir>/hashes.sqlite``, as DVC's state cache
    does, so an unchanged file is never read twice, and a plain run after a verified one
    names the files exactly as the verified run did. ``verify`` re-reads every file, so a
    change that kept size and mtime is found.

    Size and mtime alone collide (two copies unpacked from reproducible archives, equal
    sizes): every set's name also holds the contents of a seeded sample of its files, all of
    them when the set is small (`describe`). Those hashes are remembered in the same state
    file, apart (table ``sampled``), so that a sampled file does not change how the files are
    named on the next run.
    """

    def __init__(self, data_root: str | Path, state_dir: str | Path | None = None, verify: bool = False):
        self.data_root = Path(data_root).expanduser().resolve()
        self.verify = verify
        self.state_path = Path(state_dir) / "hashes.sqlite" if state_dir is not None else None
        self._db: sqlite3.Connection | None = None
        self._known: dict[str, dict[str, tuple]] = {}  # table -> path -> (size, mtime, inode, sha256)
        self._pending: dict[str, list[tuple]] = {"hashes": [], "sampled": []}
        self._once: dict[tuple[int, str], tuple[Any, str]] = {}  # (id(owner), what) -> (owner, value)

    def _relative(self, absolute: str) -> str:
        """An absolute path relative to the data root, '/'-separated (string operations, not
        pathlib: it runs once per image file)."""
        root = os.path.join(str(self.data_root), "")
        relative = absolute[len(root):] if absolute.startswith(root) else absolute
        return relative.replace(os.sep, "/")

    def _locate(self, paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
        """(``os.path.abspath(path)``, `_relative` of it) for each path, with the work done once
        per folder rather than once per file. The same strings: a path is its folder ``head``
        (up to its last separator) and a name ``tail``, and when the name is not '', '.' or '..'
        normalising leaves it as it is, so ``abspath(path) == join(abspath(head), "") + tail``;
        the name holds no separator while the data root's prefix ends with one, so the path
        starts with that prefix exactly when its folder's part does."""
        folders: dict[str, tuple[str, str]] = {}
        for path in paths:
            head, tail = folder_and_name(path)
            if tail in ("", ".", ".."):
                absolute = os.path.abspath(path)
                yield absolute, self._relative(absolute)
                continue
            folder = folders.get(head)
            if folder is None:
                prefix = os.path.join(os.path.abspath(head), "")
                folder = folders[head] = (prefix, self._relative(prefix))
            yield folder[0] + tail, folder[1] + tail

    def describe(self, paths: Sequence[str | Path]) -> str:
        """A digest naming each file by relative path and content hash (or size and mtime), and
        the contents of a sample of the files: all of them when they number at most
        `SAMPLE_FILES` or total at most `WHOLE_SET_BYTES`, else a seeded `SAMPLE_FILES` of them.
        The sample costs one read of those files per data root, remembered by (path, size,
        mtime, inode) like every hash (README, "What a cached number is tied to")."""
        hasher = hashlib.sha256()
        states: list[tuple] | None = []  # kept while the set may still be hashed whole (memory: a sample only)
        total = 0
        lines = []  # hashed as one string: the same bytes as one update per file
        for path, (absolute, relative) in zip(paths, self._locate(paths)):
            stat = os.stat(absolute)
            state = (absolute, stat.st_size, stat.st_mtime_ns, stat.st_ino)
            total += stat.st_size
            if states is not None:
                states.append(state)
                if len(states) > SAMPLE_FILES and total > WHOLE_SET_BYTES:
                    states = None
            content = self.file_hash(path, state) if self.verify else self._lookup(state)
            what = content or f"{stat.st_size}\0{stat.st_mtime_ns}"
            lines.append(f"{relative}\0{what}\n")
        hasher.update("".join(lines).encode())
        if states is None:
            chosen = np.sort(np.random.default_rng(0).choice(len(paths), SAMPLE_FILES, replace=False))
            states = [self._state(paths[index]) for index in chosen]
        else:
            chosen = np.arange(len(states))
        sample = hashlib.sha256(b"sample")
        for index, state in zip(chosen.tolist(), states):
            sample.update(f"{index}\0{self._sampled_hash(state)}\n".encode())
        hasher.update(sample.hexdigest().encode())
        return "files:" + hasher.hexdigest()[:32]

    @staticmethod
    def _state(path: Path | str) -> tuple:
        absolute = os.path.abspath(path)
        stat = os.stat(absolute)
        return absolute, stat.st_size, stat.st_mtime_ns, stat.st_ino

    def _sampled_hash(self, state: tuple) -> str:
        """A sampled file's content hash: as remembered for naming, or for sampling, or read now."""
        known = self._lookup(state) or self._lookup(state, "sampled")
        if known is None:
            known = _sha256_of(state[0])
            self._remember(state, known, "sampled")
        return known

    def names(self, paths: Iterable[str | Path]) -> str:
        """A digest of the files' relative paths alone (no file is read or stat'ed)."""
        text = "".join([f"{relative}\n" for _, relative in self._locate(paths)])
        return "names:" + hashlib.sha256(text.encode()).hexdigest()[:32]

    def content(self, paths: Sequence[str | Path]) -> str:
        """A digest of the files' relative paths and contents (always hashed)."""
        hasher = hashlib.sha256()
        for path, (_, relative) in zip(paths, self._locate(paths)):
            hasher.update(f"{relative}\0{self.file_hash(path)}\n".encode())
        return "content:" + hasher.hexdigest()[:32]

    def once(self, owner: Any, what: str, make: Callable[[], str]) -> str:
        """`make()`, computed once per `owner` object and `what` for these files (a source
        listed once per run is named once, however many of its parts the run reads)."""
        known = self._once.get((id(owner), what))
        if known is not None and known[0] is owner:
            return known[1]
        value = make()
        self._once[(id(owner), what)] = (owner, value)
        return value

    def file_hash(self, path: str | Path, state: tuple | None = None) -> str:
        """sha256 of a file; remembered, and read again only when its stat changed or with ``verify``."""
        state = self._state(path) if state is None else state
        known = None if self.verify else self._lookup(state)
        if known is not None:
            return known
        value = _sha256_of(path)
        self._remember(state, value)
        return value

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is None and self.state_path is not None:
            try:
                self.state_path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.state_path, timeout=30, isolation_level=None)
                for table in self._pending:
                    self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (path TEXT PRIMARY KEY, size INTEGER, "
                                     "mtime_ns INTEGER, inode INTEGER, sha256 TEXT)")
            except (sqlite3.Error, OSError):
                self.state_path = None  # a read-only cache: hash every time instead
                self._db = None
        return self._db

    def _lookup(self, state: tuple, table: str = "hashes") -> str | None:
        if table not in self._known:
            db = self._connection()
            try:
                rows = db.execute(f"SELECT path, size, mtime_ns, inode, sha256 FROM {table}") if db else []
                self._known[table] = {row[0]: tuple(row[1:]) for row in rows}
            except sqlite3.Error:
                self._known[table] = {}
        row = self._known[table].get(state[0])
        return row[3] if row is not None and tuple(row[:3]) == state[1:] else None

    def _remember(self, state: tuple, value: str, table: str = "hashes") -> None:
        if table in self._known:
            self._known[table][state[0]] = (*state[1:], value)
        self._pending[table].append((*state, value))

    def flush(self) -> None:
        """Write the hashes learnt so far, in one transaction (one fsync, not one per file)."""
        db = self._connection()
        if db is not None and any(self._pending.values()):
            try:
                with db:
                    db.execute("BEGIN")
                    for table, rows in self._pending.items():
                        db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?,?,?,?,?)", rows)
            except sqlite3.Error:
                pass  # the state cache only saves time; a write that fails costs a re-hash later
        self._pending = {table: [] for table in self._pending}

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None


def folder_and_name(path: str | Path) -> tuple[str, str]:
    """``os.path.split(path)``, but the folder keeps its trailing separators (the same folder;
    on POSIX a string search instead of a function call per file: it runs once per image)."""
    path = os.fspath(path)
    if os.altsep is not None:  # Windows: two separators and drives
        return os.path.split(path)
    cut = path.rfind(os.sep) + 1
    return path[:cut], path[cut:]


def _sha256_of(path: str | Path) -> str:
    """sha256 of a file's bytes, read through its descriptor: a file object per image file
    cost a quarter of the hashing. Errors are those of ``open(path, "rb")``, naming the file."""
    hasher = hashlib.sha256()
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        while block := os.read(handle, 1 << 20):
            hasher.update(block)
    except OSError as exc:  # a folder opens, then fails to read without a name
        raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from None
    finally:
        os.close(handle)
    return hasher.hexdigest()


def dataset_fingerprint(dataset: Any, files: FileState) -> str:
    """The fingerprint of what `dataset` reads: its ``fingerprint(files)`` when it has one,
    else (a source of a plugin that does not say) a hash of every decoded item. Computed once
    per dataset object and `files` (the parts of one listed source share it)."""
    return files.once(dataset, "fingerprint", lambda: _dataset_fingerprint(dataset, files))


def _dataset_fingerprint(dataset: Any, files: FileState) -> str:
    method = getattr(dataset, "fingerprint", None)
    if callable(method):
        return method(files)
    hasher = hashlib.sha256(type(dataset).__qualname__.encode())
    for index in range(len(dataset)):
        image, label = dataset[index]
        hasher.update(array_digest(torch.as_tensor(np.asarray(image))).encode() + f":{label}".encode())
    return "items:" + hasher.hexdigest()[:32]
