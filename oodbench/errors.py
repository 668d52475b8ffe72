"""The one exception type a user can cause. The CLI prints its message and exits 2."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sysconfig
import traceback
from pathlib import Path
from typing import Iterable


class OodbenchError(Exception):
    """A problem with the user's input (names, configs, files), reported in one line."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the close matches of `name`, or '' when none is close; case
    does not count (``kNN`` finds ``knn``)."""
    choices = sorted(choices)
    by_lower = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    close = [by_lower[match] for match in close]
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


def require_file(path: Path, not_found: str, kind: str, error: type[OodbenchError] = OodbenchError) -> Path:
    """`path` if it is a file; else `error` in one line: `not_found` when nothing is there, or
    that it is a folder where a `kind` (e.g. "checkpoint file") was expected."""
    if path.is_dir():
        raise error(f"{path} is a folder, not a {kind}")
    if not path.is_file():
        raise error(not_found)
    return path


def require_folder(path: str | Path, kind: str, how: str) -> Path:
    """`path` unless something other than a folder is there: a file given as the `kind` folder
    (e.g. "data root") is named as the cause, with `how` it is set."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OodbenchError(f"{kind} {path} is a file, not a folder ({how})")
    return path


def writable_folder(path: str | Path, kind: str, how: str) -> Path:
    """`path` made if needed, or one line saying why it cannot be written (read-only, a file)."""
    path = require_folder(path, kind, how)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OodbenchError(f"cannot make the {kind} {path}: {os_error_line(exc)} ({how})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OodbenchError(f"the {kind} {path} is read-only ({how}: give a folder you can write)")
    return path


def os_error_line(exc: OSError) -> str:
    """An OS error as a sentence naming the file, without Python's ``[Errno N]`` prefix."""
    what = exc.strerror or str(exc)
    if exc.filename is None:
        return what
    names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{names}: {what[:1].lower()}{what[1:]}"


def worker_message(message: str) -> str:
    """The one line an error raised in a DataLoader worker process was raised with: torch re-raises
    it in the main process as ``Caught X in DataLoader worker process N. Original Traceback ...``,
    the worker's whole traceback, whose last line is ``module.X: <the line>``."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last, count=1)


_LIBRARIES = tuple(os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib"))


def failure_line(exc: BaseException) -> str:
    """An unexpected exception of a method (a plugin's `fit` raising, say) in one line: its type,
    its message, and where it was raised in code that is not an installed library (the plugin
    file and line), so the author can find it; ``OODBENCH_DEBUG=1`` prints the whole traceback."""
    if isinstance(exc, OodbenchError):
        return str(exc)
    line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if not os.path.realpath(f.filename).startswith(_LIBRARIES)]
    frame = (own or frames)[-1] if frames else None
    if frame is None:
        return line
    name = os.path.relpath(frame.filename) if frame.filename.startswith(os.getcwd() + os.sep) else frame.filename
    return f"{line} ({name}, line {frame.lineno}, in {frame.name})"


def debugging() -> bool:
    """Whether errors show their whole traceback: ``--debug`` or ``OODBENCH_DEBUG=1``."""
    return os.environ.get("OODBENCH_DEBUG", "") not in ("", "0")
