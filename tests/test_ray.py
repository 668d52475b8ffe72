"""The Ray executor: the same table as the local executor, faults, one progress bar.

Ray is the optional extra ``oodbench[ray]`` for users; the ``test`` extra (``make test``)
installs it, and the tests that need it skip only where someone runs the suite without it. The tests that do not need
it always run: ``--executor ray`` without Ray fails with one line on how to install it,
and an extraction failure (a bad checkpoint) marks that model's cells failed while the
rest of the grid completes, with the local executor too.

Every Ray instance here is local, with 2 CPUs, its services on 127.0.0.1 only, and is
shut down at the end.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from oodbench.benchmark.runner import run_experiment
from oodbench.errors import OodbenchError
from tests.conftest import digits_config

GRID = ["msp", "ebo", "mds", "odin"]  # logits only, a searched one, a fitted one, input gradients
# Checked without importing Ray: a local instance must see LOOPBACK_ONLY set before Ray is imported.
requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="Ray is the optional extra oodbench[ray] (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def trained_digits(session_cache) -> Path:
    """The session cache with the built-in `digits-cnn` trained into it (once)."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    load_model(ModelSpec("digits-cnn"), ModelContext(cache_dir=session_cache, data_root=session_cache))
    return session_cache


def fresh_cache(folder: Path, trained: Path) -> Path:
    """An output cache holding only the trained weights: every output is extracted anew."""
    shutil.copytree(trained / "models", folder / "models")
    return folder


def two_models() -> list:
    """Two grid rows from one set of weights: both models' extraction tasks write the same entries."""
    return [{"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn", "label": "digits-cnn-copy"}]


def bad_checkpoint_model(folder: Path) -> dict:
    """A model entry whose checkpoint file is garbage: loading it raises a one-line OodbenchError."""
    (folder / "garbage.th").write_bytes(b"\x80\x04garbage" * 50)
    return {"name": "cifar_resnet:resnet20", "checkpoint": str(folder / "garbage.th")}


def store_rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = sorted(db.execute("SELECT * FROM results"))
    rows += sorted(db.execute("SELECT benchmark, model, postprocessor, setting, status, reason, params "
                              "FROM cells"))
    db.close()
    return rows


def stderr_lines(stderr: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]


# --------------------------------------------------------------------------- without Ray

NO_RAY = """
import sys

class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRay())
import oodbench, oodbench.cli, oodbench.benchmark.runner
assert "ray" not in sys.modules, "importing oodbench imported ray"
sys.exit(oodbench.cli.main(sys.argv[1:]))
"""


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, session_cache):
    config = digits_config(tmp_path)
    done = subprocess.run([sys.executable, "-c", NO_RAY, "run", str(config), "--executor", "ray"], cwd=tmp_path,
                          env={**os.environ, "OODBENCH_CACHE": str(session_cache)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert stderr_lines(done.stderr) == ["oodbench: error: the ray executor needs Ray, an optional extra: "
                                         "pip install 'oodbench[ray]'"]
    assert not (tmp_path / "results.sqlite").exists(), "the store was touched before the executor was ready"


def test_ray_address_needs_the_ray_executor(run_cli, tmp_path):
    done = run_cli("run", digits_config(tmp_path), "--ray-address", "127.0.0.1:6379")
    assert done.returncode == 2
    assert stderr_lines(done.stderr) == ["oodbench: error: --ray-address needs --executor ray"]


# --------------------------------------------------------------------------- failures, any executor


def test_bad_checkpoint_fails_its_cells_and_the_grid_completes_locally(tmp_path, trained_digits):
    config = digits_config(tmp_path, models=["digits-cnn", bad_checkpoint_model(tmp_path)],
                           postprocessors=["msp", "ebo"],
                           cache_dir=str(trained_digits))
    frame = run_experiment(config, quiet=True)
    bad = frame[frame.model == "cifar_resnet:resnet20"]
    assert list(bad.status) == ["failed", "failed"]
    assert all("not a readable PyTorch checkpoint" in reason and "garbage.th" in reason for reason in bad.reason)
    good = frame[frame.model == "digits-cnn"]
    assert list(good.status) == ["done", "done"] and good["average|auroc"].notna().all()


def test_a_grid_whose_only_model_cannot_load_stops_with_the_reason(tmp_path, trained_digits):
    config = digits_config(tmp_path, models=[bad_checkpoint_model(tmp_path)], cache_dir=str(trained_digits))
    with pytest.raises(OodbenchError, match="not a readable PyTorch checkpoint"):
        run_experiment(config, quiet=True)
    assert store_rows(tmp_path / "results.sqlite") == []


# --------------------------------------------------------------------------- with Ray


@requires_ray
def test_ray_cli_prints_the_local_table_cell_for_cell(run_cli, tmp_path, trained_digits):
    tables = {}
    for executor in ("local", "ray"):
        folder = tmp_path / executor
        folder.mkdir()
        config = digits_config(folder, models=two_models(), postprocessors=GRID, search=True)
        cache = fresh_cache(folder / "cache", trained_digits)
        started = time.time()
        done = run_cli("run", config, "--executor", executor, "--format", "csv", "--show-params",
                       env={"OODBENCH_CACHE": str(cache)}, timeout=400)
        print(f"\n{executor}: {time.time() - started:.1f} s")
        assert done.returncode == 0, done.stderr[-3000:]
        tables[executor] = done.stdout
        lines = stderr_lines(done.stderr)
        total = 2 * (1 + 11) + 2 * len(GRID)  # per model: loading it + its splits (ID train/val/test, 4 OOD val, 4 OOD test); cells
        bars = {line.split("|")[0].split(":")[0] for line in lines if re.match(r"^[^|]*:\s*\d+%\|", line)}
        # one bar over the whole grid; input-gradient cells (odin) add their own, under it
        assert bars - {f"{model} odin" for model in ("digits-cnn", "digits-cnn-copy")} == {"grid"}, bars
        assert any(f"| {total}/{total} " in line for line in lines if line.startswith("grid:")), lines[-12:]
        summary = done.stderr[done.stderr.index("time: "):].splitlines()
        assert re.match(r"time: [\d.]+ s wall", summary[0])
        assert [line.split()[0] for line in summary[3:6]] == ["digits-cnn", "digits-cnn-copy", "total"]
        assert store_rows(folder / "results.sqlite")
    assert tables["ray"] == tables["local"]
    local = pd.read_csv(io.StringIO(tables["local"]))
    # tidy rows of finished cells only: every cell of the grid finished, its chosen hyperparameters shown.
    # The copy has the same weights, so its cells have the same fingerprints (keys name content, not labels).
    cells = local[["model", "postprocessor", "fingerprint"]].drop_duplicates()
    assert len(cells) == 2 * len(GRID) and set(local.model) == {"digits-cnn", "digits-cnn-copy"}
    assert cells.groupby("model").fingerprint.apply(frozenset).nunique() == 1 and local.params.notna().all()
    assert store_rows(tmp_path / "ray" / "results.sqlite") == store_rows(tmp_path / "local" / "results.sqlite")


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for this module: 2 CPUs, every service on loopback; shut down at the end."""
    from oodbench.benchmark.ray_executor import LOOPBACK_ONLY

    assert "ray" not in sys.modules, "Ray was imported before its loopback setting"
    previous = os.environ.get(LOOPBACK_ONLY)
    os.environ[LOOPBACK_ONLY] = "0"  # read when Ray is imported
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(LOOPBACK_ONLY, None)
        else:
            os.environ[LOOPBACK_ONLY] = previous


FAULT_PLUGIN = '''
"""Two MSP copies whose Ray workers die: `victim` once (killed from outside), `doomed` always.
In the test's own process (the driver) neither ever blocks or kills."""
import os
import signal
import time
from pathlib import Path

import oodbench
from oodbench.postprocessors.softmax import MSP

MARKS = Path({marks!r})
DRIVER = {driver}


@oodbench.register_postprocessor("victim")
class Victim(MSP):
    def score(self, outputs):
        if os.getpid() == DRIVER:
            return super().score(outputs)
        try:
            with open(MARKS / "victim.pid", "x") as claim:  # exactly one attempt claims it
                claim.write(str(os.getpid()))
        except FileExistsError:
            return super().score(outputs)
        time.sleep(120)  # the test kills this process within seconds
        raise RuntimeError("the victim was not killed")


@oodbench.register_postprocessor("doomed")
class Doomed(MSP):
    def score(self, outputs):
        if os.getpid() == DRIVER:
            raise RuntimeError("doomed dies on Ray workers only")
        (MARKS / f"doomed.{{os.getpid()}}").touch()
        os.kill(os.getpid(), signal.SIGKILL)
'''


def kill_victim(marks: Path, killed: list[int], limit: float = 180.0) -> None:
    """Wait (bounded) for the victim task to announce its worker, then SIGKILL that worker."""
    deadline = time.time() + limit
    claim = marks / "victim.pid"
    while time.time() < deadline:
        if claim.exists() and claim.read_text():
            pid = int(claim.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


@pytest.fixture
def fault_plugin(tmp_path):
    """The plugin file; its postprocessors leave the registry after the test."""
    from oodbench.registry import POSTPROCESSORS

    marks = tmp_path / "marks"
    marks.mkdir()
    plugin = tmp_path / "fault_plugin.py"
    plugin.write_text(FAULT_PLUGIN.format(marks=str(marks), driver=os.getpid()))
    yield plugin, marks
    for name in ("victim", "doomed"):
        POSTPROCESSORS._entries.pop(name, None)  # no later in-process run may pick them up


@requires_ray
def test_ray_faults_retry_lost_workers_and_fail_only_bad_cells(tmp_path, trained_digits, ray_instance,
                                                               fault_plugin):
    from oodbench.benchmark import jobs
    from oodbench.benchmark.ray_executor import RayExecutor

    plugin, marks = fault_plugin
    cache = fresh_cache(tmp_path / "cache", trained_digits)
    config = digits_config(tmp_path, models=["digits-cnn", bad_checkpoint_model(tmp_path)],
                           postprocessors=["msp", "victim", "doomed", "ebo"], plugins=[str(plugin)],
                           cache_dir=str(cache))
    killed: list[int] = []
    killer = threading.Thread(target=kill_victim, args=(marks, killed), daemon=True)
    killer.start()
    executor = RayExecutor(max_retries=1)
    frame = run_experiment(config, executor=executor, quiet=True).set_index(["model", "postprocessor"])
    killer.join(timeout=1)

    assert len(killed) == 1 and killed[0] != os.getpid(), "the victim's worker was killed once, mid-task"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert frame.loc[("digits-cnn", "victim"), "status"] == "done"  # retried after its worker died
    metrics = [c for c in frame.columns if c.endswith(("|fpr", "|auroc"))] + ["acc"]
    assert frame.loc[("digits-cnn", "victim"), metrics].equals(frame.loc[("digits-cnn", "msp"), metrics])

    doomed = frame.loc[("digits-cnn", "doomed")]
    attempts = list(marks.glob("doomed.*"))
    assert len(attempts) == executor.max_retries + 1, "a worker that always dies is retried up to the bound"
    assert doomed.status == "failed" and "attempts" in doomed.reason and pd.isna(doomed["average|auroc"])

    for name in ("msp", "ebo"):
        assert frame.loc[("digits-cnn", name), "status"] == "done"
        assert pd.notna(frame.loc[("digits-cnn", name), "average|auroc"])
    bad = frame.loc["cifar_resnet:resnet20"]
    assert set(bad.status) == {"failed"} and len(bad) == 4
    assert all("not a readable PyTorch checkpoint" in reason for reason in bad.reason)

    loaded_here = [key for key in jobs._MODELS if key[3] == str(cache)]
    assert loaded_here == [], "the driver loaded a model: jobs ran in this process, not on Ray"
    assert ray_instance.is_initialized(), "an executor that joined an instance leaves it running"


COUNTING_PLUGIN = '''
"""MDS that records each fit it runs: the process, and the file its fit features are mapped from."""
import os
import time
from pathlib import Path

import oodbench
from oodbench.postprocessors.distance import Mahalanobis

MARKS = Path({marks!r})


def mapped_from(tensor) -> str:
    """The file whose mapping in this process holds the tensor's first byte ('' when anonymous memory)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return ""


@oodbench.register_postprocessor("counted_mds")
class CountedMDS(Mahalanobis):
    def fit(self, train, val):
        (MARKS / f"fit.{{os.getpid()}}.{{time.monotonic_ns()}}").write_text(mapped_from(train.features))
        time.sleep(1.0)  # long enough for the other model's task to ask for the same state meanwhile
        super().fit(train, val)
'''


@requires_ray
def test_ray_tasks_fit_a_shared_state_once_from_the_mapped_entry(tmp_path, trained_digits, ray_instance):
    """Two models with the same weights read the same fit split, so their MDS cells need the same
    fit state; on 2 Ray workers at once, one task fits it (reading the entry mapped, not copied
    into the worker) and the other waits for it and loads it from the fit-state cache."""
    from oodbench.benchmark.ray_executor import RayExecutor
    from oodbench.registry import POSTPROCESSORS

    marks = tmp_path / "marks"
    marks.mkdir()
    plugin = tmp_path / "counting_plugin.py"
    plugin.write_text(COUNTING_PLUGIN.format(marks=str(marks)))
    cache = fresh_cache(tmp_path / "cache", trained_digits)
    config = digits_config(tmp_path, models=two_models(), postprocessors=["counted_mds"], plugins=[str(plugin)],
                           cache_dir=str(cache))
    try:
        frame = run_experiment(config, executor=RayExecutor(), quiet=True).set_index("model")
    finally:
        POSTPROCESSORS._entries.pop("counted_mds", None)

    fits = list(marks.glob("fit.*"))
    assert len(fits) == 1, f"{len(fits)} fits of one state across the two tasks"
    assert int(fits[0].name.split(".")[1]) != os.getpid(), "the fit ran in the driver, not on a Ray worker"
    mapped = Path(fits[0].read_text())
    assert mapped.parent.parent == cache / "outputs" and mapped.suffix == ".pt", \
        f"the worker's fit features are not mapped from an output-cache entry: {mapped}"
    assert list(frame.status) == ["done", "done"]
    metrics = [c for c in frame.columns if c.endswith(("|fpr", "|auroc"))]
    assert frame.loc["digits-cnn", metrics].equals(frame.loc["digits-cnn-copy", metrics])
