"""The one exception type a user can cause. The CLI prints its message and exits 2."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Iterable


class OodbenchError(Exception):
    """A problem with the user's input (names, configs, files), reported in one line."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the close matches of `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class DatasetMissing(OodbenchError):
    """A dataset's files are not under the data root; the message says where to get them."""


class MissingExtras(DatasetMissing):
    """A postprocessor needs auxiliary model outputs (``needs_extras``) that these outputs do
    not carry; like a missing dataset, its cell is marked missing with this line."""


class NoSpaceLeft(OodbenchError):
    """A write failed because the disk is full. The message names the file; what was written
    before (earlier cache entries, committed cells) is intact, so a rerun resumes."""

    @classmethod
    def writing(cls, path: str | Path, remedy: str) -> "NoSpaceLeft":
        return cls(f"no space left on device: cannot write {path}; {remedy}")


FULL_DISK_BYTES = 1 << 20


def disk_full(folder: str | Path) -> bool:
    """Whether the disk under `folder` (or its nearest existing parent) has less than 1 MiB free:
    what decides for writers that report a full disk without ENOSPC (torch.save, SQLite I/O errors)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free < FULL_DISK_BYTES
