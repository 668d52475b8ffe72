"""`oodbench data fetch` end to end without the internet: a real HTTP server on 127.0.0.1
(started here, in a thread) serves archives built here in OpenOOD v1.5's released layouts
(a few tiny images, their image lists, a tiny checkpoint in its seed folders); the CLI
downloads them through the same code as production (OODBENCH_MIRROR replaces the base of
every address; a Google Drive id goes through gdown's reading of Drive's confirmation page,
which the server imitates).

Cases: fresh download, interrupted and resumed, wrong hash (quarantine), missing file (404),
offline (connection refused), --from, a differing file that must not be overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CKPT_FOLDER = "cifar10_resnet18_32x32_base_e100_lr0.1_default"


def png(value: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    """An incompressible image: an archive big enough for a dropped connection to leave whole chunks."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tiny_checkpoint(seed: int) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"fc.weight": torch.full((10, 4), float(seed)), "fc.bias": torch.zeros(10)}, buffer)
    return buffer.getvalue()


# OpenOOD's layouts: benchmark_imglist.zip unpacks into the data root (benchmark_imglist/...),
# cifar10.zip into images_classic/cifar10/ (list paths are relative to images_classic/), the
# v1.5 checkpoints into OpenOOD's results/ (here openood_results/) as <run>/s<N>/best.ckpt.
ARCHIVES = {
    "benchmark_imglist.zip": zipped({"benchmark_imglist/cifar10/test_cifar10.txt":
                                     b"cifar10/test/airplane/0.png 0\ncifar10/test/cat/1.png 3\n"}),
    "cifar10.zip": zipped({"test/airplane/0.png": png(10), "test/cat/1.png": png(200), "test/dog/2.png": noise_png(300)}),
    "cifar10_res18_v1.5.zip": zipped({f"{CKPT_FOLDER}/s{seed}/best.ckpt": tiny_checkpoint(seed) for seed in range(3)}),
}


class Server:
    """Serves `files` by name under /files/, honouring Range; `drop` names files whose next
    response is cut off after half the bytes; /uc?id=ID imitates Google Drive's confirmation page."""

    def __init__(self):
        self.files: dict[str, bytes] = dict(ARCHIVES)
        self.drop: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path.startswith("/uc?id="):
                    page = (f'<html><body><form id="download-form" action="{server.url}/files/'
                            f'{self.path.split("=")[1]}" method="get"><input type="hidden" name="confirm" value="t">'
                            "</form></body></html>").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.drop:
                    server.drop.discard(name)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    server = Server()
    yield server
    server.close()


@pytest.fixture
def fetch(run_cli, server, tmp_path):
    """`oodbench data fetch NAMES... --data-root <tmp>/data` against the local server."""
    root = tmp_path / "data"

    def run(*names: str, mirror: str | None = None, extra: tuple[str, ...] = ()):
        return run_cli("data", "fetch", *names, "--data-root", str(root), *extra,
                       env={"OODBENCH_MIRROR": mirror or f"{server.url}/files"})

    run.root = root
    return run


def error_line(stderr: str) -> str:
    """The command's one error line (its progress bars aside), checked to be the only one."""
    lines = [line for line in stderr.splitlines() if "oodbench:" in line or "Traceback" in line]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr
    return lines[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock(root: Path) -> dict:
    return json.loads((root / "oodbench.lock").read_text())


def test_fresh_download_unpacks_in_the_released_layouts_and_records_the_hashes(fetch, server):
    result = fetch("openood-v1.5/benchmark_imglist", "openood-v1.5/cifar10", "openood-v1.5/cifar10_res18_v1.5")
    assert result.returncode == 0, result.stderr
    root = fetch.root
    assert (root / "benchmark_imglist/cifar10/test_cifar10.txt").read_bytes().startswith(b"cifar10/test/airplane/0.png")
    assert (root / "images_classic/cifar10/test/cat/1.png").read_bytes() == png(200)
    for seed in range(3):
        assert (root / f"openood_results/{CKPT_FOLDER}/s{seed}/best.ckpt").read_bytes() == tiny_checkpoint(seed)
    recorded = lock(root)
    for name, file in (("benchmark_imglist", "benchmark_imglist.zip"), ("cifar10", "cifar10.zip"),
                       ("cifar10_res18_v1.5", "cifar10_res18_v1.5.zip")):
        assert recorded[f"openood-v1.5/{name}"]["sha256"] == sha256(ARCHIVES[file])
        assert recorded[f"openood-v1.5/{name}"]["installed"] is True
    assert not list((root / ".oodbench/downloads").iterdir())  # archives are removed once unpacked
    # a rerun finds everything in place and asks the server for nothing
    asked = len(server.requests)
    again = fetch("openood-v1.5/cifar10", "openood-v1.5/cifar10_res18_v1.5")
    assert again.returncode == 0 and "cifar10: present" in again.stdout
    assert len(server.requests) == asked


def test_a_table_fetches_its_data_and_checkpoint_assets(fetch, server):
    result = fetch("openood-v1.5:cifar10")  # the server has three of its nine archives
    assert result.returncode == 2
    assert "6 of 9 assets of openood-v1.5:cifar10 not fetched (cifar100, tin, mnist, svhn, texture, places365" \
        in error_line(result.stderr)
    assert "cifar100: not fetched:" in result.stdout and "HTTP 404" in result.stdout
    assert (fetch.root / "images_classic/cifar10/test/airplane/0.png").is_file()  # the others are fetched
    assert (fetch.root / f"openood_results/{CKPT_FOLDER}/s0/best.ckpt").is_file()


def test_an_interrupted_download_resumes_where_it_stopped(fetch, server):
    server.drop.add("cifar10.zip")
    first = fetch("openood-v1.5/cifar10")
    assert first.returncode == 2
    assert "interrupted" in error_line(first.stderr) and "rerun the same command to resume" in first.stderr
    part = fetch.root / ".oodbench/downloads/cifar10.zip.part"
    kept = part.stat().st_size  # the whole chunks received before the drop
    assert 0 < kept <= len(ARCHIVES["cifar10.zip"]) // 2
    assert not (fetch.root / "images_classic/cifar10").exists()
    second = fetch("openood-v1.5/cifar10")
    assert second.returncode == 0, second.stderr
    assert server.requests[-1] == ("/files/cifar10.zip", f"bytes={kept}-")  # only the rest was asked for
    assert (fetch.root / "images_classic/cifar10/test/airplane/0.png").read_bytes() == png(10)
    assert lock(fetch.root)["openood-v1.5/cifar10"]["sha256"] == sha256(ARCHIVES["cifar10.zip"])
    assert not part.exists()


def test_a_file_that_does_not_match_its_hash_is_quarantined(fetch, server):
    assert fetch("openood-v1.5/cifar10").returncode == 0  # records the archive's hash
    import shutil

    shutil.rmtree(fetch.root / "images_classic")  # unpacked files gone: the next fetch downloads again
    server.files["cifar10.zip"] = zipped({"test/airplane/0.png": png(11)})  # the source changed
    result = fetch("openood-v1.5/cifar10")
    assert result.returncode == 2
    assert "does not match its SHA-256" in result.stdout and "quarantined" in error_line(result.stderr)
    quarantined = list((fetch.root / ".oodbench/quarantine").iterdir())
    assert [p.read_bytes() for p in quarantined] == [server.files["cifar10.zip"]]
    assert not (fetch.root / "images_classic").exists()  # never used
    assert lock(fetch.root)["openood-v1.5/cifar10"]["sha256"] == sha256(ARCHIVES["cifar10.zip"])


def test_a_shipped_hash_is_checked_on_the_first_download(fetch, server):
    # torchvision's weight file names carry their SHA-256's first 8 hex digits (0676ba61)
    server.files["resnet50-0676ba61.pth"] = b"not the weights"
    result = fetch("openood-v1.5/resnet50_imagenet1k_v1")
    assert result.returncode == 2 and "quarantined" in result.stderr
    assert not (fetch.root / "openood_results/pretrained_weights/resnet50-0676ba61.pth").exists()
    assert [p.read_bytes() for p in (fetch.root / ".oodbench/quarantine").iterdir()] == [b"not the weights"]


def test_a_missing_file_is_one_line_and_leaves_nothing_behind(fetch):
    result = fetch("openood-v1.5/tin")
    assert result.returncode == 2
    assert "HTTP 404" in error_line(result.stderr) and "tin.zip" in result.stderr
    assert not [p for p in fetch.root.rglob("*") if p.is_file() and p.name != "oodbench.lock"]
    assert not (fetch.root / "images_classic").exists()


def test_offline_is_one_line_and_exit_2(fetch):
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = fetch("openood-v1.5/cifar10", mirror=f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cannot reach 127.0.0.1:{port}" in error_line(result.stderr)
    assert f"cannot reach 127.0.0.1:{port}" in result.stderr and "refused" in result.stderr


def test_from_imports_archives_with_the_same_verification(fetch, server, tmp_path):
    folder = tmp_path / "downloaded-elsewhere"
    folder.mkdir()
    (folder / "cifar10_res18_v1.5.zip").write_bytes(ARCHIVES["cifar10_res18_v1.5.zip"])
    result = fetch("openood-v1.5/cifar10_res18_v1.5", extra=("--from", str(folder)))
    assert result.returncode == 0, result.stderr
    assert server.requests == []  # no network
    assert (fetch.root / f"openood_results/{CKPT_FOLDER}/s2/best.ckpt").read_bytes() == tiny_checkpoint(2)
    assert (folder / "cifar10_res18_v1.5.zip").is_file()  # the user's copy is left where it was
    # another copy that differs from the recorded hash is refused where it lies
    other = tmp_path / "other"
    other.mkdir()
    (other / "cifar10_res18_v1.5.zip").write_bytes(zipped({"x": b"y"}))
    (fetch.root / "oodbench.lock").write_text(json.dumps({"openood-v1.5/cifar10_res18_v1.5": {
        "sha256": sha256(ARCHIVES["cifar10_res18_v1.5.zip"])}}))
    refused = fetch("openood-v1.5/cifar10_res18_v1.5", extra=("--from", str(other)))
    assert refused.returncode == 2 and "does not match" in refused.stderr and "not used" in refused.stderr
    assert (other / "cifar10_res18_v1.5.zip").is_file()
    missing = fetch("openood-v1.5/tin", extra=("--from", str(other)))
    assert missing.returncode == 2 and "tin.zip" in missing.stderr and "not found" in missing.stderr


def test_a_differing_file_is_never_overwritten(fetch):
    existing = fetch.root / "images_classic/cifar10/test/cat/1.png"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"the user's own file")
    result = fetch("openood-v1.5/cifar10")
    assert result.returncode == 2 and "refusing to overwrite" in result.stderr and str(existing) in result.stderr
    assert existing.read_bytes() == b"the user's own file"
    assert not (fetch.root / "images_classic/cifar10/test/airplane/0.png").exists()  # nothing half-done


def test_a_google_drive_id_is_resolved_through_its_confirmation_page(server, tmp_path, monkeypatch):
    """Production's Drive path: gdown reads the confirmation page's form into the file's address,
    then the same streaming, verification and unpacking as above."""
    from oodbench.datasets.download import install
    from oodbench.datasets.release import load_release
    from oodbench.datasets.transfer import MIRROR_ENV

    monkeypatch.delenv(MIRROR_ENV, raising=False)
    release = dataclasses.replace(load_release("openood-v1.5"), drive_url=server.url + "/uc?id={id}")
    asset = dataclasses.replace(release.assets["cifar10"], drive="cifar10.zip")  # the served page points here
    install(release, asset, tmp_path / "data", echo=lambda line: None)
    assert (tmp_path / "data/images_classic/cifar10/test/airplane/0.png").read_bytes() == png(10)
    assert [path.split("?")[0] for path, _ in server.requests] == ["/uc", "/files/cifar10.zip"]


def test_a_full_disk_removes_the_partial_file(fetch):
    """A real filesystem (a 128 KiB tmpfs as the data root) fills up in the middle of the download."""
    from tests.test_faults import small_filesystem

    with small_filesystem(fetch.root, "128k"):
        result = fetch("openood-v1.5/cifar10")
        assert result.returncode == 2
        assert "no space left on the device; the partial file was removed" in error_line(result.stderr)
        assert not list(fetch.root.rglob("*.part"))


def test_validate_is_not_ok_while_a_checkpoint_is_missing(run_cli, tmp_path):
    import yaml

    config = tmp_path / "official.yaml"
    config.write_text(yaml.safe_dump({"benchmark": "cifar10", "models": ["openood:cifar10_resnet18"],
                                      "postprocessors": ["msp"]}))
    root = tmp_path / "data"
    result = run_cli("validate", str(config), "--data-root", str(root))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "s2/best.ckpt (needed by openood:cifar10_resnet18 [s2])" in line and "3 checkpoints missing" in line
    assert f"`oodbench data fetch openood-v1.5/cifar10_res18_v1.5 --data-root {root}`" in line
    assert result.stderr.count("checkpoint not found") == 3
    folder = root / f"openood_results/{CKPT_FOLDER}"
    for seed in range(3):
        (folder / f"s{seed}").mkdir(parents=True)
        (folder / f"s{seed}/best.ckpt").write_bytes(tiny_checkpoint(seed))  # validate reads no weights
    ok = run_cli("validate", str(config), "--data-root", str(root))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: cifar10") and "3 model(s)" in ok.stdout


def test_the_release_file_resolves_and_refuses_dangling_names():
    from oodbench.datasets.release import load_release, parse_release
    from oodbench.errors import OodbenchError

    release = load_release("openood-v1.5")
    # facts from OpenOOD's scripts/download/download.py
    assert release.assets["benchmark_imglist"].drive == "1lI1j0_fDDvjIt9JlWAw09X8ks-yrR_H1"
    assert release.assets["cifar10_res18_v1.5"].drive == "1byGeYxM_PlLjT72wZsMQvP6popJeWBgt"
    assert release.assets["tin"].into == "images_classic/tin" and release.assets["ninco"].into == "images_largescale/ninco"
    assert [a.name for a in release.target_assets(release.targets["cifar10"])] == [
        "benchmark_imglist", "cifar10", "cifar100", "tin", "mnist", "svhn", "texture", "places365", "cifar10_res18_v1.5"]
    raw = {"name": "x", "drive_url": "u{id}", "assets": {"a": {"drive": "1", "file": "a.zip", "into": "a"}},
           "models": {"m": {"architecture": "lenet", "dataset": "mnist", "asset": "a", "file": "m.ckpt"}},
           "targets": {"t": {"benchmarks": {"mnist": "m"}, "data": ["a", "b"]}}}
    with pytest.raises(OodbenchError, match="target t names 'b', which the release does not define"):
        parse_release(raw, "x.yaml")
    raw["assets"]["a"]["url"] = "http://x/a.zip"
    with pytest.raises(OodbenchError, match="asset a needs exactly one of 'drive' and 'url'"):
        parse_release(raw, "x.yaml")


def test_a_bad_archive_records_no_hash_and_a_mismatch_says_how_to_recover(fetch, server, tmp_path):
    """A truncated archive fails to unpack and locks nothing out; the good one then imports, recorded
    with its true source; a later differing copy is refused with the lock entry to delete."""
    name, good = "cifar10_res18_v1.5.zip", ARCHIVES["cifar10_res18_v1.5.zip"]
    folder = tmp_path / "downloaded-elsewhere"
    folder.mkdir()
    (folder / name).write_bytes(good[: len(good) // 2])  # truncated
    bad = fetch("openood-v1.5/cifar10_res18_v1.5", extra=("--from", str(folder)))
    assert bad.returncode == 2 and "not a readable zip archive" in error_line(bad.stderr)
    assert not (fetch.root / "oodbench.lock").exists()  # nothing recorded
    (folder / name).write_bytes(good)
    ok = fetch("openood-v1.5/cifar10_res18_v1.5", extra=("--from", str(folder)))
    assert ok.returncode == 0, ok.stderr
    entry = lock(fetch.root)["openood-v1.5/cifar10_res18_v1.5"]
    assert entry["sha256"] == sha256(good) and entry["source"] == f"file:{(folder / name).resolve()}"
    assert entry["size"] == len(good) and entry["installed"] is True
    other = tmp_path / "other"
    other.mkdir()
    (other / name).write_bytes(zipped({"x": b"y"}))
    shutil.rmtree(fetch.root / "openood_results")  # not installed any more: the next import is verified
    refused = fetch("openood-v1.5/cifar10_res18_v1.5", extra=("--from", str(other)))
    line = error_line(refused.stderr)
    assert refused.returncode == 2 and "not used" in line
    assert f'delete the entry "openood-v1.5/cifar10_res18_v1.5" from {fetch.root / "oodbench.lock"} and rerun' in line
    assert f"from file:{(folder / name).resolve()}" in line


def test_a_downloaded_archive_that_does_not_unpack_is_quarantined_and_records_nothing(fetch, server):
    good = ARCHIVES["cifar10.zip"]
    server.files["cifar10.zip"] = good[: len(good) // 2]
    bad = fetch("openood-v1.5/cifar10")
    assert bad.returncode == 2 and "not a readable zip archive" in error_line(bad.stderr)
    assert "quarantined, rerun to download it again" in bad.stderr
    assert "sha256" not in lock(fetch.root)["openood-v1.5/cifar10"]  # only installed: false
    server.files["cifar10.zip"] = good
    ok = fetch("openood-v1.5/cifar10")
    assert ok.returncode == 0, ok.stderr
    entry = lock(fetch.root)["openood-v1.5/cifar10"]
    assert entry["sha256"] == sha256(good) and entry["source"] == f"{server.url}/files/cifar10.zip"


@pytest.mark.parametrize("model, says", [
    ("openood:cifar10_resnet19", "unknown OpenOOD architecture or release 'cifar10_resnet19' (did you mean: cifar10_resnet18"),
    ("openood:resnet18_32x32", "openood:resnet18_32x32 needs a checkpoint file: set 'checkpoint' in the model entry"),
    ({"name": "openood:resnet18_32x32", "checkpoint": "x.ckpt", "options": {"dataset": "cifar11"}},
     "openood:resnet18_32x32: unknown dataset 'cifar11'"),
])
def test_validate_refuses_what_run_would_refuse(run_cli, tmp_path, model, says):
    import yaml

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"benchmark": "cifar10", "models": [model], "postprocessors": ["msp"]}))
    result = run_cli("validate", str(config), "--data-root", str(tmp_path / "data"))
    assert result.returncode == 2 and says in error_line(result.stderr), result.stderr
    assert not result.stdout.startswith("ok")


def test_from_a_missing_folder_is_one_line_and_a_partial_import_says_what_to_do(fetch, server, tmp_path):
    missing = tmp_path / "nope"
    result = fetch("openood-v1.5:cifar10", extra=("--from", str(missing)))
    assert result.returncode == 2 and result.stdout == "" and server.requests == []
    assert error_line(result.stderr) == (f"oodbench: error: {missing} does not exist (--from names the folder that "
                                         "holds the archives)")
    folder = tmp_path / "some"
    folder.mkdir()
    (folder / "cifar10.zip").write_bytes(ARCHIVES["cifar10.zip"])
    partial = fetch("openood-v1.5:cifar10", extra=("--from", str(folder)))
    line = error_line(partial.stderr)
    assert partial.returncode == 2 and f"put those archives in {folder} and rerun" in line
    assert "rerun the same command" not in line and server.requests == []


def test_a_failed_torchvision_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    from oodbench.tasks import data as fetching
    from oodbench.errors import OodbenchError

    def offline(root):
        (root / "SVHN").mkdir()  # as torchvision does before it downloads
        raise OSError("no network")

    monkeypatch.setitem(fetching.DOWNLOADS, "svhn", ("SVHN test", offline))
    (tmp_path / "kept").mkdir()  # what was there before stays
    with pytest.raises(OodbenchError, match="download of svhn failed"):
        fetching.fetch("svhn", tmp_path, echo=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
