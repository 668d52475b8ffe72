"""The results store: one SQLite database, one row per (benchmark, model, postprocessor,
setting, fingerprint, dataset, metric), with the provenance of its cell.

A *cell* is one (benchmark, model, postprocessor, setting) scored against every OOD set,
identified by its *fingerprint* (`oodbench.identity.cell_fingerprint`: the model's
weights, the method's code and settings, the fingerprints of the data splits it read).
Setting is ``search``, ``default`` or the JSON of explicit hyperparameters. A run skips
the cells whose fingerprint is stored as done; a cell computed from other data or weights
is a new row, and the old one stays (nothing is lost). Each row also carries the run's
*data fingerprint* (the benchmark's definition and all its splits as found), which
`leaderboard --fingerprint` selects by. A cell and all its metric rows are written in one
short transaction, so a cell is either fully there or absent, with the per-image test scores it
was computed from (table ``scores``, keyed by the cell fingerprint, float64 with a checksum that
`read_scores` verifies), from which `leaderboard --ci` draws bootstrap intervals. WAL mode and a busy
timeout let several processes write one store at once.

`oodbench attack` writes table ``attacks`` (`write_attack`): clean and attacked metrics per
(benchmark, model, checkpoint, postprocessor, setting, threat-model fingerprint, eps, dataset,
metric), one transaction per (model, method, eps) as each finishes, so a killed attack run
keeps what it wrote and a rerun replaces the same keys. Clean cells (``cells``/``results``)
are never touched by it; `leaderboard --attack` reads it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from oodbench.errors import NoSpaceLeft, OodbenchError, disk_full
from oodbench.storage.schema import (ATTACK_COLUMNS, ATTACKS_TABLE, CELL_COLUMNS, MIGRATE_V1, SCHEMA, SCHEMA_VERSION,
                                     SCORES_TABLE, TABLES)

# a present split's ``reason`` in the datasets table when it was read from a fallback source (not
# the benchmark's first candidate, e.g. OpenOOD's image list): what follows names the source read
FALLBACK = "fallback: "


def packed_scores(scores: np.ndarray) -> tuple[int, str, bytes]:
    """(count, sha256, bytes) of a score array as stored: float64, little-endian."""
    data = np.ascontiguousarray(scores, dtype="<f8").tobytes()
    return len(data) // 8, hashlib.sha256(data).hexdigest(), data


@dataclass
class Cell:
    benchmark: str
    model: str
    postprocessor: str
    setting: str
    fingerprint: str = ""
    data_fingerprint: str = ""
    status: str = "done"
    reason: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    search_limit: int | None = None  # validation images per side of an input-gradient search
    seconds: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> metric -> value
    groups: dict[str, str] = field(default_factory=dict)  # dataset -> near | far | id
    checkpoint: str = ""  # which checkpoint of a model entry listing several ('' otherwise)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # id_test and each OOD set -> test scores
    preprocessing: str = ""  # the test transform in words, and whose it is (the benchmark's or the model's)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.benchmark, self.model, self.postprocessor, self.setting, self.fingerprint)


def busy_timeout() -> float:
    """Seconds to wait for another process's lock on the store: OODBENCH_DB_TIMEOUT, default 60."""
    value = os.environ.get("OODBENCH_DB_TIMEOUT", "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise OodbenchError(f"OODBENCH_DB_TIMEOUT must be a number of seconds >= 0, got {value!r}")
    return seconds


class ResultStore:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path).expanduser()
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise OodbenchError(f"results store not found: {self.path} (run `oodbench run CONFIG` first)")
        timeout = busy_timeout()
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            uri = f"file:{self.path}?{self._read_only_options()}" if readonly else f"file:{self.path}"
            self.connection = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
            self.connection.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if not readonly:
                self.connection.execute("PRAGMA journal_mode = WAL")
                self._create_or_migrate()
                # Take (and drop) the write lock now, so a store another process keeps
                # locked fails here rather than after hours of extraction.
                self.connection.execute("BEGIN IMMEDIATE")
                self.connection.execute("ROLLBACK")
            self.connection.execute("SELECT count(*) FROM cells").fetchone()
        except (sqlite3.Error, OSError) as exc:
            if self._out_of_space(exc):
                raise NoSpaceLeft.writing(self.path, self.NO_SPACE_REMEDY) from None
            hint = (f" (another process holds its lock; waited {timeout:g} s, set OODBENCH_DB_TIMEOUT to wait longer)"
                    if "locked" in str(exc) else "")
            if not readonly and not all(os.access(p, os.W_OK) for p in (self.path, self.path.parent) if p.exists()):
                hint = (" (the store or its folder is read-only: copy it to a folder you can write, or write to "
                        "another store with --results)")
            if readonly and "unable to open" in str(exc) and not os.access(self.path.parent, os.W_OK):
                hint = (f" (its folder is read-only and {self.path}-wal holds writes not yet merged into it: "
                        "copy the store with its -wal file to a folder that can be written)")
            raise OodbenchError(f"cannot open results store {self.path}: {exc}{hint}") from None
        if readonly and "fingerprint" not in {row[1] for row in self.connection.execute("PRAGMA table_info(cells)")}:
            raise OodbenchError(f"results store {self.path} was written by an older oodbench (no fingerprints); "
                                "any `oodbench run` into it upgrades it in place, keeping its rows")

    NO_SPACE_REMEDY = "free space on that disk or write to another store (--results), then rerun to resume"

    def _read_only_options(self) -> str:
        """URI options to read the store. A WAL database needs its -shm file even to be read, and
        a read-only folder cannot hold one, so there the file is opened immutable; unless a -wal
        file holds writes not yet merged into it, which an immutable reader would not see."""
        wal = Path(f"{self.path}-wal")
        pending = wal.exists() and wal.stat().st_size > 0
        return "mode=ro" if pending or os.access(self.path.parent, os.W_OK) else "mode=ro&immutable=1"

    def _out_of_space(self, exc: BaseException) -> bool:
        """SQLITE_FULL, ENOSPC, or an I/O error on a disk with nothing left (SQLite's messages
        are matched: the sqlite3 module has their codes only from Python 3.11)."""
        if "database or disk is full" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
            return True
        return "disk I/O error" in str(exc) and disk_full(self.path.parent)

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole, or rolled back (an error, Ctrl-C, SIGTERM) and
        the store left as it was before it."""
        try:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield self.connection
            except BaseException:
                if self.connection.in_transaction:  # SQLite may have rolled back on its own (a full disk)
                    self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.connection.in_transaction:  # a failed COMMIT can leave the transaction open
                self.connection.execute("ROLLBACK")
            if self._out_of_space(exc):
                raise NoSpaceLeft.writing(self.path, self.NO_SPACE_REMEDY) from None
            raise OodbenchError(f"cannot write results store {self.path}: {exc}") from None

    def _create_or_migrate(self) -> None:
        """Create the tables of a new store, or move a store of the first schema to this one;
        a store already current is not written to."""
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(cells)")}
        if "fingerprint" in columns:
            self._upgrade_v2(columns)
            return
        script = MIGRATE_V1.format(schema=SCHEMA) if columns else SCHEMA
        self.connection.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def _upgrade_v2(self, columns: set[str]) -> None:
        """Give a store of schema 2, 3 or 4 what schemas 3, 4 and 5 added, keeping every row."""
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        steps = [f"ALTER TABLE cells ADD COLUMN {column} TEXT NOT NULL DEFAULT '';"
                 for column in ("checkpoint", "preprocessing") if column not in columns]
        steps += [] if "scores" in tables else [SCORES_TABLE]
        steps += [] if "attacks" in tables else [ATTACKS_TABLE]
        if steps:
            self.connection.executescript(f"BEGIN IMMEDIATE;\n{''.join(steps)}\n"
                                          f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def done_fingerprints(self, benchmark: str) -> set[str]:
        """Fingerprints of the cells of `benchmark` computed successfully."""
        rows = self.connection.execute("SELECT fingerprint FROM cells WHERE benchmark = ? AND status = 'done'",
                                       (benchmark,))
        return {row[0] for row in rows}

    def last_split_fingerprints(self, benchmark: str) -> dict[str, tuple[str, int | None, int | None]]:
        """Split name -> (fingerprint, samples, images available before a --limit) as the last
        run of `benchmark` found it."""
        rows = self.connection.execute(
            "SELECT ood_group, dataset, fingerprint, samples, available FROM datasets WHERE benchmark = ? AND "
            "fingerprint IS NOT NULL ORDER BY created", (benchmark,))
        return {(dataset if group in ("id", "ood_val") else f"{group}:{dataset}"): (fingerprint, samples, available)
                for group, dataset, fingerprint, samples, available in rows}

    def write_cell(self, cell: Cell) -> None:
        """The cell and all its metric rows, atomically, replacing an earlier try of the same fingerprint."""
        p = cell.provenance
        with self._transaction() as db:
            db.execute("DELETE FROM results WHERE benchmark=? AND model=? AND postprocessor=? AND setting=? "
                       "AND fingerprint=?", cell.key)
            db.execute(
                f"INSERT OR REPLACE INTO cells ({', '.join(CELL_COLUMNS)}) "
                f"VALUES ({','.join('?' * len(CELL_COLUMNS))})",
                (*cell.key, cell.data_fingerprint, cell.status, cell.reason, json.dumps(cell.params, sort_keys=True),
                 json.dumps(cell.tags), str(p.get("benchmark_version")), p.get("oodbench_version"),
                 p.get("git_hash"), p.get("config_hash"), p.get("weights_hash"), p.get("fpr_convention"),
                 cell.search_limit, cell.seconds, time.time(), cell.checkpoint, cell.preprocessing),
            )
            if cell.status == "done":  # the same fingerprint always has the same scores
                db.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?)",
                               [(cell.fingerprint, dataset, *packed_scores(values))
                                for dataset, values in cell.scores.items()])
            db.executemany(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                [(*cell.key, dataset, cell.groups.get(dataset, "far"), metric, value)
                 for dataset, metrics in cell.metrics.items() for metric, value in metrics.items()],
            )

    def write_attack(self, rows: list[dict[str, Any]]) -> None:
        """Rows of `ATTACK_COLUMNS` (``created`` is set here) in one transaction, replacing the
        same keys of an earlier run of the same threat model."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(f"INSERT OR REPLACE INTO attacks ({', '.join(ATTACK_COLUMNS)}) "
                           f"VALUES ({','.join('?' * len(ATTACK_COLUMNS))})",
                           [tuple(now if c == "created" else row[c] for c in ATTACK_COLUMNS) for row in rows])

    def write_datasets(self, benchmark: str, model: str, rows: list[dict[str, Any]], data_fingerprint: str = "") -> None:
        """Presence, fingerprint, size (and accuracy for ID) of every split a run read, per model.
        ``created`` is the time of the last run that read the data (`mark_read`)."""
        now = time.time()
        values = ("ood_group", "fingerprint", "status", "reason", "samples", "available", "accuracy", "created")
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO datasets VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (benchmark, model, data_fingerprint, dataset) DO UPDATE SET "
                + ", ".join(f"{v} = excluded.{v}" for v in values),
                [(benchmark, model, data_fingerprint, r["dataset"], r["group"], r.get("fingerprint"), r["status"],
                  r.get("reason"), r.get("samples"), r.get("available", r.get("samples")), r.get("accuracy"), now)
                 for r in rows],
            )

    def mark_read(self, benchmark: str, model: str, data_fingerprint: str) -> None:
        """A run read this data again and found every cell stored: its dataset rows get the run's
        time, so the latest run is the one whose rows are newest (`last_split_fingerprints`, the
        leaderboard's choice), also after data v1 -> v2 -> v1."""
        with self._transaction() as db:
            db.execute("UPDATE datasets SET created = ? WHERE benchmark = ? AND model = ? AND data_fingerprint = ?",
                       (time.time(), benchmark, model, data_fingerprint))

    def frame(self, table: str, **where: Any):
        """A pandas DataFrame of one table, filtered by equality on columns."""
        import pandas as pd

        if table not in TABLES:
            raise ValueError(table)
        clauses, values = [], []
        for column, value in where.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple, set)):
                clauses.append(f"{column} IN ({','.join('?' * len(value))})")
                values.extend(value)
            else:
                clauses.append(f"{column} = ?")
                values.append(value)
        if table == "attacks" and not self.connection.execute(  # a store older than schema 5, read-only
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'attacks'").fetchone():
            return pd.DataFrame(columns=list(ATTACK_COLUMNS))
        query = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY rowid"
        try:
            frame = pd.read_sql_query(query, self.connection, params=values)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise OodbenchError(f"cannot read results store {self.path}: {exc}") from None
        for column in ("checkpoint", "preprocessing"):  # a store of an older schema opened read-only
            if table == "cells" and column not in frame.columns:
                frame[column] = ""
        return frame

    def read_scores(self, fingerprints: Iterable[str]) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
        """The stored test scores of these cells: fingerprint -> dataset -> scores, each verified
        against its checksum and count; and one line per entry that failed (left out)."""
        wanted = sorted(set(fingerprints))
        if not wanted or not self.connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'scores'").fetchone():
            return {}, []
        found: dict[str, dict[str, np.ndarray]] = {}
        damaged = []
        for start in range(0, len(wanted), 500):  # SQLite's limit on bound parameters
            chunk = wanted[start:start + 500]
            try:
                rows = self.connection.execute(
                    f"SELECT fingerprint, dataset, count, sha256, data FROM scores WHERE fingerprint IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
            except sqlite3.Error as exc:
                raise OodbenchError(f"cannot read results store {self.path}: {exc}") from None
            for fingerprint, dataset, count, checksum, data in rows:
                if len(data) != 8 * count or hashlib.sha256(data).hexdigest() != checksum:
                    damaged.append(f"the stored scores of cell {fingerprint} on {dataset} in {self.path} fail their "
                                   "checksum (damaged); left out of the intervals")
                    continue
                found.setdefault(fingerprint, {})[dataset] = np.frombuffer(data, dtype="<f8").astype(np.float64)
        return found, damaged
