"""Open-set recognition benchmarks (osr_mnist6 / osr_cifar6 / osr_cifar50 / osr_tin20,
seeds 1-5): the class lists against ARPL's split.py (the splits OpenOOD's OSR lists
follow), the known-class relabelling on tiny idx files, the seed average, and the real
check: OpenOOD's five MNIST-6 LeNets on the real MNIST test set through the CLI."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import SHARED_DATA, SHARED_MODELS, requires_shared
from oodbench.datasets.benchmarks import BENCHMARK_DIR, load_benchmark
from oodbench.datasets.base import DatasetRef, load_source
from oodbench.datasets.transform import ImageSpec
from oodbench.report.seeds import average_over_seeds

# ARPL split.py, splits_2020 (iCGY96/ARPL), copied by hand: known classes in label order.
ARPL = {
    "osr_mnist6": [[2, 4, 5, 9, 8, 3], [3, 2, 6, 9, 4, 0], [5, 8, 3, 2, 4, 6], [3, 7, 8, 4, 0, 5],
                   [6, 3, 4, 9, 8, 2]],
    "osr_cifar6": [[0, 6, 4, 9, 1, 7], [7, 6, 4, 9, 0, 1], [1, 5, 7, 3, 9, 4], [8, 6, 1, 9, 0, 7],
                   [2, 4, 1, 7, 9, 6]],
    "osr_cifar50": [
        [27, 94, 29, 77, 88, 26, 69, 48, 75, 5, 59, 93, 39, 57, 45, 40, 78, 20, 98, 47, 66, 70, 91, 76, 41,
         83, 99, 32, 53, 72, 2, 95, 21, 73, 84, 68, 35, 11, 55, 60, 30, 25, 1, 9, 8, 0, 46, 52, 49, 71],
        [65, 97, 86, 24, 45, 67, 2, 3, 91, 98, 79, 29, 62, 82, 33, 76, 0, 35, 5, 16, 54, 11, 99, 52, 85,
         1, 25, 66, 28, 84, 23, 56, 75, 46, 21, 72, 55, 68, 8, 69, 41, 9, 49, 40, 73, 60, 48, 30, 95, 71],
        [20, 83, 65, 97, 94, 2, 93, 16, 67, 29, 62, 33, 24, 98, 5, 86, 35, 54, 0, 91, 52, 66, 85, 84, 56,
         11, 1, 76, 25, 55, 21, 99, 72, 41, 23, 75, 28, 68, 69, 46, 8, 9, 49, 40, 73, 60, 48, 95, 30, 71],
        [92, 82, 77, 64, 5, 33, 62, 56, 70, 0, 20, 28, 67, 14, 84, 53, 91, 29, 85, 2, 52, 83, 75, 35, 11,
         21, 72, 98, 55, 1, 41, 76, 25, 66, 69, 9, 48, 54, 40, 23, 95, 60, 30, 73, 46, 49, 68, 99, 8, 71],
        [47, 6, 19, 0, 62, 93, 59, 65, 54, 70, 34, 55, 23, 38, 72, 76, 53, 31, 78, 96, 77, 27, 92, 18, 82,
         50, 98, 32, 1, 75, 83, 4, 51, 35, 80, 11, 74, 66, 36, 42, 33, 2, 3, 97, 46, 21, 64, 63, 88, 43]],
    "osr_tin20": [
        [108, 147, 17, 58, 193, 123, 72, 144, 75, 167, 134, 14, 81, 171, 44, 197, 152, 66, 1, 133],
        [198, 161, 91, 59, 57, 134, 61, 184, 90, 35, 29, 23, 199, 38, 133, 19, 186, 18, 85, 67],
        [177, 0, 119, 26, 78, 80, 191, 46, 134, 92, 31, 152, 27, 60, 114, 50, 51, 133, 162, 93],
        [98, 36, 158, 177, 189, 157, 170, 191, 82, 196, 138, 166, 43, 13, 152, 11, 75, 174, 193, 190],
        [95, 6, 145, 153, 0, 143, 31, 23, 189, 81, 20, 21, 89, 26, 36, 170, 102, 177, 108, 169]],
}
SOURCES = {"osr_mnist6": ("mnist", 10), "osr_cifar6": ("cifar10", 10), "osr_cifar50": ("cifar100", 100),
           "osr_tin20": ("tiny_imagenet", 200)}


def _fallback(ref: DatasetRef) -> dict:
    """The raw-release candidate (class_split) of an any_of split."""
    return next(c for c in ref.options["candidates"] if c["dataset"] == "class_split")


@pytest.mark.parametrize("family", sorted(ARPL))
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_benchmark_class_lists_match_arpl(family, seed):
    known = ARPL[family][seed - 1]
    source, total = SOURCES[family]
    raw = yaml.safe_load((BENCHMARK_DIR / f"{family}_seed{seed}.yaml").read_text())
    benchmark = load_benchmark(f"{family}_seed{seed}")
    assert benchmark.num_classes == len(known)
    assert raw["definitions"]["known"] == known
    for split in ("train", "val", "test"):
        options = _fallback(benchmark.id_splits[split])["options"]
        assert options["classes"] == known and options["keep"] == "known"
        assert options["source"]["dataset"] == source
    (ood,) = benchmark.near.values()
    options = _fallback(ood)["options"]
    assert options["classes"] == known and options["keep"] == "unknown"
    assert not benchmark.far
    lists = [c["options"]["list"] for ref in [*benchmark.id_splits.values(), ood]
             for c in ref.options["candidates"] if c["dataset"] == "imglist"]
    assert len(lists) == 4 and all(f"{family}/" in path and path.endswith(f"_seed{seed}.txt") for path in lists)
    assert all(0 <= c < total for c in known)


def _write_idx(path, array: np.ndarray, code: int) -> None:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """A 30-image MNIST test set: image i is filled with value i, label i % 10."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.repeat(np.arange(30, dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images, 0x08)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", (np.arange(30) % 10).astype(np.uint8), 0x08)
    return tmp_path


def test_class_split_relabels_known_classes_in_list_order(tiny_mnist):
    known = [2, 4, 5, 9, 8, 3]
    source = {"dataset": "mnist", "options": {"split": "test"}}
    spec = ImageSpec(28, 1)
    ids = load_source(DatasetRef("class_split", {"source": source, "classes": known, "keep": "known"}),
                      tiny_mnist, spec)
    expected = [i for i in range(30) if i % 10 in known]
    assert [int(ids[k][0][0, 0]) for k in range(len(ids))] == expected  # source order kept
    assert [ids[k][1] for k in range(len(ids))] == [known.index(i % 10) for i in expected]
    ood = load_source(DatasetRef("class_split", {"source": source, "classes": known, "keep": "unknown"}),
                      tiny_mnist, spec)
    assert [ood[k][1] for k in range(len(ood))] == [i % 10 for i in range(30) if i % 10 not in known]


def test_class_split_errors_are_one_line(tiny_mnist):
    from oodbench.errors import OodbenchError

    source = {"dataset": "mnist", "options": {"split": "test"}}
    for options, message in [({"classes": [1, 1]}, "twice"), ({"classes": [11]}, "no samples"),
                             ({"classes": [1], "keep": "all"}, "known or unknown")]:
        with pytest.raises(OodbenchError, match=message):
            load_source(DatasetRef("class_split", {"source": source, **options}), tiny_mnist, ImageSpec(28, 1))


def test_average_over_seeds():
    rows = [{"benchmark": f"osr_x_seed{s}", "model": "m", "postprocessor": "msp", "setting": "default",
             "dataset": "d", "group": "near", "metric": "auroc", "value": v, "fpr_convention": ""}
            for s, v in [(1, 0.9), (2, 0.8), (3, 0.7)]]
    rows.append({**rows[0], "benchmark": "cifar10"})
    (row,) = average_over_seeds(rows)
    assert row["benchmark"] == "osr_x" and row["seeds"] == [1, 2, 3]
    assert row["mean"] == pytest.approx(0.8) and row["std"] == pytest.approx(0.1)


def test_leaderboard_averages_seeds_through_cli(run_cli, tmp_path):
    """A store holding fam_seed1..3 (and another benchmark): `--benchmark fam` and
    `--average-seeds` give one row per method with the mean ± sample std over the seeds."""
    from oodbench.storage.store import Cell, ResultStore

    store = ResultStore(tmp_path / "r.sqlite")
    aurocs = {1: 0.90, 2: 0.80, 3: 0.70}
    for seed, value in aurocs.items():
        benchmark = f"fam_seed{seed}"
        store.write_datasets(benchmark, "m", [{"dataset": "unknown", "group": "near", "status": "present",
                                               "samples": 10, "fingerprint": f"d{seed}"}], f"data{seed}")
        metrics = {"auroc": value, "fpr95": 1 - value, "fpr95_openood": 1 - value, "aupr_in": value, "aupr_out": value}
        store.write_cell(Cell(benchmark=benchmark, model="m", postprocessor="msp", setting="default",
                              fingerprint=f"cell{seed}", data_fingerprint=f"data{seed}", groups={"unknown": "near",
                              "id_test": "id"}, metrics={"id_test": {"acc": 0.9 + seed / 100}, "unknown": metrics}))
    store.write_datasets("other", "m", [{"dataset": "x", "group": "far", "status": "present", "samples": 5,
                                         "fingerprint": "dx"}], "datax")
    store.write_cell(Cell(benchmark="other", model="m", postprocessor="msp", setting="default", fingerprint="cellx",
                          data_fingerprint="datax", groups={"x": "far", "id_test": "id"},
                          metrics={"id_test": {"acc": 0.5}, "x": {"auroc": 0.6, "fpr95": 0.4}}))
    store.close()
    table = run_cli("leaderboard", "--results", tmp_path / "r.sqlite", "--benchmark", "fam")
    assert table.returncode == 0, table.stderr
    assert "80.00±10.00" in table.stdout and "92.00±1.00" in table.stdout  # AUROC and ACC over seeds 1-3
    assert "over seeds 1, 2, 3" in " ".join(table.stdout.split())
    every = run_cli("leaderboard", "--results", tmp_path / "r.sqlite", "--average-seeds", "--format", "json")
    rows = {(r["benchmark"], r["dataset"], r["metric"]): r for r in json.loads(every.stdout)}
    assert rows[("fam", "unknown", "auroc")]["value"] == pytest.approx(0.8)
    assert rows[("fam", "unknown", "auroc")]["std"] == pytest.approx(0.1)
    assert rows[("fam", "unknown", "auroc")]["seeds"] == "1,2,3" and rows[("other", "x", "auroc")]["value"] == 0.6
    refused = run_cli("leaderboard", "--results", tmp_path / "r.sqlite", "--benchmark", "fam", "--ci")
    assert refused.returncode == 2 and "--benchmark <family>_seed<N>" in refused.stderr


# ----------------------------------------------------------------------------- real data


def _mnist_test() -> tuple[torch.Tensor, np.ndarray]:
    with gzip.open(SHARED_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", "rb") as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(SHARED_DATA / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz", "rb") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return torch.from_numpy(images.copy()).float() / 255, labels


@requires_shared
def test_osr_lenets_predict_known_digits_in_split_order(tmp_path):
    """Each real OpenOOD MNIST-6 LeNet predicts known digit classes[i] as class i."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    images, labels = _mnist_test()
    context = ModelContext(cache_dir=tmp_path, data_root=SHARED_DATA)
    for seed, known in enumerate(ARPL["osr_mnist6"], start=1):
        checkpoint = SHARED_MODELS / "openood" / f"osr_mnist6_seed{seed}.ckpt"
        model = load_model(ModelSpec("openood:lenet", checkpoint=str(checkpoint)), context)
        with torch.no_grad():
            predicted = torch.cat([model(images[i:i + 2500]).argmax(1) for i in range(0, len(images), 2500)]).numpy()
        for position, digit in enumerate(known):
            share = float(np.mean(predicted[labels == digit] == position))
            assert share > 0.95, f"seed {seed}: digit {digit} predicted as class {position} only {share:.1%}"


@requires_shared
def test_osr_mnist6_five_seeds_through_cli(run_cli, tmp_path):
    """The real check: osr_mnist6 seeds 1-5 with their checkpoints; ID accuracy per seed, and
    MSP / ODIN averaged over the seeds by `leaderboard --benchmark osr_mnist6`. At most 1,000
    images per split (seeded, stratified): the full 10,000 add time, not evidence."""
    results = tmp_path / "osr.sqlite"
    for seed in range(1, 6):
        config = tmp_path / f"seed{seed}.yaml"
        config.write_text(yaml.safe_dump({
            "benchmark": f"osr_mnist6_seed{seed}", "data_root": str(SHARED_DATA), "limit": 1000,
            "models": [{"name": "openood:lenet",
                        "checkpoint": str(SHARED_MODELS / "openood" / f"osr_mnist6_seed{seed}.ckpt")}],
            "postprocessors": ["msp", "odin"], "search": False, "fit_split": "val"}))
        done = run_cli("run", config, "--results", results)
        assert done.returncode == 0, done.stderr[-2000:]
    per_seed = json.loads(run_cli("leaderboard", "--results", results, "--format", "json").stdout)
    accuracy = {r["benchmark"]: r["value"] for r in per_seed if r["metric"] == "acc" and r["postprocessor"] == "msp"}
    assert sorted(accuracy) == [f"osr_mnist6_seed{s}" for s in range(1, 6)]
    averaged = run_cli("leaderboard", "--results", results, "--benchmark", "osr_mnist6", "--format", "json")
    assert averaged.returncode == 0, averaged.stderr[-2000:]
    rows = {(r["postprocessor"], r["metric"], r["fpr_convention"]): r for r in json.loads(averaged.stdout)
            if r["dataset"] == "mnist4"}
    table = run_cli("leaderboard", "--results", results, "--benchmark", "osr_mnist6")
    assert table.returncode == 0 and "Mean ± standard deviation over seeds 1, 2, 3, 4, 5" in " ".join(
        table.stdout.split()), table.stdout + table.stderr[-2000:]
    print("\nOSR MNIST-6 ID accuracy per seed:", {k[-5:]: round(100 * v, 2) for k, v in sorted(accuracy.items())})
    print(table.stdout)
    for method in ("msp", "odin"):
        auroc, fpr = rows[(method, "auroc", "")], rows[(method, "fpr95", "classic")]
        assert auroc["seeds"] == "1,2,3,4,5" and auroc["benchmark"] == "osr_mnist6"
        values = [r["value"] for r in per_seed if r["postprocessor"] == method and r["metric"] == "auroc"
                  and r["dataset"] == "mnist4"]
        assert auroc["value"] == pytest.approx(np.mean(values))
        assert auroc["std"] == pytest.approx(np.std(values, ddof=1))
        assert 0.85 < auroc["value"] < 1.0 and 0 <= fpr["value"] < 0.5
        assert f"{100 * auroc['value']:.2f}±{100 * auroc['std']:.2f}" in table.stdout
    assert all(value > 0.97 for value in accuracy.values()), accuracy
