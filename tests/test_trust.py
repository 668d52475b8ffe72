"""Trust in reuse: every cached or stored value follows the data, benchmark, model and
settings that produced it (issue "Numbers you can trust"). Each case runs the real CLI and
checks the numbers afterwards, not only that nothing crashed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from oodbench.storage.caches import FitStateCache
from oodbench.storage.entries import read_entry
from tests.conftest import SHARED_MODELS, compact_rows
from tests.forked_cli import FORKED

BENCH = {"name": "tinyfolders", "version": 1, "image": {"size": 8, "channels": 1}, "num_classes": 6, "seed": 0,
         "id": {"test": {"dataset": "image_folder", "options": {"path": "idset"}}},
         "near": {"oodset": {"dataset": "image_folder", "options": {"path": "oodset"}}}, "far": {}}
COUNTING = ("import os\nfrom oodbench.models.adapter import ModelAdapter\n_forward = ModelAdapter.forward\n"
            "def _counted(self, x):\n"
            "    with open(os.environ['COUNT_FORWARDS'], 'a') as f: f.write(f'{x.shape[0]}\\n')\n"
            "    return _forward(self, x)\n"
            "ModelAdapter.forward = _counted\n")


def write_images(folder: Path, count: int, classes: int, scale: float, seed: int, suffix: str = ".png") -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = folder / str(i % classes)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((8, 8)) * scale * 255).astype("uint8"), "L").save(target / f"{i:03d}{suffix}")


def data_root(root: Path, n_id: int, n_ood: int, seed: int = 7, suffix: str = ".png") -> Path:
    write_images(root / "idset", n_id, 6, 1.0, seed)
    write_images(root / "oodset", n_ood, 1, 0.3, seed + 1, suffix)
    return root


def experiment(path: Path, benchmark: Path | str, root: Path | None, **extra) -> Path:
    config = {"benchmark": str(benchmark), "models": [{"name": "digits-cnn"}], "postprocessors": ["msp", "mls"],
              "search": False, **({"data_root": str(root)} if root else {}), **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args, cache: Path, prelude: str = "", env: dict | None = None, timeout: float = 600):
    environment = {**os.environ, "OODBENCH_CACHE": str(cache), **(env or {})}
    environment.pop("PYTHONWARNINGS", None)
    return FORKED.run(args, cwd=Path.cwd(), env=environment, timeout=timeout, prelude=prelude)


def board(store: Path, *args: str, cache: Path) -> pd.DataFrame:
    """The leaderboard's tidy CSV, one row per finished cell again: its fingerprint, ``acc`` and
    each column's ``<set>|auroc`` and classic ``<set>|fpr``."""
    done = cli("leaderboard", "--results", store, "--format", "csv", *args, cache=cache)
    assert done.returncode == 0, done.stderr
    tidy = pd.read_csv(StringIO(done.stdout))
    tidy = tidy[tidy.metric.isin(["acc", "auroc"]) | ((tidy.metric == "fpr95") & (tidy.fpr_convention == "classic"))]
    tidy = tidy.assign(column=[m if m == "acc" else f"{d}|{'fpr' if m == 'fpr95' else m}"
                               for d, m in zip(tidy.dataset, tidy.metric)])
    wide = tidy.pivot(index="fingerprint", columns="column", values="value")
    return wide.loc[list(dict.fromkeys(tidy.fingerprint))].reset_index().rename_axis(columns=None)


def samples(store: Path) -> dict[str, int]:
    db = sqlite3.connect(store)
    rows = db.execute("SELECT dataset, samples FROM datasets ORDER BY created").fetchall()
    db.close()
    return dict(rows)


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("oodbench: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def bench(tmp_path) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(BENCH))
    return path


@pytest.fixture
def cache(tmp_path, digits_models, session_cache) -> Path:
    """A fresh cache holding the session's trained built-in models (no retraining)."""
    shutil.copytree(session_cache / "models", tmp_path / "cache" / "models")
    return tmp_path / "cache"


def test_two_data_roots_sharing_a_cache_give_their_own_numbers(tmp_path, bench, cache):
    a = experiment(tmp_path / "a.yaml", bench, data_root(tmp_path / "A", 30, 10))
    b = experiment(tmp_path / "b.yaml", bench, data_root(tmp_path / "B", 25, 3, seed=11))
    for config, store in ((a, "a.sqlite"), (b, "b.sqlite")):
        done = cli("run", config, "--results", tmp_path / store, cache=cache)
        assert done.returncode == 0, done.stderr
    assert samples(tmp_path / "a.sqlite") == {"id:test": 30, "oodset": 10}
    assert samples(tmp_path / "b.sqlite") == {"id:test": 25, "oodset": 3}
    # B through the shared cache equals B alone with a cache of its own
    own = tmp_path / "own"
    shutil.copytree(cache / "models", own / "models")
    assert cli("run", b, "--results", tmp_path / "alone.sqlite", cache=own).returncode == 0
    columns = ["acc", "oodset|fpr", "oodset|auroc"]
    shared, alone, first = (board(tmp_path / s, cache=cache)[columns]
                            for s in ("b.sqlite", "alone.sqlite", "a.sqlite"))
    pd.testing.assert_frame_equal(shared, alone)
    assert not np.allclose(shared.to_numpy(), first.to_numpy())


def test_two_data_roots_with_equal_names_sizes_and_times_give_their_own_numbers(tmp_path, bench, cache):
    """Two roots as unpacked from reproducible archives: the same file names, sizes (BMP) and
    modification times, other OOD pixels. A plain run on the second, through the first's cache,
    gets the numbers a --verify-data run with a cache of its own gets (issue 23, item 4)."""
    roots = [data_root(tmp_path / name, 24, 8, suffix=".bmp") for name in "AB"]
    shutil.rmtree(roots[1] / "oodset")
    write_images(roots[1] / "oodset", 8, 1, 0.9, seed=77, suffix=".bmp")
    shutil.rmtree(roots[1] / "idset")
    shutil.copytree(roots[0] / "idset", roots[1] / "idset")
    for root in roots:
        for path in root.rglob("*.bmp"):
            os.utime(path, ns=(10**18, 10**18))
    pairs = [(a, roots[1] / a.relative_to(roots[0])) for a in sorted(roots[0].rglob("*.bmp"))]
    assert all(a.stat().st_size == b.stat().st_size and a.stat().st_mtime_ns == b.stat().st_mtime_ns
               for a, b in pairs) and any(a.read_bytes() != b.read_bytes() for a, b in pairs)
    a, b = (experiment(tmp_path / f"{name}.yaml", bench, root) for name, root in zip("ab", roots))
    for config, store in ((a, "a.sqlite"), (b, "b.sqlite")):
        done = cli("run", config, "--results", tmp_path / store, cache=cache)
        assert done.returncode == 0, done.stderr
    own = tmp_path / "own"
    shutil.copytree(cache / "models", own / "models")
    assert cli("run", b, "--results", tmp_path / "alone.sqlite", "--verify-data", cache=own).returncode == 0
    columns = ["acc", "oodset|fpr", "oodset|auroc"]
    shared, alone, first = (board(tmp_path / s, cache=cache)[columns] for s in ("b.sqlite", "alone.sqlite", "a.sqlite"))
    pd.testing.assert_frame_equal(shared, alone)
    assert not np.allclose(shared["oodset|auroc"], first["oodset|auroc"])


def test_replaced_images_and_a_changed_benchmark_recompute_and_keep_the_old_rows(tmp_path, bench, cache):
    root = data_root(tmp_path / "A", 30, 10)
    config = experiment(tmp_path / "a.yaml", bench, root)
    store = tmp_path / "a.sqlite"
    assert cli("run", config, "--results", store, cache=cache).returncode == 0
    before = board(store, cache=cache)
    shutil.rmtree(root / "oodset")  # the OOD folder's 10 images replaced by 30 others
    write_images(root / "oodset", 30, 1, 1.0, seed=99)
    done = cli("run", config, "--results", store, cache=cache)
    assert done.returncode == 0, done.stderr
    changed = [w for w in warnings_of(done.stderr) if "changed since the last run" in w]
    assert len(changed) == 1 and "near:oodset" in changed[0] and "10 -> 30 images" in changed[0], done.stderr
    after = board(store, cache=cache)
    assert len(after) == 2 and (after.acc == before.acc).all()  # the same ID test split and model
    assert not np.allclose(after["oodset|auroc"], before["oodset|auroc"])
    assert samples(store)["oodset"] == 30
    assert len(board(store, "--all", cache=cache)) == 4, "the rows of the old images stay in the store"
    old = board(store, "--fingerprint", before.fingerprint[0][:8], cache=cache)
    np.testing.assert_array_equal(old["oodset|auroc"], before["oodset|auroc"][:1])

    changed_bench = json.loads(json.dumps(BENCH))  # a far set and parts added; same name and version
    changed_bench["far"] = {"noise": {"dataset": "uniform_noise", "options": {"count": 50}}}
    changed_bench["id"]["test"].update(parts={"keep": 24, "rest": "rest"}, part="keep")
    bench.write_text(yaml.safe_dump(changed_bench))
    done = cli("run", config, "--results", store, cache=cache)
    assert done.returncode == 0, done.stderr
    assert "noise" in done.stdout
    assert any("id:test changed" in w and "30 -> 24 images" in w for w in warnings_of(done.stderr)), done.stderr
    latest = board(store, cache=cache)
    assert len(latest) == 2 and latest["noise|auroc"].notna().all() and samples(store)["id:test"] == 24


def test_data_restored_from_a_backup_is_the_latest_run_in_table_and_warnings(tmp_path, bench, cache):
    """Data v1 -> v2 (other OOD images, an extra far set) -> v1 restored from a backup with its
    times (``cp -p``): the run on v1 finds every cell stored, and still the table shows v1's
    numbers and sets, and later runs do not warn that v1's data changed (issue 23, item 5)."""
    with_extra = json.loads(json.dumps(BENCH))
    with_extra["far"] = {"extra": {"dataset": "image_folder", "options": {"path": "extra"}}}
    bench.write_text(yaml.safe_dump(with_extra))
    root = data_root(tmp_path / "A", 30, 10)
    shutil.copytree(root, tmp_path / "backup")  # copy2: sizes and modification times kept, as cp -p
    config = experiment(tmp_path / "a.yaml", bench, root)
    store = tmp_path / "a.sqlite"
    assert cli("run", config, "--results", store, cache=cache).returncode == 0
    v1 = board(store, cache=cache)
    shutil.rmtree(root / "oodset")
    write_images(root / "oodset", 12, 1, 1.0, seed=99)
    write_images(root / "extra", 6, 1, 0.5, seed=98)
    assert cli("run", config, "--results", store, cache=cache).returncode == 0
    v2 = board(store, cache=cache)
    assert "extra|auroc" in v2 and not np.allclose(v2["oodset|auroc"], v1["oodset|auroc"])
    shutil.rmtree(root)
    shutil.copytree(tmp_path / "backup", root)
    restored = cli("run", config, "--results", store, cache=cache)
    assert restored.returncode == 0, restored.stderr
    assert any("near:oodset changed" in w for w in warnings_of(restored.stderr)), "v2 -> v1 is a change"
    again = cli("run", config, "--results", store, cache=cache)
    assert again.returncode == 0, again.stderr
    assert not [w for w in warnings_of(again.stderr) if "changed since" in w], again.stderr
    latest = board(store, cache=cache)
    assert "extra|auroc" not in latest, "v2's extra set is not in v1's table"
    pd.testing.assert_frame_equal(latest, v1)
    db = sqlite3.connect(store)
    v1_data = db.execute(f"SELECT DISTINCT data_fingerprint FROM cells WHERE fingerprint IN "
                         f"({','.join('?' * len(v1))})", list(v1.fingerprint)).fetchall()
    db.close()
    text = cli("leaderboard", "--results", store, cache=cache)
    assert text.returncode == 0 and len(v1_data) == 1 and f"Data fingerprint {v1_data[0][0]}." in text.stdout, \
        text.stdout


def test_verify_data_recomputes_only_the_split_whose_bytes_changed(tmp_path, bench, cache):
    """One pixel of one OOD image changed with its size and mtime kept (uncompressed BMP):
    a plain run cannot see it; --verify-data does, and extracts that split only."""
    root = data_root(tmp_path / "A", 30, 10, suffix=".bmp")
    config = experiment(tmp_path / "a.yaml", bench, root)
    store, counter = tmp_path / "a.sqlite", tmp_path / "forwards.txt"
    counted = dict(cache=cache, prelude=COUNTING, env={"COUNT_FORWARDS": str(counter)})
    assert cli("run", config, "--results", store, "--verify-data", **counted).returncode == 0
    image = root / "oodset" / "0" / "004.bmp"
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-1] ^= 0xFF  # the last pixel byte of the bottom-up bitmap
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns

    counter.write_text("")
    plain = cli("run", config, "--results", store, **counted)
    assert plain.returncode == 0 and counter.read_text().split() == ["1"], "only the one-image model check"
    counter.write_text("")
    verified = cli("run", config, "--results", store, "--verify-data", **counted)
    assert verified.returncode == 0, verified.stderr
    assert sum(map(int, counter.read_text().split())) == 1 + 10, "the model check + the 10 changed OOD images"
    assert any("near:oodset changed" in w for w in warnings_of(verified.stderr)), verified.stderr
    assert len(board(store, cache=cache)) == 2


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["flip", "truncate", "copy"])
def test_every_cache_file_verifies_itself(tmp_path, cache, damage):
    """Output entries, fit-state entries and built-in weights: flipped bytes, truncation and a
    valid file copied over another key's path are each caught (one warning line naming the
    file) and recomputed, and the numbers come out as before."""
    config = experiment(tmp_path / "d.yaml", "digits", None, postprocessors=["msp", "mds"], fit_split="val",
                        models=["digits-cnn"])
    reference = tmp_path / "reference.sqlite"
    assert cli("run", config, "--results", reference, cache=cache).returncode == 0
    expected = board(reference, cache=cache)
    outputs = sorted((cache / "outputs").rglob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    fits = sorted((cache / "fits").rglob("*.pt"))
    weights = sorted((cache / "models").glob("digits-cnn-*.pt"))
    assert outputs and fits and len(weights) == 2
    standard = next(p for p in weights if "robust" not in p.name)
    robust = next(p for p in weights if "robust" in p.name)
    targets = [outputs[0], fits[0], standard]
    if damage == "flip":
        for path in targets:
            flip_middle(path)
    elif damage == "truncate":
        for path in targets:
            truncate(path)
    else:  # valid files of another key: another split's outputs, the robust model's weights
        shutil.copy(outputs[-1], outputs[0])
        FitStateCache(tmp_path / "elsewhere").save("another key", {"mean": torch.zeros(3)})
        other_fit = next((tmp_path / "elsewhere" / "fits").rglob("*.pt"))
        shutil.copy(other_fit, fits[0])
        shutil.copy(robust, standard)
    done = cli("run", config, "--results", tmp_path / "again.sqlite", cache=cache)
    assert done.returncode == 0, done.stderr
    named = warnings_of(done.stderr)
    for path in targets:
        assert any(str(path) in line and "invalid" in line for line in named), (path, done.stderr)
    again = board(tmp_path / "again.sqlite", cache=cache)
    columns = [c for c in expected.columns if c.endswith(("|fpr", "|auroc"))] + ["acc"]
    pd.testing.assert_frame_equal(again[columns], expected[columns])


def test_an_entry_is_hashed_once_per_file_state_in_a_process(tmp_path, monkeypatch):
    """Reading an unchanged entry again does not hash it again; bytes changed in place (same
    size, mtime set back by hand) change its ctime, so the next read hashes it and refuses it."""
    from oodbench.storage import files
    from oodbench.storage.caches import OutputCache

    cache = OutputCache(tmp_path)
    cache.write("k", {"logits": torch.arange(4000.0).reshape(400, 10)}, {"meta": {}})
    hashed = []
    checksum = files.entry_checksum
    monkeypatch.setattr(files, "entry_checksum", lambda *a: hashed.append(1) or checksum(*a))
    first = cache.read("k")
    assert torch.equal(cache.read("k")[0]["logits"], first[0]["logits"]) and len(hashed) == 1
    path = cache.path("k")
    stat = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick
    with open(path, "r+b") as handle:
        handle.seek(64 + 4 * 1234)
        handle.write(b"\x01\x02\x03\x04")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.warns(UserWarning, match="invalid .checksum mismatch"):
        assert cache.read("k") is None
    assert len(hashed) == 2 and not path.exists()


def test_a_swapped_output_entry_is_not_used(tmp_path, cache):
    """The issue's case: the far:uniform entry copied over the id:test path."""
    config = experiment(tmp_path / "d.yaml", "digits", None)
    assert cli("run", config, "--results", tmp_path / "one.sqlite", cache=cache).returncode == 0
    expected = board(tmp_path / "one.sqlite", cache=cache)
    from oodbench.storage.caches import OutputCache
    from oodbench.benchmark.experiment import CachedExperiment

    run = CachedExperiment.open(config, cache_dir=str(cache))
    spec = run.config.models[0]
    path_of = {s: OutputCache(cache).path(run.key(spec, s)) for s in ("id:test", "far:uniform")}
    shutil.copy(path_of["far:uniform"], path_of["id:test"])
    done = cli("run", config, "--results", tmp_path / "two.sqlite", cache=cache)
    assert done.returncode == 0, done.stderr
    assert any(str(path_of["id:test"]) in w and "another key" in w for w in warnings_of(done.stderr)), done.stderr
    again = board(tmp_path / "two.sqlite", cache=cache)
    assert (again.acc == 1.0).all()  # fractions in the tidy CSV
    pd.testing.assert_frame_equal(again.drop(columns=["fingerprint"]), expected.drop(columns=["fingerprint"]))


def test_flipped_model_cache_bytes_retrain_to_the_same_numbers(tmp_path, cache):
    config = experiment(tmp_path / "d.yaml", "digits", None)
    assert cli("run", config, "--results", tmp_path / "one.sqlite", cache=cache).returncode == 0
    expected = board(tmp_path / "one.sqlite", cache=cache)
    standard = next(p for p in (cache / "models").glob("digits-cnn-*.pt") if "robust" not in p.name)
    flip_middle(standard)
    shutil.rmtree(cache / "outputs")
    done = cli("run", config, "--results", tmp_path / "two.sqlite", cache=cache)
    assert done.returncode == 0, done.stderr
    assert any(str(standard) in w for w in warnings_of(done.stderr)), done.stderr
    pd.testing.assert_frame_equal(board(tmp_path / "two.sqlite", cache=cache), expected)


@pytest.mark.skipif(not (SHARED_MODELS / "cifar10/resnet20-12fca82f.th").is_file(),
                    reason="the CIFAR ResNet-20 checkpoint of ../shared/models is absent (a user's clone)")
def test_a_model_that_does_not_fit_the_benchmark_is_refused(tmp_path):
    config = experiment(tmp_path / "m.yaml", "digits", None, models=[
        {"name": "cifar_resnet:resnet20", "checkpoint": str(SHARED_MODELS / "cifar10/resnet20-12fca82f.th")}])
    store = tmp_path / "m.sqlite"
    done = cli("run", config, "--results", store, cache=tmp_path / "cache")
    line = error_line(done)
    assert "cifar_resnet:resnet20" in line and "digits" in line and "10 classes" in line and "6" in line
    assert not (tmp_path / "cache" / "outputs").exists(), "refused before any extraction"


def test_an_input_shape_the_model_cannot_take_is_refused(tmp_path):
    net = tmp_path / "rgb_net.py"
    net.write_text("import torch\nclass RGBNet(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.conv = torch.nn.Conv2d(3, 4, 3)\n        self.fc = torch.nn.Linear(4 * 30 * 30, 6)\n"
                   "    def forward(self, x):\n        return self.fc(self.conv(x).flatten(1))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from rgb_net import RGBNet  # noqa: PLC0415
    finally:
        sys.path.remove(str(tmp_path))
    torch.save(RGBNet().state_dict(), tmp_path / "rgb.pt")
    config = experiment(tmp_path / "m.yaml", "digits", None, models=[
        {"name": f"torch:{tmp_path / 'rgb.pt'}", "options": {"module": f"{net}:RGBNet"}, "label": "rgb32"}])
    line = error_line(cli("run", config, "--results", tmp_path / "m.sqlite", cache=tmp_path / "cache"))
    assert "rgb32" in line and "1x8x8" in line and "forward" in line


def test_tables_never_show_two_look_alike_rows(tmp_path, cache):
    searched = experiment(tmp_path / "s.yaml", "digits", None, search=True, postprocessors=["msp", "ebo"])
    plain = experiment(tmp_path / "p.yaml", "digits", None, postprocessors=["msp", "ebo", "energy"],
                       params={"energy": {"temperature": 2}})
    store = tmp_path / "mixed.sqlite"
    assert cli("run", searched, "--results", store, cache=cache).returncode == 0
    done = cli("run", plain, "--results", store, cache=cache)
    assert done.returncode == 0, done.stderr
    rows = compact_rows(done.stdout)
    assert len(rows) == 2, "run prints its own cells only; ebo and energy are one method, run once"
    assert sorted(r["postprocessor"] for r in rows) == ["ebo", "msp"]
    table = cli("leaderboard", "--results", store, cache=cache)
    assert sorted(r["postprocessor"] for r in compact_rows(table.stdout)) == [
        "ebo [searched]", "ebo temperature=2", "msp [default]", "msp [searched]"]
    assert len(board(store, cache=cache)) == 4
    unlisted = experiment(tmp_path / "u.yaml", "digits", None, params={"gen": {"gamma": 0.1}})
    line = error_line(cli("run", unlisted, "--results", store, cache=cache))
    assert "params.gen" in line and "msp, mls" in line


def test_nan_logits_fail_the_cell_with_their_count(tmp_path):
    net = tmp_path / "nan_net.py"
    net.write_text("import torch\nclass HalfNaN(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.fc = torch.nn.Linear(64, 6)\n"
                   "    def forward(self, x):\n        z = self.fc(x.flatten(1))\n"
                   "        bad = x.flatten(1).mean(1) > x.flatten(1).mean()\n"
                   "        return torch.where(bad[:, None], torch.full_like(z, float('nan')), z)\n")
    torch.manual_seed(0)
    torch.save({"fc.weight": torch.randn(6, 64), "fc.bias": torch.zeros(6)}, tmp_path / "nan.pt")
    config = experiment(tmp_path / "n.yaml", "digits", None, models=[
        {"name": f"torch:{tmp_path / 'nan.pt'}", "options": {"module": f"{net}:HalfNaN"}, "label": "halfnan"}])
    store = tmp_path / "n.sqlite"
    done = cli("run", config, "--results", store, cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "FAILED" in done.stdout
    db = sqlite3.connect(store)
    cells = db.execute("SELECT status, reason FROM cells").fetchall()
    accuracy = db.execute("SELECT accuracy, reason FROM datasets WHERE dataset = 'id:test'").fetchone()
    values = db.execute("SELECT count(*) FROM results WHERE metric = 'acc'").fetchone()[0]
    db.close()
    assert [status for status, _ in cells] == ["failed", "failed"]
    assert all("ID test logits are NaN or infinite" in reason and " of " in reason for _, reason in cells)
    assert accuracy[0] is None and "NaN" in accuracy[1] and values == 0


def test_a_killed_extraction_resumes_from_its_shards_bit_for_bit(tmp_path, bench):
    """SIGKILL in the middle of a split; the rerun extracts only the rest, and the entry
    equals an uninterrupted extraction's."""
    root = data_root(tmp_path / "A", 60, 10)
    slow = tmp_path / "slow_net.py"
    slow.write_text("import time, torch\nclass Slow(torch.nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.fc = torch.nn.Linear(64, 6)\n"
                    "    def forward(self, x):\n        time.sleep(0.2 * (x.shape[0] > 1))\n"
                    "        return self.fc(x.flatten(1))\n")
    torch.manual_seed(1)
    torch.save({"fc.weight": torch.randn(6, 64), "fc.bias": torch.randn(6)}, tmp_path / "slow.pt")
    config = experiment(tmp_path / "k.yaml", bench, root, batch_size=4, models=[
        {"name": f"torch:{tmp_path / 'slow.pt'}", "options": {"module": f"{slow}:Slow"}, "label": "slow"}])
    env = {**os.environ, "OODBENCH_CACHE": str(tmp_path / "killed"), "OODBENCH_SHARD_SECONDS": "0"}
    process = FORKED.start(("run", config, "--results", tmp_path / "k.sqlite"), cwd=tmp_path, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and journalled_shards(tmp_path / "killed" / "outputs") < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards = journalled_shards(tmp_path / "killed" / "outputs")
    assert 5 <= shards < 15, "killed in the middle of the 60-image ID split (15 batches)"

    counter = tmp_path / "forwards.txt"
    resumed = cli("run", config, "--results", tmp_path / "k.sqlite", cache=tmp_path / "killed", prelude=COUNTING,
                  env={"COUNT_FORWARDS": str(counter), "OODBENCH_SHARD_SECONDS": "0"})
    assert resumed.returncode == 0, resumed.stderr
    assert sum(map(int, counter.read_text().split())) <= 1 + 60 - 4 * (shards - 1) + 10
    whole = cli("run", config, "--results", tmp_path / "w.sqlite", cache=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = {p.name: read_entry(p)[1] for p in (tmp_path / "killed" / "outputs").rglob("*.pt")}
    uninterrupted = {p.name: read_entry(p)[1] for p in (tmp_path / "whole" / "outputs").rglob("*.pt")}
    assert killed.keys() == uninterrupted.keys() and len(killed) == 2
    left = [p.name for p in (tmp_path / "killed" / "outputs").rglob("*") if p.is_file() and p.suffix != ".pt"]
    assert left == [], "no partial file or journal left behind"
    for name, entry in uninterrupted.items():
        for tensor, value in entry.items():
            assert torch.equal(killed[name][tensor], value), (name, tensor)


def journalled_shards(folder: Path) -> int:
    """The shards the extraction journals beside partial entries record (after a header line)."""
    return sum(max(len(p.read_text().splitlines()) - 1, 0) for p in folder.rglob(".*.journal"))


def test_a_sampled_run_neither_hides_nor_overwrites_a_full_one(tmp_path, cache):
    """A quick `--limit` run after a full one: the leaderboard keeps the full run's rows (and
    shows the sampled run's where no full one exists), and the full tables stay as written."""
    store = tmp_path / "s.sqlite"
    full_config = experiment(tmp_path / "full.yaml", "digits", None)  # msp, mls
    assert cli("run", full_config, "--results", store, cache=cache).returncode == 0
    full = board(store, cache=cache)
    full_tables = tmp_path / "tables" / "digits" / "leaderboard.csv"
    written = full_tables.read_text()

    quick_config = experiment(tmp_path / "quick.yaml", "digits", None, postprocessors=["msp", "ebo"])
    quick = cli("run", quick_config, "--results", store, "--limit", "50", cache=cache)
    assert quick.returncode == 0, quick.stderr
    assert "ID test 50 of " in quick.stdout, "the run's own table says what it sampled"
    assert sorted(r["postprocessor"] for r in compact_rows(quick.stdout)) == ["ebo", "msp"]
    assert full_tables.read_text() == written
    assert "ID test 50 of " in (tmp_path / "tables" / "digits-limit50" / "leaderboard.md").read_text()

    shown = board(store, cache=cache)
    assert len(shown) == 3 and set(full.fingerprint) < set(shown.fingerprint)
    kept = shown[shown.fingerprint.isin(full.fingerprint)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, full)
    assert len(board(store, "--all", cache=cache)) == 4
    table = cli("leaderboard", "--results", store, cache=cache)
    assert sorted(r["postprocessor"] for r in compact_rows(table.stdout)) == ["ebo", "mls", "msp"]
    assert "1 other result(s)" in table.stdout and "ID test 50 of " in table.stdout
