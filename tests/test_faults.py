"""Faults through the real CLI: killed runs resume to the same results, concurrent writers
share one store, and NaN scores fail their cell only.

Every run is an ``oodbench`` process of its own: forked from the tests' preloaded zygote
(tests/forked_cli.py), or a fresh interpreter where the test signals or watches it. Kill points are
seeded counts of work (the k-th forward pass, the k-th cell written), never times, so where a run dies does
not depend on the machine's load; results are compared row by row in the store, not only as
printed tables.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import yaml

from oodbench.storage.entries import entry_checksum, read_entry
from tests.forked_cli import FORKED

SEED = 4
# Stops a run at the PAUSE_AT-th call of PAUSE_EVENT (the model's forward pass: extraction,
# or the store's write_cell: scoring), where the test kills it; with PAUSE_EVENT alone,
# counts the calls into the file COUNT_CALLS instead.
PAUSE_AT = """
import os, sys, time as _time
_event, _at, _count = os.environ["PAUSE_EVENT"], int(os.environ.get("PAUSE_AT", 0)), os.environ.get("COUNT_CALLS")
if _event == "forward":
    from oodbench.models.adapter import ModelAdapter as _owner
    _name = "forward"
else:
    from oodbench.storage.store import ResultStore as _owner
    _name = "write_cell"
_original, _calls = getattr(_owner, _name), [0]
def _paused(*args, **kwargs):
    _calls[0] += 1
    if _count:
        with open(_count, "a") as f: f.write("1\\n")
    if _calls[0] == _at:
        sys.stderr.write("KILL-POINT\\n"); sys.stderr.flush(); _time.sleep(600)
    return _original(*args, **kwargs)
setattr(_owner, _name, _paused)
"""
POSTPROCESSORS = ["msp", "ebo", "gen", "mds"]  # logits, a search, and a fitted feature method
VOLATILE = {"seconds", "created"}  # the only columns allowed to differ between equal runs


def environment(cache: Path) -> dict[str, str]:
    env = {**os.environ, "OODBENCH_CACHE": str(cache)}
    env.pop("PYTHONWARNINGS", None)
    return env


def run(args: tuple[str, ...], cache: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`oodbench ARGS` in a process of its own (forked from the tests' preloaded zygote)."""
    return FORKED.run(args, cwd=cwd, env=environment(cache), timeout=timeout)


def fresh_cache(root: Path, trained: Path) -> Path:
    """An empty output cache holding only the trained built-in model (so extraction reruns)."""
    cache = root / "cache"
    shutil.copytree(trained / "models", cache / "models")
    return cache


def write_config(folder: Path, store: Path, **changes) -> Path:
    config = {"benchmark": "digits", "models": ["digits-cnn"], "postprocessors": POSTPROCESSORS, "search": True,
              "results": str(store), **changes}
    path = folder / f"experiment-{len(list(folder.glob('experiment-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def store_rows(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, volatile columns dropped, sorted."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = {}
    for table in ("cells", "results", "datasets"):
        cursor = db.execute(f"SELECT * FROM {table}")
        keep = [i for i, d in enumerate(cursor.description) if d[0] not in VOLATILE]
        rows[table] = sorted((tuple(row[i] for i in keep) for row in cursor), key=repr)
    db.close()
    return rows


def cell_statuses(path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    statuses = [status for (status,) in db.execute("SELECT status FROM cells")]
    db.close()
    return statuses


def cell_keys(path: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    keys = list(db.execute("SELECT benchmark, model, postprocessor, setting FROM cells"))
    db.close()
    return keys


def leftover_temporaries(cache: Path) -> list[str]:
    return [str(p.relative_to(cache)) for p in cache.rglob("*.tmp*")]


class Watched:
    """A CLI process (forked, `FORKED.start`) whose stderr is read while it runs, to signal it
    at a phase."""

    def __init__(self, args: tuple[str, ...], cache: Path, cwd: Path, env: dict[str, str] | None = None,
                 prelude: str = ""):
        self.process = FORKED.start(args, cwd=cwd, env=env or environment(cache), prelude=prelude)

    @property
    def stderr(self) -> str:
        return self.process.stderr_text()

    def wait_for(self, marker: str, timeout: float) -> bool:
        """True once `marker` shows on stderr; False when the process ended or time ran out first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if marker in self.stderr:
                return True
            if self.process.poll() is not None:
                return marker in self.stderr
            time.sleep(0.05)
        return False

    def kill(self) -> bool:
        """SIGKILL; True when the process was still running."""
        running = self.process.poll() is None
        if running:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)
        return running


@pytest.fixture(scope="module")
def trained(session_cache) -> Path:
    """The session cache with the built-in `digits-cnn` trained into it."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    load_model(ModelSpec("digits-cnn"), ModelContext(cache_dir=session_cache, data_root=session_cache))
    return session_cache


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, trained):
    """One uninterrupted run: its store, how long it took, and its (now warm) cache."""
    folder = tmp_path_factory.mktemp("baseline")
    cache = fresh_cache(folder, trained)
    store = folder / "results.sqlite"
    config = write_config(folder, store)
    counter = folder / "forwards.txt"
    done = FORKED.run(("run", str(config)), cwd=folder, timeout=300, prelude=PAUSE_AT,
                      env={**environment(cache), "PAUSE_EVENT": "forward", "COUNT_CALLS": str(counter)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = store_rows(store)
    assert len(rows["cells"]) == len(POSTPROCESSORS)
    assert set(cell_statuses(store)) == {"done"}, rows["cells"]
    return {"rows": rows, "forwards": len(counter.read_text().split()), "cache": cache, "stdout": done.stdout,
            "store": store}


def test_killed_runs_resume_to_the_same_store(tmp_path, trained, baseline):
    """SIGKILL at seeded points of the work, each sure to come before the run ends whatever the
    machine's load: at the k-th forward pass of extraction (k up to the baseline's count), then
    before the k-th cell is written, twice (k up to the cells left); rerun, compare the store."""
    rng = random.Random(SEED)
    cache = fresh_cache(tmp_path, trained)
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    first_cell = rng.randint(1, len(POSTPROCESSORS))
    kill_points = [("forward", rng.randint(1, baseline["forwards"])), ("cell", first_cell),
                   ("cell", rng.randint(1, len(POSTPROCESSORS) - first_cell + 1))]
    for event, at in kill_points:
        watched = Watched(("run", str(config)), cache, tmp_path, prelude=PAUSE_AT,
                          env={**environment(cache), "PAUSE_EVENT": event, "PAUSE_AT": str(at)})
        assert watched.wait_for("KILL-POINT", timeout=300), f"the run did not reach {event} {at}: {watched.stderr[-3000:]}"
        assert watched.kill()
    assert len(cell_keys(store)) == first_cell - 1 + kill_points[2][1] - 1, "each kill landed where it was drawn"
    done = run(("run", str(config)), cache, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_rows(store) == baseline["rows"], f"kills at {kill_points} changed the results"
    assert len(cell_keys(store)) == len(set(cell_keys(store))) == len(POSTPROCESSORS)
    assert leftover_temporaries(cache) == [], "temporary files of killed writers stayed in the cache"
    assert done.stdout.splitlines()[-len(POSTPROCESSORS):] == baseline["stdout"].splitlines()[-len(POSTPROCESSORS):]


# Pauses inside the store's write transaction (write_cell reads the clock there), so the
# test can kill the process at that exact point.
PAUSE_IN_TRANSACTION = """
import sys, time as _time
import oodbench.storage.store as _store
class _Clock:
    def __getattr__(self, name):
        return getattr(_time, name)
    def time(self):
        sys.stderr.write("IN-TRANSACTION\\n"); sys.stderr.flush(); _time.sleep(600)
_store.time = _Clock()
"""


def test_kill_inside_a_store_transaction(tmp_path, trained, baseline):
    """A cell half-written when the process dies is invisible, and the rerun completes it."""
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    watched = Watched(("run", str(config)), baseline["cache"], tmp_path, prelude=PAUSE_IN_TRANSACTION)
    assert watched.wait_for("IN-TRANSACTION", timeout=300), watched.stderr[-3000:]
    assert cell_keys(store) == [], "a reader sees a cell whose transaction has not committed"
    assert watched.kill()
    assert cell_keys(store) == []
    done = run(("run", str(config)), baseline["cache"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_rows(store) == baseline["rows"]


def test_concurrent_writers(tmp_path, baseline):
    """Two different experiments, then the same one twice, into one new store at the same time."""
    store = tmp_path / "shared.sqlite"
    first = write_config(tmp_path, store, postprocessors=["msp", "ebo", "mls"], search=False)
    second = write_config(tmp_path, store, postprocessors=["entropy", "gen", "temp_scaling"], search=False)
    same = write_config(tmp_path, store)
    for configs in ((first, second), (same, same)):
        processes = [FORKED.start(("run", c), cwd=tmp_path, env=environment(baseline["cache"])) for c in configs]
        for process in processes:
            assert process.wait(timeout=300) == 0, process.stderr_text()[-3000:]
    keys = cell_keys(store)
    assert len(keys) == len(set(keys)) == 3 + 3 + len(POSTPROCESSORS)
    rows = store_rows(store)
    assert {row[2] for row in rows["cells"]} == {"msp", "ebo", "mls", "entropy", "gen", "temp_scaling", "mds"}
    assert set(cell_statuses(store)) == {"done"}, rows["cells"]
    searched = {t: [r for r in rows[t] if "search" in r] for t in ("cells", "results")}
    assert searched == {t: baseline["rows"][t] for t in ("cells", "results")}, "two writers of one experiment differ from one"


NAN_PLUGIN = """
import torch
import oodbench

@oodbench.register_postprocessor("sometimes_nan")
class SometimesNaN(oodbench.Postprocessor):
    \"\"\"Max logit, but NaN on the first three samples and +inf on the fourth of every split.\"\"\"

    def score(self, outputs):
        scores = outputs.logits.max(dim=1).values.clone()
        scores[:3] = float("nan")
        scores[3] = float("inf")
        return scores
"""


def test_nan_scores_fail_their_cell_only(tmp_path, baseline):
    (tmp_path / "nan_plugin.py").write_text(NAN_PLUGIN)
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store, postprocessors=["sometimes_nan", "msp"], search=False,
                          plugins=[str(tmp_path / "nan_plugin.py")])
    done = run(("run", str(config)), baseline["cache"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    db = sqlite3.connect(store)
    cells = {name: (status, reason) for name, status, reason in
             db.execute("SELECT postprocessor, status, reason FROM cells")}
    results = {name: count for name, count in
               db.execute("SELECT postprocessor, count(*) FROM results GROUP BY postprocessor")}
    db.close()
    assert cells["msp"] == ("done", None)
    assert cells["sometimes_nan"][0] == "failed"
    assert "4 of" in cells["sometimes_nan"][1] and "NaN or infinite" in cells["sometimes_nan"][1]
    assert "sometimes_nan" not in results and results["msp"] > 0, "a failed cell left numbers behind"

    board = run(("leaderboard", "--results", str(store)), baseline["cache"], tmp_path)
    assert board.returncode == 0, board.stderr
    row = next(line for line in board.stdout.splitlines() if " sometimes_nan " in line and not line.startswith("- "))
    assert "FAILED" in row and not any(ch.isdigit() for ch in row.split("sometimes_nan", 1)[1])
    assert "sometimes_nan: failed: 4 of" in board.stdout


# --------------------------------------------------------------------------- the machine failing

PROGRESS = re.compile(r"^[^|]*:\s*\d+%\|")  # a tqdm bar
MARKER = "IN-TRANSACTION"


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars, warnings or the test's own marker."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]
    return [line for line in lines if not PROGRESS.match(line) and not line.startswith("warning: ") and line != MARKER]


def assert_one_error_line(done, code: int, *needles: str) -> str:
    shown = f"exit {done.returncode}\nstderr: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr + done.stdout, shown
    assert done.returncode == code, shown
    lines = error_lines(done.stderr)
    assert len(lines) == 1, shown
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@contextmanager
def small_filesystem(folder: Path, size: str):
    """A real tmpfs of `size` mounted at `folder` for the block (the tests run as root here)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({mounted.stderr.strip() or 'mount failed'}); "
                    "these faults need a real filesystem that fills up or is read-only")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True, capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """A file taking all but about `leave` bytes of the free space of `folder`'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, shutil.disk_usage(folder).free - leave))
    return filler


def test_full_disk_under_the_cache_is_one_line_and_loses_nothing(tmp_path, trained, baseline):
    """The output cache on a 1 MiB filesystem: an entry reserved at its full size does not fit."""
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        cache = disk / "cache"
        (cache / "models").mkdir(parents=True)
        for weights in (trained / "models").glob("digits-cnn-*.pt"):
            if "robust" not in weights.name:
                shutil.copy(weights, cache / "models")
        store = tmp_path / "results.sqlite"
        config = write_config(tmp_path, store)
        done = run(("run", str(config)), cache, tmp_path)
        line = assert_one_error_line(done, 2, "no space left on device", str(cache), "--cache-dir")
        assert line.startswith("oodbench: error: no space left on device: cannot write ")

        assert leftover_temporaries(cache) == [], "a partial file stayed in the cache"
        assert [p.name for p in cache.rglob(".*") if p.suffix in (".partial", ".journal")] == [], \
            "a partial entry or its journal stayed in the cache"
        entries = [p for p in (cache / "outputs").rglob("*.pt")]
        assert entries, "no entry was written before the disk filled"
        for entry in entries:  # every entry written before the disk filled is whole
            key, tensors, scalars, checksum = read_entry(entry)
            assert key and tensors and entry_checksum(tensors, scalars) == checksum
        assert cell_keys(store) == [], "a cell was stored from a run that could not cache its outputs"

        remount(disk, "size=16m")  # room made: the same command resumes and gives the uninterrupted results
        done = run(("run", str(config)), cache, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert store_rows(store) == baseline["rows"]


def test_full_disk_while_scoring_stops_the_run(tmp_path, baseline):
    """Outputs cached, then no room for a fitted method's state: the run stops in one line (its
    cells would all fail the same way), the cells before it are kept, and a rerun completes."""
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        cache = disk / "cache"
        shutil.copytree(baseline["cache"], cache, ignore=lambda folder, names: ["fits"] if folder == str(baseline["cache"])
                        else [])
        filler = fill(disk, leave=16 << 10)
        store = tmp_path / "results.sqlite"
        config = write_config(tmp_path, store, postprocessors=["msp", "mds"], search=False)
        done = run(("run", str(config)), cache, tmp_path)
        assert_one_error_line(done, 2, "no space left on device", str(cache / "fits"))
        assert [key[2] for key in cell_keys(store)] == ["msp"]
        assert leftover_temporaries(cache) == []

        filler.unlink()
        done = run(("run", str(config)), cache, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(key[2] for key in cell_keys(store)) == ["mds", "msp"]


def test_full_disk_under_the_store_is_one_line_and_keeps_its_rows(tmp_path, baseline):
    """A finished store on a nearly full filesystem: SQLite says 'database or disk is full' mid-run."""
    more = ["mls", "entropy", "temp_scaling", "klm", "gradnorm", "react", "knn", "scale", "ash", "dice", "vim"]
    with small_filesystem(tmp_path / "disk", "2m") as disk:
        store = disk / "results.sqlite"
        shutil.copy(baseline["store"], store)
        filler = fill(disk, leave=96 << 10)
        config = write_config(tmp_path, store, postprocessors=POSTPROCESSORS + more, search=False)
        done = run(("run", str(config)), baseline["cache"], tmp_path)
        assert_one_error_line(done, 2, "no space left on device", str(store), "--results")

        rows = store_rows(store)  # the store is readable, and the finished cells are as they were
        for table in ("cells", "results"):
            kept = [row for row in rows[table] if "search" in row]
            assert kept == baseline["rows"][table], f"{table}: rows written before the disk filled changed"
        written = [key for key in cell_keys(store) if key[3] == "default"]
        assert len(written) < len(POSTPROCESSORS + more), "the disk never filled: the test proves nothing"
        counts = dict(sqlite3.connect(store).execute(
            "SELECT c.postprocessor, count(r.metric) FROM cells c LEFT JOIN results r USING "
            "(benchmark, model, postprocessor, setting, fingerprint) WHERE c.setting = 'default' GROUP BY 1"))
        assert len(set(counts.values())) <= 1, f"a cell was half written: {counts}"

        filler.unlink()
        done = run(("run", str(config)), baseline["cache"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len([key for key in cell_keys(store) if key[3] == "default"]) == len(POSTPROCESSORS + more)


def test_a_finished_store_on_a_read_only_filesystem_is_readable(tmp_path, baseline):
    """leaderboard and compare on a WAL store whose folder cannot be written (no -shm can be made)."""
    two = [{"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn", "label": "digits-cnn-copy",
                                                          "tags": ["robust"]}]
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store, models=two, postprocessors=["msp", "ebo", "pro_msp"], search=False)
    assert run(("run", str(config)), baseline["cache"], tmp_path).returncode == 0
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    writable = {"leaderboard": run(("leaderboard", "--results", str(store)), baseline["cache"], tmp_path),
                "compare": run(("compare", str(config), "--output", str(tmp_path / "plots")),
                               baseline["cache"], tmp_path)}
    assert all(done.returncode == 0 for done in writable.values()), [d.stderr for d in writable.values()]
    with small_filesystem(tmp_path / "ro", "1m") as folder:
        shutil.copy(store, folder / "results.sqlite")
        remount(folder, "ro")
        assert not os.access(folder, os.W_OK)
        copy = folder / "results.sqlite"
        board = run(("leaderboard", "--results", str(copy)), baseline["cache"], tmp_path)
        assert board.returncode == 0, board.stderr
        assert board.stdout == writable["leaderboard"].stdout
        compared = run(("compare", str(config), "--results", str(copy), "--output",
                                   str(tmp_path / "plots-ro")), baseline["cache"], tmp_path)
        assert compared.returncode == 0, compared.stderr
        assert compared.stdout == writable["compare"].stdout
        assert sorted(p.name for p in folder.iterdir()) == ["results.sqlite"]


# Pauses inside the store's transaction for the second cell (write_cell reads the clock there,
# after deleting the cell's old rows), so a signal arrives with a cell half written.
PAUSE_IN_SECOND_CELL = f"""
import sys, time as _time
import oodbench.storage.store as _store
class _Clock:
    cells = 0
    def __getattr__(self, name):
        return getattr(_time, name)
    def time(self):
        if sys._getframe(1).f_code.co_name == "write_cell":
            _Clock.cells += 1
            if _Clock.cells == 2:
                sys.stderr.write("{MARKER}\\n"); sys.stderr.flush(); _time.sleep(600)
        return _time.time()
_store.time = _Clock()
"""


def assert_terminated_like_an_interrupt(watched: Watched, store: Path, baseline) -> None:
    """SIGTERM mid-transaction: one line, exit 143, the first cell kept whole, the second rolled back."""
    assert watched.wait_for(MARKER, timeout=300), watched.stderr[-3000:]
    watched.process.send_signal(signal.SIGTERM)
    watched.process.wait(timeout=60)
    done = subprocess.CompletedProcess(watched.process.args, watched.process.returncode, "", watched.stderr)
    assert_one_error_line(done, 143, "oodbench: terminated; rerun the same command to resume")
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = store_rows(store)
    assert len(rows["cells"]) == 1, "the committed cell was lost or the half-written one kept"
    kept = rows["cells"][0][2]
    for table in ("cells", "results"):
        assert rows[table] == [row for row in baseline["rows"][table] if row[2] == kept]


def test_sigterm_is_handled_like_ctrl_c(tmp_path, baseline):
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    watched = Watched(("run", str(config)), baseline["cache"], tmp_path, prelude=PAUSE_IN_SECOND_CELL)
    assert_terminated_like_an_interrupt(watched, store, baseline)
    done = run(("run", str(config)), baseline["cache"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_rows(store) == baseline["rows"]


# --------------------------------------------------------------------------- Ray

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="Ray is the optional extra oodbench[ray] (pip install -e '.[ray]')")


def processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # it ended while we looked
            continue
    return found


@pytest.fixture
def ray_tmpdir():
    """A temp root for the run's own Ray instance (short: Ray's socket paths must fit 107 bytes);
    afterwards no process of that instance may be left (after a few seconds to exit), and any
    found is reported and ended."""
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield root
    deadline = time.time() + 15
    while (left := processes_naming(str(root))) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert left == [], f"processes of the run's Ray instance outlived it: {left}"


@requires_ray
def test_sigterm_with_the_ray_executor(tmp_path, baseline, ray_tmpdir):
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    env = {**environment(baseline["cache"]), "RAY_TMPDIR": str(ray_tmpdir)}
    watched = Watched(("run", str(config), "--executor", "ray"), baseline["cache"], tmp_path, env=env,
                      prelude=PAUSE_IN_SECOND_CELL)
    assert_terminated_like_an_interrupt(watched, store, baseline)


@requires_ray
def test_unreachable_ray_address_fails_fast(tmp_path, baseline):
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    started = time.time()
    done = run(("run", str(config), "--executor", "ray", "--ray-address", "127.0.0.1:1"),
               baseline["cache"], tmp_path, timeout=60)
    assert time.time() - started < 30
    assert_one_error_line(done, 2, "cannot reach the Ray cluster at 127.0.0.1:1", "connection refused")
    assert not store.exists(), "the store was touched before the executor was ready"


@requires_ray
def test_a_local_ray_start_that_times_out_fails_in_one_line(tmp_path, baseline, ray_tmpdir):
    store = tmp_path / "results.sqlite"
    config = write_config(tmp_path, store)
    env = {**environment(baseline["cache"]), "RAY_TMPDIR": str(ray_tmpdir), "OODBENCH_RAY_TIMEOUT": "1"}
    started = time.time()
    done = FORKED.run(("run", str(config), "--executor", "ray"), cwd=tmp_path, env=env, timeout=60)
    assert time.time() - started < 30
    assert_one_error_line(done, 2, "the local Ray instance did not start within 1 s", "OODBENCH_RAY_TIMEOUT")
    assert not store.exists()
