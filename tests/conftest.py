"""Shared fixtures: a session-wide output cache with the built-in models trained once,
a helper that runs the real CLI in a subprocess, and the ../shared data root."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.forked_cli import FORKED

# The tests' own process runs small networks and many small tensor operations: on a 2-core
# machine a second torch thread costs about 60% more CPU for the same wall time. CLI
# commands (tests/forked_cli.py) keep the default, one thread per core, as a user's would.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
SHARED_MODELS = SHARED / "models"

requires_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"real data not found at {SHARED} (developers' and CI's ../shared; absent in a user's clone)",
)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """An output cache shared by the whole session; the built-in models train into it once."""
    return tmp_path_factory.mktemp("oodbench-cache")


@pytest.fixture(scope="session")
def digits_models(session_cache):
    """The two built-in models, trained (or loaded) once per session."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    context = ModelContext(cache_dir=session_cache, data_root=session_cache)
    return {name: load_model(ModelSpec(name), context) for name in ("digits-cnn", "digits-cnn-robust")}


@pytest.fixture(scope="session", autouse=True)
def early_runs(request, tmp_path_factory, session_cache):
    """Long commands started in the background before the first test, so that they run on
    the core the rest of the suite leaves free. A selected test function with a
    ``start_early(folder, cache) -> ForkedProcess | None`` attribute has it called with a
    folder of its own and the session's output cache; the test reads its process from here
    by the test's name (None: nothing to start, the test skips). Any still running when the
    session ends are killed."""
    runs = {}
    for item in request.session.items:
        start = getattr(getattr(item, "function", None), "start_early", None)
        if start is not None and item.name not in runs:
            process = start(tmp_path_factory.mktemp("early"), session_cache)
            if process is not None:
                runs[item.name] = process
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)


@pytest.fixture
def run_cli(session_cache, tmp_path):
    """Run `oodbench ARGS...` in a process of its own (cwd = a temp dir; see forked_cli.py);
    returns CompletedProcess."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
        environment = {**os.environ, "OODBENCH_CACHE": str(session_cache)}
        environment.update(env or {})
        return FORKED.run(args, cwd=cwd or tmp_path, env=environment, timeout=timeout)

    return run


# Methods the digits CNNs cannot use, and the words of the one-line error saying why: BATS reads
# the last BatchNorm over the penultimate channels (digits-cnn's has 32, its features 128); its
# contract is tested on a network that has one (tests/test_compose.py).
NOT_ON_DIGITS = {"bats": "needs the model's last BatchNorm over the 128 penultimate channels"}


def digits_config(tmp_path: Path, **overrides) -> Path:
    """Write a digits experiment YAML into tmp_path and return its path."""
    import yaml

    config = {"benchmark": "digits", "models": [{"name": "digits-cnn", "tags": ["standard"]}],
              "postprocessors": ["msp", "ebo"], "search": False,
              "results": str(tmp_path / "results.sqlite")}
    config.update(overrides)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def compact_rows(text: str) -> list[dict[str, str]]:
    """The rows of the compact table, cut at its columns (the dashes under the header); the
    model, printed on a block's first row only, is carried down its block."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line) <= {"-", " "})
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    names = [lines[rule - 1][a:b].strip() for a, b in spans]
    rows, model = [], ""
    for line in lines[rule + 1:]:
        if not line.strip():
            continue
        if line.startswith(("robust vs", "- ")):
            break
        cells = [line[a:b].strip() for a, b in spans]
        model = cells[0] or model
        rows.append({**dict(zip(names, cells)), "model": model})
    return rows
