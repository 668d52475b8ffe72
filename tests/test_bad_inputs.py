"""A catalogue of bad inputs, each through the real CLI in a subprocess.

Every case must end with exit code 2, exactly one line on stderr that starts with
``oodbench: error:`` and names the problem (progress bars and ``warning:`` lines aside),
no traceback, and an existing results store left byte-for-byte and row-for-row as it was.

The cases run concurrently (a few subprocesses at a time) in two batches: those that fail
before any model is needed, and those that need the built-in model trained in the
session cache.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import pytest
import yaml

from tests.forked_cli import FORKED

PARALLEL = 2  # the machine's cores; each concurrent command holds a zygote (~6 CPU s to start)
TRUST_HINT_END = "only if you trust its source"  # the end of the --trust-checkpoint hint: the line is whole
BASE_CONFIG = {"benchmark": "digits", "models": ["digits-cnn"], "postprocessors": ["msp"], "search": False}
PROGRESS = re.compile(r"^[^|]*:\s*\d+%\|")  # a tqdm bar


@dataclass
class Case:
    id: str
    expect: tuple[str, ...]  # each must appear in the error line (case-insensitive)
    config: dict | str | None = field(default_factory=lambda: dict(BASE_CONFIG))  # None: no config file
    args: tuple[str, ...] = ("run", "{config}", "--results", "{store}")
    files: Callable[[Path], None] | None = None  # writes extra files into the case folder
    env: dict[str, str] = field(default_factory=dict)
    during: Callable[[Path], ContextManager] | None = None  # holds a resource while the CLI runs
    after: Callable[[Path], None] | None = None  # extra checks on the case folder
    needs_model: bool = False
    # Fails while scoring, after the run recorded which datasets it found: those rows are
    # rewritten with equal values and the time the data was last read, so the rows (less that
    # time) are compared but not the file's bytes.
    rewrites_dataset_rows: bool = False


def merged(**changes) -> dict:
    return {**BASE_CONFIG, **changes}


# --------------------------------------------------------------------------- file makers


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return make


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def mnist_files(images: bytes | None, labels: bytes | None) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        raw = folder / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        if images is not None:
            (raw / "t10k-images-idx3-ubyte").write_bytes(images)
        if labels is not None:
            (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return make


GOOD_IMAGES = idx_bytes(np.random.default_rng(0).integers(0, 255, (60, 28, 28)))
GOOD_LABELS = idx_bytes(np.arange(60) % 10)


def with_benchmark(definition: dict, then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        (folder / "bench.yaml").write_text(yaml.safe_dump(definition))
        if then is not None:
            then(folder)
    return make


def small_benchmark(id_dataset: dict) -> dict:
    """8x8 grey (the built-in model's input); ID from the data root, OOD from built-in noise."""
    return {"name": "tiny", "version": 1, "image": {"size": 8, "channels": 1}, "num_classes": 6,
            "id": {"test": id_dataset}, "near": {"noise": {"dataset": "gaussian_noise", "options": {"count": 20}}},
            "far": {}}


def data_config(**changes) -> dict:
    return merged(benchmark="{dir}/bench.yaml", data_root="{dir}/data", **changes)


def checkpoint_config(checkpoint: str) -> dict:
    return merged(models=[{"name": "cifar_resnet:resnet20", "checkpoint": checkpoint}])


def torch_file(relative: str, make_payload: Callable[[], object]) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        import torch

        torch.save(make_payload(), folder / relative)
    return make


def whole_module():
    from torch import nn

    return nn.Linear(2, 2)


def other_state_dict():
    from torch import nn

    return nn.Linear(2, 2).state_dict()


class TrainingState:
    """A class of the training code, saved beside the weights (as trainers often do)."""

    def __init__(self):
        self.epoch = 90


def weights_with(**extra) -> Callable[[], dict]:
    """A checkpoint dict: a state dict under 'state_dict' plus `extra` entries made on demand."""
    def make() -> dict:
        return {"state_dict": other_state_dict(), **{key: value() for key, value in extra.items()}}
    return make


def legacy_torch_file(relative: str) -> Callable[[Path], None]:
    """A whole module in torch.save's format from before PyTorch 1.6 (not a zip archive)."""
    def make(folder: Path) -> None:
        import torch

        torch.save(whole_module(), folder / relative, _use_new_zipfile_serialization=False)
    return make


def torchscript_file(relative: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated, its files are still around
            torch.jit.save(torch.jit.script(whole_module()), folder / relative)
    return make


def plain_pickle(relative: str) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        with open(folder / relative, "wb") as handle:
            pickle.dump(other_state_dict(), handle, protocol=4)
    return make


def no_extraction(folder: Path) -> None:
    """The run stopped before any model output was computed."""
    assert not (folder / "fresh-cache" / "outputs").exists(), "outputs were extracted before the error"


PLUGIN_RAISES = "raise RuntimeError('plugin bug at import')\n"
PLUGIN_WRONG_SHAPE = """
import oodbench

@oodbench.register_postprocessor("wrong_shape")
class WrongShape(oodbench.Postprocessor):
    def score(self, outputs):
        return outputs.logits  # N x C instead of N
"""

PLUGIN_BAD_SEARCH = """
import oodbench
from oodbench.postprocessors.base import Number

@oodbench.register_postprocessor("hot_margin")
class HotMargin(oodbench.Postprocessor):
    defaults = {"scale": 1.0}
    ranges = {"scale": Number(gt=0)}
    search_space = {"scale": [0.5, -1]}

    def score(self, outputs):
        return self.params["scale"] * outputs.logits.max(dim=1).values
"""

@contextmanager
def store_locked(folder: Path):
    """Another process holding the store's write lock for as long as the case runs."""
    code = ("import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / "results.sqlite")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


@contextmanager
def read_only_folder(folder: Path, holding: tuple[str, ...] = ()):
    """`folder/ro` that this process's user cannot write (chmod, or a read-only tmpfs for root),
    holding copies of the case folder's files named in `holding`."""
    target = folder / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        for name in holding:
            shutil.copy(folder / name, target / name)
            (target / name).chmod(0o444)
        target.chmod(0o555)
        try:
            yield
        finally:
            target.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root where no read-only folder can be made (mount refused)")
    try:
        for name in holding:
            shutil.copy(folder / name, target / name)
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(target)], check=False)


def read_only_store(folder: Path) -> ContextManager:
    """`folder/ro/results.sqlite`, a copy of the case's store, in a folder nobody can write."""
    return read_only_folder(folder, ("results.sqlite",))


@contextmanager
def not_ray(folder: Path):
    """A TCP port that accepts connections but is no Ray cluster (another service on that port)."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    (folder / "port").write_text(str(server.getsockname()[1]))
    try:
        yield
    finally:
        server.close()


def folder(relative: str) -> Callable[[Path], None]:
    def make(case_folder: Path) -> None:
        (case_folder / relative).mkdir(parents=True)
    return make


def jpeg_folder(truncated: bool) -> Callable[[Path], None]:
    """data/mine/<class>/NN.jpg, 8x8 grey JPEGs of 6 classes; with `truncated`, one cut short."""
    def make(case_folder: Path) -> None:
        from PIL import Image

        rng = np.random.default_rng(0)
        for index in range(24):
            path = case_folder / "data" / "mine" / f"c{index % 6}" / f"{index:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path, quality=90)
        if truncated:
            broken = case_folder / "data" / "mine" / "c3" / "09.jpg"
            broken.write_bytes(broken.read_bytes()[:120])
    return make


# --------------------------------------------------------------------------- the catalogue

RUN = ("run", "{config}", "--results", "{store}")

CASES = [
    # unknown names, with suggestions
    Case("unknown-postprocessor", ("unknown postprocessor 'mps'", "did you mean", "msp"),
         merged(postprocessors=["mps"])),
    Case("unknown-postprocessor-case", ("unknown postprocessor 'kNN'", "did you mean: knn"),
         merged(postprocessors=["kNN"])),
    Case("unknown-model-source", ("unknown model 'cifar_resnett'", "did you mean", "cifar_resnet"),
         merged(models=["cifar_resnett:resnet20"])),
    Case("unknown-builtin-model", ("unknown built-in model 'digits-cnm'", "did you mean", "digits-cnn"),
         merged(models=["digits-cnm"])),
    Case("unknown-benchmark", ("unknown benchmark 'digitz'", "did you mean", "digits"), merged(benchmark="digitz")),
    Case("unknown-dataset-source", ("unknown dataset 'sklearn_digit'", "near.noise", "sklearn_digits"),
         merged(benchmark="{dir}/bench.yaml"),
         files=with_benchmark({**small_benchmark({"dataset": "sklearn_digits"}),
                               "near": {"noise": {"dataset": "sklearn_digit"}}})),
    Case("unknown-hyperparameter", ("no hyperparameter 'temprature'", "did you mean", "temperature"),
         merged(postprocessors=["ebo"], params={"ebo": {"temprature": 2}})),
    Case("unknown-executor", ("unknown executor 'lokal'", "local"), args=RUN + ("--executor", "lokal")),
    Case("unknown-subcommand", ("invalid choice: 'runn'", "run"), config=None, args=("runn", "x.yaml")),
    Case("unknown-format", ("--format", "invalid choice: 'xml'", "markdown"), args=RUN + ("--format", "xml")),
    Case("unknown-list-kind", ("invalid choice: 'modelz'", "models"), config=None, args=("list", "modelz")),
    Case("unknown-fpr-convention", ("--fpr", "invalid choice: 'openod'", "openood"), config=None,
         args=("leaderboard", "--results", "{store}", "--fpr", "openod")),
    Case("unknown-reference", ("unknown reference 'openood-v15'", "did you mean: openood-v1.5"), config=None,
         args=("leaderboard", "--results", "{store}", "--reference", "openood-v15")),
    Case("unknown-device", ("unknown device 'banana'",), args=RUN + ("--device", "banana")),
    # YAML syntax, wrong types
    Case("yaml-syntax-error", ("invalid yaml", "line 3"), "benchmark: digits\nmodels: [digits-cnn\npostprocessors: [msp]\n"),
    Case("yaml-not-a-mapping", ("yaml mapping",), "- digits\n- msp\n"),
    Case("wrong-type-search", ("'search' must be a bool", "'yes please'"), merged(search="yes please")),
    Case("wrong-type-models", ("'models' must be a list",), merged(models="digits-cnn")),
    Case("wrong-type-batch-size-flag", ("--batch-size", "invalid int value"), args=RUN + ("--batch-size", "many")),
    Case("negative-batch-size", ("'batch_size' must be positive",), merged(batch_size=-4)),
    Case("bad-fit-split", ("'fit_split' must be one of", "train"), merged(fit_split="tran")),
    # unknown keys
    Case("unknown-experiment-key", ("unknown key 'postprocesors'", "did you mean", "postprocessors"),
         {k if k != "postprocessors" else "postprocesors": v for k, v in BASE_CONFIG.items()}),
    Case("unknown-model-key", ("models[0]", "unknown key 'checkpiont'", "checkpoint"),
         merged(models=[{"name": "digits-cnn", "checkpiont": "x.pt"}])),
    Case("unknown-benchmark-key", ("unknown key 'nearr'", "did you mean", "near"), merged(benchmark="{dir}/bench.yaml"),
         files=with_benchmark({**small_benchmark({"dataset": "sklearn_digits"}), "nearr": {}})),
    Case("duplicate-model-labels", ("two models share", "digits-cnn"), merged(models=["digits-cnn", "digits-cnn"])),
    # empty grids
    Case("no-models", ("'models' is empty",), merged(models=[])),
    Case("no-postprocessors", ("'postprocessors' is empty",), merged(postprocessors=[])),
    # missing or unreadable files
    Case("missing-config", ("config file not found", "nowhere.yaml"), config=None,
         args=("run", "{dir}/nowhere.yaml", "--results", "{store}")),
    Case("missing-benchmark-file", ("benchmark file not found", "gone.yaml"), merged(benchmark="{dir}/gone.yaml")),
    Case("missing-plugin-file", ("plugin file not found", "absent_plugin.py"), args=RUN + ("--plugin", "{dir}/absent_plugin.py")),
    Case("plugin-raises", ("plugin raising_plugin.py failed to import", "plugin bug at import"),
         args=RUN + ("--plugin", "{dir}/raising_plugin.py"), files=write("raising_plugin.py", PLUGIN_RAISES)),
    Case("missing-checkpoint", ("checkpoint not found", "absent.th"), checkpoint_config("{dir}/absent.th")),
    Case("corrupt-checkpoint", ("garbage.th", "not a readable pytorch checkpoint"), checkpoint_config("{dir}/garbage.th"),
         files=write("garbage.th", bytes(range(256)) * 8)),
    Case("html-checkpoint", ("page.th", "html page"), checkpoint_config("{dir}/page.th"),
         files=write("page.th", "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")),
    Case("checkpoint-needs-unpickling", ("module.th", "needs full unpickling", "--trust-checkpoint"),
         checkpoint_config("{dir}/module.th"), files=torch_file("module.th", whole_module)),
    Case("checkpoint-wrong-architecture", ("linear.th", "does not fit cifar_resnet:resnet20"),
         checkpoint_config("{dir}/linear.th"), files=torch_file("linear.th", other_state_dict)),
    # checkpoints that need full unpickling, through each model source: named as such, never "corrupt",
    # and the line ends with the whole hint
    Case("checkpoint-custom-class-in-dict", ("custom.th", "needs full unpickling", "TrainingState",
                                             "--trust-checkpoint", TRUST_HINT_END),
         checkpoint_config("{dir}/custom.th"), files=torch_file("custom.th", weights_with(trainer=TrainingState))),
    Case("checkpoint-namespace-openood", ("best.ckpt", "needs full unpickling", "argparse.Namespace",
                                          "--trust-checkpoint", TRUST_HINT_END),
         merged(models=[{"name": "openood:lenet", "checkpoint": "{dir}/best.ckpt"}]),
         files=torch_file("best.ckpt", weights_with(args=lambda: argparse.Namespace(lr=0.1)))),
    Case("checkpoint-numpy-timm", ("timm.pth", "needs full unpickling", "numpy", "--trust-checkpoint",
                                   TRUST_HINT_END),
         merged(models=[{"name": "timm:resnet18", "checkpoint": "{dir}/timm.pth"}]),
         files=torch_file("timm.pth", weights_with(best_acc=lambda: np.float64(93.1)))),
    Case("checkpoint-whole-module-torch-source", ("net.pt", "needs full unpickling", "torch.nn.modules.linear.Linear",
                                                  "--trust-checkpoint", TRUST_HINT_END),
         merged(models=["torch:{dir}/net.pt"]), files=torch_file("net.pt", whole_module)),
    Case("checkpoint-legacy-format", ("legacy.th", "needs full unpickling", "--trust-checkpoint", TRUST_HINT_END),
         checkpoint_config("{dir}/legacy.th"), files=legacy_torch_file("legacy.th")),
    Case("checkpoint-torchscript", ("scripted.pt", "torchscript archive", "--trust-checkpoint", TRUST_HINT_END),
         merged(models=["torch:{dir}/scripted.pt"]), files=torchscript_file("scripted.pt")),
    Case("checkpoint-plain-pickle", ("weights.pkl", "plain python pickle", "torch.save"),
         checkpoint_config("{dir}/weights.pkl"), files=plain_pickle("weights.pkl")),
    # hyperparameters: checked by `validate` and by `run` before any extraction, one line naming the
    # method, the parameter and what it accepts
    Case("hyperparameter-negative", ("postprocessor 'ebo'", "temperature=-1 is not allowed", "a number > 0"),
         merged(postprocessors=["ebo"], params={"ebo": {"temperature": -1}}), env={"OODBENCH_CACHE": "{dir}/fresh-cache"},
         after=no_extraction),
    Case("hyperparameter-zero", ("postprocessor 'ebo'", "temperature=0 is not allowed", "a number > 0"),
         merged(postprocessors=["ebo"], params={"ebo": {"temperature": 0}}), env={"OODBENCH_CACHE": "{dir}/fresh-cache"},
         after=no_extraction),
    Case("hyperparameter-not-a-number", ("postprocessor 'ebo'", "temperature='hot' is not allowed", "a number > 0"),
         merged(postprocessors=["ebo"], params={"ebo": {"temperature": "hot"}}),
         env={"OODBENCH_CACHE": "{dir}/fresh-cache"}, after=no_extraction),
    Case("hyperparameter-not-an-integer", ("postprocessor 'pro_msp'", "K=1.5 is not allowed", "an integer >= 0"),
         merged(postprocessors=["pro_msp"], params={"pro_msp": {"K": 1.5}}),
         env={"OODBENCH_CACHE": "{dir}/fresh-cache"}, after=no_extraction),
    Case("hyperparameter-out-of-range", ("postprocessor 'react'", "percentile=101 is not allowed", "[0, 100]"),
         merged(postprocessors=["react"], params={"react": {"percentile": 101}}),
         env={"OODBENCH_CACHE": "{dir}/fresh-cache"}, after=no_extraction),
    Case("hyperparameter-not-a-choice", ("postprocessor 'ash'", "variant='x' is not allowed", "one of 'b', 'p', 's'"),
         merged(postprocessors=["ash"], params={"ash": {"variant": "x"}}),
         env={"OODBENCH_CACHE": "{dir}/fresh-cache"}, after=no_extraction),
    Case("searched-value-out-of-range", ("postprocessor 'hot_margin'", "scale=-1 (searched in HotMargin.search_space)",
                                         "is not allowed", "a number > 0"),
         merged(postprocessors=["hot_margin"], plugins=["{dir}/hot_plugin.py"], search=True),
         files=write("hot_plugin.py", PLUGIN_BAD_SEARCH), env={"OODBENCH_CACHE": "{dir}/fresh-cache"},
         after=no_extraction),
    Case("validate-searched-value", ("postprocessor 'hot_margin'", "scale=-1 (searched in HotMargin.search_space)"),
         merged(postprocessors=["hot_margin"], plugins=["{dir}/hot_plugin.py"], search=True),
         files=write("hot_plugin.py", PLUGIN_BAD_SEARCH), args=("validate", "{config}")),
    Case("validate-hyperparameter", ("postprocessor 'gen'", "gamma=0 is not allowed", "a number > 0"),
         merged(postprocessors=["gen"], params={"gen": {"gamma": 0}}), args=("validate", "{config}")),
    Case("validate-unknown-hyperparameter", ("postprocessor 'ebo'", "no hyperparameter 'temp'",
                                             "temperature (a number > 0)"),
         merged(postprocessors=["ebo"], params={"ebo": {"temp": 2}}), args=("validate", "{config}")),
    # files that are not what the option takes
    Case("plugin-not-python", ("notes.txt", "not a python file", ".py"), args=RUN + ("--plugin", "{dir}/notes.txt"),
         files=write("notes.txt", "my plugin ideas\n")),
    Case("plot-no-samples", ("--samples", "must be at least 1, got 0"),
         args=("plot", "features", "{config}", "--samples", "0")),
    # the results store and the machine
    Case("corrupt-store", ("cannot open results store", "not a database"),
         files=write("results.sqlite", b"this is not an SQLite file" * 100)),
    Case("corrupt-store-leaderboard", ("cannot open results store", "not a database"), config=None,
         args=("leaderboard", "--results", "{store}"), files=write("results.sqlite", b"garbage, not SQLite " * 100)),
    Case("missing-store-leaderboard", ("results store not found", "absent.sqlite"), config=None,
         args=("leaderboard", "--results", "{dir}/absent.sqlite")),
    Case("locked-store", ("results.sqlite", "database is locked", "OODBENCH_DB_TIMEOUT"),
         env={"OODBENCH_DB_TIMEOUT": "0.5"}, during=store_locked),
    Case("bad-db-timeout", ("OODBENCH_DB_TIMEOUT must be a number",), env={"OODBENCH_DB_TIMEOUT": "soon"}),
    Case("read-only-results-folder", ("cannot open results store", "ro/results.sqlite"),
         args=("run", "{config}", "--results", "{dir}/ro/results.sqlite"), during=read_only_folder),
    # files of the wrong kind, folders, read-only places, unreachable services (issue 23)
    Case("checkpoint-yaml-text", ("settings.yaml", "a text file", "not a pytorch checkpoint"),
         checkpoint_config("{dir}/settings.yaml"), files=write("settings.yaml", "benchmark: digits\nmodels: [a]\n")),
    Case("checkpoint-directory", ("weights", "is a folder, not a checkpoint file"), checkpoint_config("{dir}/weights"),
         files=folder("weights")),
    Case("config-directory", ("configs", "is a folder, not a config file"), config=None,
         args=("run", "{dir}/configs", "--results", "{store}"), files=folder("configs")),
    Case("benchmark-directory", ("benches", "is a folder, not a benchmark file"), merged(benchmark="{dir}/benches"),
         files=folder("benches")),
    Case("leaderboard-unknown-model", ("no results for model 'resnet99'", "it has results for: digits-cnn"),
         config=None, args=("leaderboard", "--results", "{store}", "--model", "resnet99")),
    Case("leaderboard-unknown-postprocessor", ("no results for postprocessor 'emsp'", "msp"),
         config=None, args=("leaderboard", "--results", "{store}", "--postprocessor", "emsp")),
    Case("read-only-store-run", ("ro/results.sqlite", "read-only", "--results"),
         args=("run", "{config}", "--results", "{dir}/ro/results.sqlite"), during=read_only_store),
    Case("leaderboard-output-missing-folder", ("cannot write", "absent/table.txt", "folder", "does not exist"),
         config=None, args=("leaderboard", "--results", "{store}", "--output", "{dir}/absent/table.txt")),
    Case("export-output-missing-folder", ("cannot write", "absent/cells.csv", "folder", "does not exist"),
         config=None, args=("results", "{store}", "export", "--output", "{dir}/absent/cells.csv")),
    Case("cache-dir-is-a-file", ("cache", "cachefile", "is a file, not a folder"),
         args=RUN + ("--cache-dir", "{dir}/cachefile"), files=write("cachefile", "x")),
    Case("cache-dir-read-only", ("cache", "ro", "read-only", "--cache-dir"),
         args=RUN + ("--cache-dir", "{dir}/ro"), during=read_only_folder),
    Case("ray-address-unreachable", ("cannot reach the ray cluster at 127.0.0.1:1",),
         args=RUN + ("--executor", "ray", "--ray-address", "127.0.0.1:1")),
    Case("ray-address-not-ray", ("cannot join the ray cluster at 127.0.0.1:",),
         args=RUN + ("--executor", "ray", "--ray-address", "127.0.0.1:{port}"), during=not_ray,
         env={"OODBENCH_RAY_TIMEOUT": "4"}),
    # ---- these need the built-in model: they fail while reading data or scoring
    Case("missing-data-root", ("data root /no/such/root does not exist", "mnist file not found",
                               "/no/such/root/MNIST/raw/t10k-images-idx3-ubyte",
                               "oodbench data fetch"),
         data_config(), args=RUN + ("--data-root", "/no/such/root"),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}})), needs_model=True),
    Case("missing-dataset-file", ("mnist file not found", "t10k-images-idx3-ubyte"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}}),
                              mnist_files(None, GOOD_LABELS)), needs_model=True),
    Case("truncated-dataset-file", ("t10k-images-idx3-ubyte", "truncated"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}}),
                              mnist_files(GOOD_IMAGES[:12], GOOD_LABELS)), needs_model=True),
    Case("short-dataset-file", ("t10k-images-idx3-ubyte", "holds"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}}),
                              mnist_files(GOOD_IMAGES[:-500], GOOD_LABELS)), needs_model=True),
    Case("wrong-format-dataset-file", ("t10k-images-idx3-ubyte", "magic number"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}}),
                              mnist_files(b"\x89PNG\r\n\x1a\n" + bytes(100), GOOD_LABELS)), needs_model=True),
    Case("corrupt-cifar-pickle", ("test_batch", "cannot read"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "cifar10", "options": {"split": "test"}}),
                              write("data/cifar-10-batches-py/test_batch", b"\x80\x04garbage" * 50)), needs_model=True),
    Case("image-list-names-missing-file", ("list.txt line 2", "b.png", "does not exist"), data_config(),
         files=with_benchmark(small_benchmark({"dataset": "imglist", "options": {"list": "list.txt"}}),
                              lambda d: (write("data/list.txt", "a.png 0\nb.png 1\n")(d),
                                         write("data/images_classic/a.png", b"")(d))), needs_model=True),
    Case("plugin-wrong-shape", ("postprocessor 'wrong_shape'", "shape [", "one score per sample"),
         merged(postprocessors=["wrong_shape"], plugins=["{dir}/shape_plugin.py"]),
         files=write("shape_plugin.py", PLUGIN_WRONG_SHAPE), needs_model=True, rewrites_dataset_rows=True),
    Case("data-root-is-a-file", ("data root", "rootfile", "is a file, not a folder"),
         data_config(), args=RUN + ("--data-root", "{dir}/rootfile"),
         files=with_benchmark(small_benchmark({"dataset": "mnist", "options": {"split": "test"}}),
                              write("rootfile", "x")), needs_model=True),
    Case("empty-part", ("the 'test' part of", "mine/ (24 images) has no images", "test the rest, val 24",
                        "none of the 24"),
         data_config(), files=with_benchmark(small_benchmark(
             {"dataset": "image_folder", "options": {"path": "mine"}, "parts": {"val": 24, "test": "rest"},
              "part": "test"}), jpeg_folder(truncated=False)), needs_model=True),
    Case("parts-too-large", ("the parts (test the rest, val 30) ask for more than the 24 images available",),
         data_config(), files=with_benchmark(small_benchmark(
             {"dataset": "image_folder", "options": {"path": "mine"}, "parts": {"val": 30, "test": "rest"},
              "part": "test"}), jpeg_folder(truncated=False)), needs_model=True),
    Case("truncated-jpeg-in-a-worker", ("cannot decode image", "c3/09.jpg"),
         data_config(), args=RUN + ("--num-workers", "1"),
         files=with_benchmark(small_benchmark({"dataset": "image_folder", "options": {"path": "mine"}}),
                              jpeg_folder(truncated=True)), needs_model=True, rewrites_dataset_rows=True),
]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    store_before: tuple[str, str]  # (bytes, rows)
    store_after: tuple[str, str]
    folder: Path


def fill(value: str, folder: Path) -> str:
    if "{port}" in value:  # written by the case's `during`
        value = value.replace("{port}", (folder / "port").read_text())
    return value.replace("{dir}", str(folder)).replace("{store}", str(folder / "results.sqlite")).replace(
        "{config}", str(folder / "experiment.yaml"))


def fill_all(value, folder: Path):
    if isinstance(value, str):
        return fill(value, folder)
    if isinstance(value, list):
        return [fill_all(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: fill_all(v, folder) for k, v in value.items()}
    return value


def store_fingerprint(path: Path) -> tuple[str, str]:
    """Digests of the store file's bytes and, when it is a database, of every row of every table
    (the datasets rows without `created`: the time a run last read that data, not a result)."""
    if not path.exists():
        return "absent", "absent"
    rows = hashlib.sha256()
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            cursor = db.execute(f"SELECT * FROM {table}")
            names = [column[0] for column in cursor.description]
            kept = [i for i, name in enumerate(names) if not (table == "datasets" and name == "created")]
            rows.update(repr(sorted(([row[i] for i in kept] for row in cursor), key=repr)).encode())
        db.close()
    except sqlite3.DatabaseError:
        rows.update(b"not a database")
    return hashlib.sha256(path.read_bytes()).hexdigest(), rows.hexdigest()


def make_template_store(path: Path) -> None:
    """A store holding one finished cell, written through the store's API."""
    from oodbench.storage.store import Cell, ResultStore

    store = ResultStore(path)
    store.write_datasets("digits", "digits-cnn", [{"dataset": "id:test", "group": "id", "status": "present",
                                                   "samples": 216, "accuracy": 1.0}])
    store.write_cell(Cell("digits", "digits-cnn", "msp", "default", params={}, provenance={"benchmark_version": 1},
                          metrics={"id_test": {"acc": 1.0}, "noise": {"auroc": 0.9, "fpr95": 0.2}},
                          groups={"id_test": "id", "noise": "far"}))
    store.close()


def run_case(case: Case, folder: Path, template: Path, session_cache: Path) -> Outcome:
    folder.mkdir(parents=True)
    shutil.copy(template, folder / "results.sqlite")
    if case.files is not None:
        case.files(folder)
    if isinstance(case.config, dict):
        (folder / "experiment.yaml").write_text(yaml.safe_dump(fill_all(case.config, folder)))
    elif isinstance(case.config, str):
        (folder / "experiment.yaml").write_text(case.config)
    env = {**os.environ, "OODBENCH_CACHE": str(session_cache), **fill_all(case.env, folder)}
    env.pop("PYTHONWARNINGS", None)
    store = folder / "results.sqlite"
    before = store_fingerprint(store)
    with (case.during(folder) if case.during else nullcontext()):
        args = [fill(a, folder) for a in case.args]  # after `during`, which may write what they name
        done = FORKED.run(args, cwd=folder, env=env, timeout=300)
    return Outcome(done.returncode, done.stdout, done.stderr, before, store_fingerprint(store), folder)


def make_real_store(path: Path, cache: Path) -> None:
    """The store a real run of the built-in model with MSP leaves."""
    from oodbench.benchmark.runner import run_experiment

    run_experiment(dict(BASE_CONFIG, results=str(path)), quiet=True, cache_dir=str(cache))


def run_batch(cases: list[Case], root: Path, session_cache: Path, real_store: bool = False) -> dict[str, Outcome]:
    template = root / "template.sqlite"
    make_real_store(template, session_cache) if real_store else make_template_store(template)

    def one(case: Case):
        try:
            return run_case(case, root / case.id, template, session_cache)
        except BaseException as exc:  # pytest.skip included: reported by the case's own test
            return exc

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(zip([c.id for c in cases], pool.map(one, cases)))


@pytest.fixture(scope="module")
def trained_cache(session_cache) -> Path:
    """The session cache with the built-in `digits-cnn` trained into it."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    load_model(ModelSpec("digits-cnn"), ModelContext(cache_dir=session_cache, data_root=session_cache))
    return session_cache


def selected(request, needs_model: bool) -> list[Case]:
    """The cases of one batch that this pytest session runs (all, unless deselected)."""
    chosen = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    return [c for c in CASES if c.needs_model == needs_model and c.id in chosen]


@pytest.fixture(scope="module")
def cheap_outcomes(request, tmp_path_factory, session_cache):
    start = time.time()
    outcomes = run_batch(selected(request, False), tmp_path_factory.mktemp("bad-cheap"), session_cache)
    print(f"\n{len(outcomes)} cheap bad-input cases in {time.time() - start:.1f} s")
    return outcomes


@pytest.fixture(scope="module")
def model_outcomes(request, tmp_path_factory, trained_cache):
    start = time.time()
    outcomes = run_batch(selected(request, True), tmp_path_factory.mktemp("bad-model"), trained_cache, real_store=True)
    print(f"\n{len(outcomes)} bad-input cases with a model in {time.time() - start:.1f} s")
    return outcomes


def error_line(stderr: str) -> list[str]:
    """The lines of stderr that are neither progress bars nor warnings."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]
    return [line for line in lines if not PROGRESS.match(line) and not line.startswith("warning: ")]


def test_catalogue_size():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, request):
    outcomes = request.getfixturevalue("model_outcomes" if case.needs_model else "cheap_outcomes")
    outcome = outcomes[case.id]
    if isinstance(outcome, BaseException):
        raise outcome
    shown = f"exit {outcome.returncode}\nstdout: {outcome.stdout[-2000:]}\nstderr: {outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr + outcome.stdout, shown
    assert outcome.returncode == 2, shown
    lines = error_line(outcome.stderr)
    assert len(lines) == 1, shown
    assert lines[0].startswith("oodbench: error: "), shown
    for needle in case.expect:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    compared = slice(1, 2) if case.rewrites_dataset_rows else slice(0, 2)
    assert outcome.store_after[compared] == outcome.store_before[compared], \
        "the failed command changed the existing results store"
    if case.after is not None:
        case.after(outcome.folder)


# --------------------------------------------------------------------------- a plugin's own failure; --debug

PLUGIN_FIT_RAISES = '''import oodbench


@oodbench.register_postprocessor("exploding")
class Exploding(oodbench.Postprocessor):
    needs_fit = True

    def fit(self, train_outputs, val_outputs):
        raise ValueError("my fit exploded")

    def score(self, outputs):
        return outputs.logits.max(dim=1).values
'''


def test_a_failing_plugin_is_named_by_file_and_line_and_debug_shows_tracebacks(trained_cache, tmp_path):
    plugin = tmp_path / "exploding.py"
    plugin.write_text(PLUGIN_FIT_RAISES)
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(merged(postprocessors=["msp", "exploding"], plugins=[str(plugin)],
                                            fit_split="val")))
    env = {**os.environ, "OODBENCH_CACHE": str(trained_cache)}
    env.pop("OODBENCH_DEBUG", None)
    done = FORKED.run(["run", config, "--results", tmp_path / "a.sqlite"], cwd=tmp_path, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "exploding: failed: ValueError: my fit exploded (exploding.py, line 9, in fit)" in " ".join(
        done.stdout.split()), done.stdout
    for flag, extra in ((["--debug"], {}), ([], {"OODBENCH_DEBUG": "1"})):
        shown = FORKED.run([*flag, "run", config, "--results", tmp_path / f"b{len(flag)}.sqlite"], cwd=tmp_path,
                           env={**env, **extra})
        assert shown.returncode == 0 and "Traceback (most recent call last)" in shown.stderr, shown.stderr[-2000:]
        assert f'File "{plugin}", line 9, in fit' in shown.stderr
    # any error: the traceback above the one line, which stays last
    bad = FORKED.run(["--debug", "run", config, "--results", tmp_path / "c.sqlite", "--postprocessors", "mps"],
                     cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "Traceback (most recent call last)" in bad.stderr
    assert error_line(bad.stderr)[-1].startswith("oodbench: error: unknown postprocessor 'mps'")
