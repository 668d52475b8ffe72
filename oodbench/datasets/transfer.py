"""Streaming one asset over HTTP: the only module of oodbench that opens a network
connection (``oodbench data fetch``, through `oodbench.datasets.download`; ``run`` never
imports either).

`resolve_url` finds the address (``OODBENCH_MIRROR``, the asset's URL, or a Google Drive id
resolved with gdown through the confirmation page Drive shows for large files);
`download_file` streams it with requests and a tqdm bar into ``<file>.part``, which an
interrupted download leaves behind and the next run resumes with an HTTP Range request.
Failures are one line (`FetchError`): no network or a refused host, an HTTP error, an
interrupted transfer (rerun to resume), a full disk (partial file removed).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from oodbench.datasets.release import Asset, Release
from oodbench.errors import OodbenchError

MIRROR_ENV = "OODBENCH_MIRROR"
TIMEOUT_S = 60
CHUNK = 1 << 16  # what a dropped connection can lose; a resumed download asks from the last whole chunk


class FetchError(OodbenchError):
    """A download, verification or unpacking step that failed; one line naming the file."""


def resolve_url(release: Release, asset: Asset) -> str:
    """The address to stream `asset` from: OODBENCH_MIRROR/<file>, the asset's URL, or its Google
    Drive file resolved through gdown's reading of Drive's confirmation page."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{asset.file}"
    if asset.url:
        return asset.url
    url = release.drive_url.format(id=asset.drive)
    with _get(url, {}, asset) as response:
        if not response.headers.get("Content-Type", "").startswith("text/html"):
            return url  # Drive served the file itself
        from gdown.download import get_url_from_gdrive_confirmation
        from gdown.exceptions import FileURLRetrievalError

        try:
            return get_url_from_gdrive_confirmation(response.text)
        except FileURLRetrievalError as exc:
            raise FetchError(f"Google Drive did not give {asset.file} (id {asset.drive}): {exc}") from None


def _get(url: str, headers: dict, asset: Asset):
    import requests

    try:
        response = _session().get(url, headers=headers, stream=True, timeout=TIMEOUT_S)
    except requests.exceptions.ConnectionError as exc:
        host = requests.utils.urlparse(url).netloc
        raise FetchError(f"cannot reach {host} for {asset.file}: no network, or the host refused the connection "
                         f"({_reason(exc)})") from None
    except requests.exceptions.RequestException as exc:
        raise FetchError(f"cannot download {asset.file} from {url}: {_reason(exc)}") from None
    if response.status_code >= 400 and response.status_code != 416:
        response.close()
        raise FetchError(f"{url} answered HTTP {response.status_code} ({response.reason}) for {asset.file}")
    return response


_SESSION = None


def _session():
    """One requests session per process: Drive's confirmation cookies carry to the download."""
    global _SESSION
    if _SESSION is None:
        import requests

        _SESSION = requests.Session()
    return _SESSION


def _reason(exc: Exception) -> str:
    text = str(exc.args[0] if exc.args else exc)
    return text.split("(Caused by ")[-1].rstrip(")") if "Caused by" in text else text


def download_file(url: str, target: Path, asset: Asset) -> None:
    """Stream `url` into `target`, resuming ``<target>.part`` when the server honours Range."""
    import requests
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    with _get(url, {"Range": f"bytes={offset}-"} if offset else {}, asset) as response:
        if response.status_code == 416:  # the part holds the whole file already
            os.replace(part, target)
            return
        if response.status_code != 206:
            offset = 0  # the server sent the whole file: start again
        length = int(response.headers.get("Content-Length", 0))
        total = offset + length if length else None
        try:
            with open(part, "ab" if offset else "wb") as out, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=asset.file) as bar:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as exc:
            if isinstance(exc, requests.exceptions.RequestException):
                raise _interrupted(asset, part, total, exc) from None
            part.unlink(missing_ok=True)
            what = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise FetchError(f"cannot write {part}: {what}; the partial file was removed") from None
        except requests.exceptions.RequestException as exc:
            raise _interrupted(asset, part, total, exc) from None
    if total is not None and part.stat().st_size != total:
        raise _interrupted(asset, part, total, None)
    os.replace(part, target)


def _interrupted(asset: Asset, part: Path, total: int | None, exc: Exception | None) -> FetchError:
    got = part.stat().st_size if part.exists() else 0
    of = f" of {total:,}" if total else ""
    why = f" ({_reason(exc)})" if exc is not None else ""
    return FetchError(f"the download of {asset.file} was interrupted after {got:,}{of} bytes{why}; "
                      "rerun the same command to resume it")
