"""Downloading, verifying and unpacking a release's assets (``oodbench data fetch``; ``run``
never imports this module, nor `oodbench.datasets.transfer`, which opens the connections).

For each `Asset` (see `oodbench.datasets.release`), `install`:

1. skips it when the lock file says it is installed and its ``provides`` path exists (a
   single weight file is re-hashed each time instead);
2. takes the archive from ``--from DIR`` (read where it is, never moved), or downloads it to
   ``<data root>/.oodbench/downloads/``: a Google Drive id's address is resolved with gdown
   (the confirmation page Drive shows for large files), then the file is streamed with
   requests and a tqdm bar into ``<file>.part``, which an interrupted download leaves behind
   and the next run resumes with an HTTP Range request (`oodbench.datasets.transfer`);
3. verifies it: the SHA-256 shipped in the release file, else the one recorded in the data
   root's lock file (``oodbench.lock``, JSON) at the first install.
   A downloaded file that does not match is moved to ``.oodbench/quarantine/`` (never used)
   and reported in one line; an imported one is refused where it is; when the hash it failed
   is a recorded one, the line names the lock entry to delete to accept the new copy;
4. unpacks it into ``into`` member by member (each written to a temporary name, then
   renamed), refusing, before writing anything, to overwrite an existing file whose contents
   differ; identical files are kept. The downloaded archive is then deleted (as OpenOOD's
   script does); its hash stays in the lock file to verify any later copy. A first hash is
   recorded only now, with the true source (the address, ``drive:<id>`` or ``file:<path>`` of
   a ``--from`` archive): an archive that fails to unpack locks nothing out.

Failures are one line (`FetchError`, exit 2): no network or a refused host, an HTTP error,
an interrupted transfer (rerun to resume), a full disk (partial files removed).
pooch computes the hashes; its own downloaders cannot resume, so `transfer` streams.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from oodbench.datasets.release import Asset, Release
from oodbench.datasets.transfer import CHUNK, MIRROR_ENV, FetchError, download_file, resolve_url

LOCK_FILE = "oodbench.lock"
WORK_DIR = ".oodbench"


class BadArchive(FetchError):
    """An archive that is not a readable zip file (truncated, or not a zip)."""


class Lock:
    """``<data root>/oodbench.lock``: per asset, the SHA-256 and size recorded at its first
    download, and whether it is installed. Written atomically after every change."""

    def __init__(self, root: Path):
        self.path = root / LOCK_FILE
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FetchError(f"{self.path} is not a JSON lock file; move it aside to record the hashes again") from None

    def key(self, release: Release, asset: Asset) -> str:
        return f"{release.name}/{asset.name}"

    def get(self, release: Release, asset: Asset) -> dict:
        return self.entries.get(self.key(release, asset), {})

    def update(self, release: Release, asset: Asset, **values) -> None:
        self.entries.setdefault(self.key(release, asset), {}).update(values)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, self.path)


def installed(release: Release, asset: Asset, root: Path, lock: Lock | None = None) -> bool:
    """Whether `asset` is in place under `root` (the lock says so and its path exists)."""
    lock = lock or Lock(root)
    return (root / asset.provides).exists() and lock.get(release, asset).get("installed", False)


def install(release: Release, asset: Asset, root: Path, source_dir: Path | None = None,
            echo: Callable[[str], None] = print) -> None:
    """Get, verify and unpack `asset` into `root` (see the module docstring); FetchError on failure."""
    root.mkdir(parents=True, exist_ok=True)
    lock = Lock(root)
    target = root / asset.into / asset.file if not asset.unpack else root / WORK_DIR / "downloads" / asset.file
    if installed(release, asset, root, lock) and (asset.unpack or _matches(release, asset, target, root, lock, echo)):
        echo(f"{asset.name}: present ({root / asset.provides})")
        return
    if source_dir is not None:
        archive = Path(source_dir).expanduser() / asset.file
        if not archive.is_file():
            raise FetchError(f"{archive} not found: --from needs {asset.file} (the file {release.name}/{asset.name} "
                             "downloads as)")
        digest = _verify(release, asset, archive, lock)
        if digest is None:
            raise FetchError(f"{archive} does not match the SHA-256 of {release.name}/{asset.name} "
                             f"({_expected(release, asset, lock)[:16]}...): not used{_recovery(release, asset, lock)}")
        source = f"file:{archive.resolve()}"
        if not asset.unpack:
            _copy(archive, target)
    else:
        digest = _matches(release, asset, target, root, lock, echo) if target.exists() else None  # else moved aside
        if digest is None:
            download_file(resolve_url(release, asset), target, asset)
            digest = _matches(release, asset, target, root, lock, echo)
            if digest is None:
                raise FetchError(f"the download of {release.name}/{asset.name} does not match its SHA-256; "
                                 "it was quarantined (the source changed, or the transfer was corrupted)"
                                 f"{_recovery(release, asset, lock)}")
        mirror = os.environ.get(MIRROR_ENV)
        source = f"{mirror.rstrip('/')}/{asset.file}" if mirror else asset.url or f"drive:{asset.drive}"
        archive = target
    size = archive.stat().st_size
    if asset.unpack:
        try:
            _unpack(archive, root / asset.into, echo)
        except BadArchive as exc:
            if source_dir is None:  # a download that does not unpack is set aside: the next run downloads again
                _quarantine(archive, root, release, asset, lock)
                raise BadArchive(f"{exc}; it was quarantined, rerun to download it again") from None
            raise
        if source_dir is None:
            archive.unlink()
    # recorded only now: an archive that does not unpack must not become the one every later copy is held to
    recorded = {} if _expected(release, asset, lock) else dict(sha256=digest, size=size, source=source,
                                                               recorded=time.strftime("%Y-%m-%d"))
    lock.update(release, asset, installed=True, **recorded)
    echo(f"{asset.name}: installed ({root / asset.provides})")


def _expected(release: Release, asset: Asset, lock: Lock) -> str:
    return asset.sha256 or lock.get(release, asset).get("sha256", "")


def _recovery(release: Release, asset: Asset, lock: Lock) -> str:
    """How to accept another copy when the hash it failed is the lock file's (not a shipped one)."""
    if asset.sha256 or not lock.get(release, asset).get("sha256"):
        return ""
    entry = lock.get(release, asset)
    return (f"; the expected hash was recorded on {entry.get('recorded', 'an earlier fetch')} from "
            f"{entry.get('source', 'an earlier copy')}: if this copy is the right one, delete the entry "
            f"\"{lock.key(release, asset)}\" from {lock.path} and rerun")


def _verify(release: Release, asset: Asset, path: Path, lock: Lock) -> str | None:
    """The file's SHA-256 when it matches what is known of `asset` (its shipped or recorded hash,
    hash prefix, size; a file with nothing known matches: its hash is recorded once installed), else None."""
    import pooch

    digest = pooch.file_hash(str(path), alg="sha256")
    expected = _expected(release, asset, lock)
    if (expected and digest != expected) or (asset.sha256_prefix and not digest.startswith(asset.sha256_prefix)) \
            or (asset.size is not None and path.stat().st_size != asset.size):
        return None
    return digest


def _matches(release: Release, asset: Asset, path: Path, root: Path, lock: Lock,
             echo: Callable[[str], None]) -> str | None:
    """Verify a downloaded file (its SHA-256, or None); one that does not match is quarantined (and said so)."""
    digest = _verify(release, asset, path, lock)
    if digest is not None:
        return digest
    moved = _quarantine(path, root, release, asset, lock)
    echo(f"{asset.name}: {path} does not match its SHA-256 ({_expected(release, asset, lock)[:16]}...); "
         f"quarantined as {moved}")
    return None


def _quarantine(path: Path, root: Path, release: Release, asset: Asset, lock: Lock) -> Path:
    """Move `path` to ``.oodbench/quarantine/`` (never used again); returns where it went."""
    quarantine = root / WORK_DIR / "quarantine"
    quarantine.mkdir(parents=True, exist_ok=True)
    moved = quarantine / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, moved)
    lock.update(release, asset, installed=False)
    return moved


def _unpack(archive: Path, into: Path, echo: Callable[[str], None]) -> None:
    """Extract every member of the zip `archive` under `into`, refusing to replace a differing file."""
    from tqdm import tqdm

    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if zipped.infolist() and min(m.header_offset for m in zipped.infolist()) != 0:
                # what zipfile found is a zip stored inside (a torch checkpoint's) of a truncated archive
                raise zipfile.BadZipFile("its first member does not start the file: truncated, or data before it")
            todo = []
            for member in members:
                relative = PurePosixPath(member.filename)
                if relative.is_absolute() or ".." in relative.parts:
                    raise FetchError(f"{archive} holds a path outside its folder ({member.filename}); not unpacked")
                destination = into / relative
                if not destination.exists():
                    todo.append((member, destination))
                elif destination.stat().st_size != member.file_size or _crc32(destination) != member.CRC:
                    raise FetchError(f"{destination} exists and differs from {member.filename} in {archive.name}; "
                                     "refusing to overwrite it (move it aside and rerun)")
            for member, destination in tqdm(todo, desc=f"unpacking {archive.name}", unit="file"):
                _extract(zipped, member, destination)
    except zipfile.BadZipFile as exc:
        raise BadArchive(f"{archive} is not a readable zip archive ({exc})") from None
    echo(f"unpacked {len(todo):,} of {len(members):,} files into {into} ({len(members) - len(todo):,} already there)")


def _extract(zipped: zipfile.ZipFile, member: zipfile.ZipInfo, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".part")
    try:
        with zipped.open(member) as source, open(temporary, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        what = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise FetchError(f"cannot write {destination}: {what}; the partial file was removed (rerun to continue)") from None
    except BaseException:  # a corrupt member (BadZipFile), an interrupt: no half-written file stays
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, destination)


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(destination.name + ".part")
    try:
        shutil.copyfile(source, temporary)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise FetchError(f"cannot write {destination}: {exc.strerror or exc}; the partial file was removed") from None
    os.replace(temporary, destination)


def _crc32(path: Path) -> int:
    import zlib

    value = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            value = zlib.crc32(block, value)
    return value
