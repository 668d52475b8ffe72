"""Full-spectrum (FS-OOD) benchmarks: ``csid:`` sets scored as ID, their metrics against an
independent scikit-learn computation on the stored per-image scores, the tables (compact,
wide, LaTeX, tidy, intervals), ``extends:``, and the shifted-set loaders (ImageNet-V2,
ImageNet-R, multi-corruption CIFAR-10-C; OpenOOD's lists) on tiny files in their release
layouts, through the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from oodbench.datasets.benchmarks import load_benchmark, parse_benchmark
from oodbench.datasets.base import DatasetRef, load_source
from oodbench.datasets.transform import ImageSpec
from oodbench.errors import OodbenchError
from oodbench.storage.store import ResultStore

ID_DIGITS = {"dataset": "sklearn_digits", "options": {"classes": [0, 1, 2, 3, 4, 5]},
             "parts": {"train": 0.6, "val": 0.2, "test": "rest"}}


def fpr_at_95_id_positive(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """sklearn's ROC with ID positive: the FPR at the first threshold reaching 95% TPR."""
    labels = np.r_[np.ones(id_scores.size), np.zeros(ood_scores.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[id_scores, ood_scores], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


@pytest.fixture
def fs_run(run_cli, tmp_path):
    """digits with two 'shifted' ID sets (the ID val and train parts), run through the CLI."""
    benchmark = tmp_path / "digits_fs.yaml"
    benchmark.write_text(yaml.safe_dump({
        "name": "digits_fs", "version": 1, "extends": "digits",
        "csid": {"digits_val": {**ID_DIGITS, "part": "val"}, "digits_train": {**ID_DIGITS, "part": "train"}}},
        sort_keys=False))
    results = tmp_path / "fs.sqlite"
    config = tmp_path / "fs.yaml"
    config.write_text(yaml.safe_dump({"benchmark": str(benchmark), "models": [{"name": "digits-cnn"}],
                                      "postprocessors": ["msp", "ebo"], "search": False, "results": str(results)}))
    done = run_cli("run", config, "--tables", tmp_path / "tables")
    assert done.returncode == 0, done.stderr[-2000:]
    return results, done, tmp_path


def test_fs_metrics_equal_sklearn_and_tables_show_them(fs_run, run_cli):
    """One run: its stored FS-OOD metrics against sklearn, then its tables."""
    results, done, tmp_path = fs_run
    store = ResultStore(results, readonly=True)
    cells = store.frame("cells", benchmark="digits_fs")
    assert set(cells.status) == {"done"} and len(cells) == 2
    stored = store.frame("results", benchmark="digits_fs")
    for fingerprint in cells.fingerprint:
        values = {(r.dataset, r.metric): r.value for r in stored[stored.fingerprint == fingerprint].itertuples()}
        scores, damaged = store.read_scores([fingerprint])
        assert not damaged
        sets = scores[fingerprint]
        pool = np.r_[sets["id_test"], sets["digits_val"], sets["digits_train"]]
        for ood in ("digits_6_9", "textures", "gaussian", "uniform"):
            labels = np.r_[np.ones(pool.size), np.zeros(sets[ood].size)]
            assert values[(ood, "fs_auroc")] == pytest.approx(roc_auc_score(labels, np.r_[pool, sets[ood]]), abs=1e-12)
            assert values[(ood, "fs_fpr95")] == pytest.approx(fpr_at_95_id_positive(pool, sets[ood]), abs=1e-12)
            plain = np.r_[np.ones(sets["id_test"].size), np.zeros(sets[ood].size)]
            assert values[(ood, "auroc")] == pytest.approx(roc_auc_score(plain, np.r_[sets["id_test"], sets[ood]]),
                                                           abs=1e-12)
        sizes = {name: sets[name].size for name in ("id_test", "digits_val", "digits_train")}
        pooled_acc = sum(values[(n, "acc")] * sizes[n] for n in ("digits_val", "digits_train")) + \
            values[("id_test", "acc")] * sizes["id_test"]
        assert values[("id_test", "fs_acc")] == pytest.approx(pooled_acc / sum(sizes.values()), abs=1e-12)
        assert {r.ood_group for r in stored.itertuples() if r.dataset in ("digits_val", "digits_train")} == {"csid"}

    assert "FS ACC" in done.stdout and "FS near AUROC" in done.stdout and "FS far FPR" in done.stdout
    assert "covariate-shiftedIDsets(digits_val,digits_train)" in "".join(done.stdout.split())
    assert max(map(len, done.stdout.splitlines())) <= 100
    wide = (tmp_path / "tables" / "digits_fs" / "leaderboard.md").read_text()
    header = [cell.strip() for cell in next(line for line in wide.splitlines() if line.startswith("| model"))
              .split("|")]
    for column in ("ACC digits_val", "ACC digits_train", "FS ACC", "digits_6_9", "FS digits_6_9", "near-OOD",
                   "FS near-OOD", "FS average"):
        assert column in header, column
    latex = (tmp_path / "tables" / "digits_fs" / "leaderboard.tex").read_text()
    assert "FS near-OOD" in latex and "FS ACC" in latex
    tidy = pd.read_csv(tmp_path / "tables" / "digits_fs" / "leaderboard.csv")
    metrics = set(zip(tidy.dataset, tidy.group, tidy.metric))
    assert {("digits_val", "csid", "acc"), ("id_test", "id", "fs_acc"), ("near-OOD", "mean", "fs_auroc"),
            ("digits_6_9", "near", "fs_fpr95"), ("digits_6_9", "near", "auroc")} <= metrics
    assert not tidy[tidy.metric == "fs_fpr95"].higher_is_better.any()
    ci = run_cli("leaderboard", "--results", results, "--ci", "--resamples", "200", "--wide")
    assert ci.returncode == 0 and "do not reproduce" not in ci.stderr, ci.stderr[-2000:]
    rows = json.loads(run_cli("leaderboard", "--results", results, "--ci", "--resamples", "200",
                              "--format", "json").stdout)
    fs = [r for r in rows if r["metric"] == "fs_auroc" and r["dataset"] == "near-OOD"]
    assert fs and all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in fs)


def test_extends_and_csid_errors(tmp_path):
    benchmark = load_benchmark("cifar10_fs")
    assert list(benchmark.csid) == ["cifar10c"] and list(benchmark.near) == ["cifar100", "tin"]
    assert benchmark.group_of("cifar10c") == "csid"
    assert load_benchmark("imagenet_fs").num_classes == 1000 and len(load_benchmark("imagenet200_fs").csid) == 3
    with pytest.raises(OodbenchError, match="name of its own"):
        parse_benchmark({"extends": "digits", "name": "x", "version": 1,
                         "csid": {"gaussian": {**ID_DIGITS, "part": "val"}}}, "x.yaml")
    with pytest.raises(OodbenchError, match="did you mean: digits"):
        parse_benchmark({"extends": "digit", "name": "x", "version": 1}, "x.yaml")
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": str(loop), "name": "x", "version": 1}))
    with pytest.raises(OodbenchError, match="loops"):
        load_benchmark(str(loop))


# ------------------------------------------------------------------ shifted sets in release layouts


def _jpeg(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (value, 0, 0)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())


WNIDS = [f"n{i:08d}" for i in range(1000)]


@pytest.fixture
def imagenet_root(tmp_path):
    """ImageNet val (1,000 wnid folders, images in classes 3 and 7), ImageNetV2 (folders
    0..999, images in 5 and 998), ImageNet-R (2 of the 200 wnid folders), and OpenOOD's
    ImageNet-200 ImageNet-R list over images_largescale/."""
    for wnid in WNIDS:
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
    for c in (3, 7):
        _jpeg(tmp_path / "imagenet" / "val" / WNIDS[c] / f"ILSVRC2012_val_{c:08d}.JPEG", c)
    for c in range(1000):
        (tmp_path / "imagenetv2-matched-frequency-format-val" / str(c)).mkdir(parents=True)
    for c in (5, 998):
        _jpeg(tmp_path / "imagenetv2-matched-frequency-format-val" / str(c) / "7f3a.jpeg", c % 256)
    for c in (1, 950):
        _jpeg(tmp_path / "imagenet-r" / WNIDS[c] / "art_0.jpg", c % 256)
    lists = tmp_path / "benchmark_imglist" / "imagenet200"
    lists.mkdir(parents=True)
    _jpeg(tmp_path / "images_largescale" / "imagenet_r" / WNIDS[1] / "art_0.jpg", 1)
    (lists / "test_imagenet200_r.txt").write_text(f"imagenet_r/{WNIDS[1]}/art_0.jpg 17\n")
    return tmp_path


def test_imagenet_v2_and_r_labels(imagenet_root):
    image = ImageSpec(224, 3)
    v2 = load_source(DatasetRef("imagenet_v2", {"resize_crop": [256, 224]}), imagenet_root, image)
    assert [v2[i][1] for i in range(len(v2))] == [5, 998] and v2[0][0].size == (224, 224)
    r = load_source(DatasetRef("imagenet_r"), imagenet_root, image)
    assert [r[i][1] for i in range(len(r))] == [1, 950]
    (imagenet_root / "imagenetv2-matched-frequency-format-val" / "1000").mkdir()
    with pytest.raises(OodbenchError, match="'1000'"):
        load_source(DatasetRef("imagenet_v2"), imagenet_root, image)
    with pytest.raises(OodbenchError, match="wnids_from"):
        load_source(DatasetRef("imagenet_r", {"wnids_from": "nowhere"}), imagenet_root, image)


def test_shifted_sets_through_data_status(run_cli, imagenet_root):
    done = run_cli("data", "status", "imagenet_fs", "--data-root", imagenet_root, "--wide")  # one line per split
    status = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("csid:")}
    assert "present" in status["csid:imagenet_v2"] and "imagenetv2-matched-frequency-format-val/ (2 images)" in \
        status["csid:imagenet_v2"]
    assert "present" in status["csid:imagenet_r"] and "imagenet-r/ (2 images)" in status["csid:imagenet_r"]
    assert "missing" in status["csid:imagenet_c"] and "missing" in status["csid:imagenet_es"]
    done = run_cli("data", "status", "imagenet200_fs", "--data-root", imagenet_root, "--wide")
    line = next(line for line in done.stdout.splitlines() if line.startswith("csid:imagenet_r"))
    assert "present" in line and "test_imagenet200_r.txt (1 images)" in line
    listed = run_cli("list", "benchmarks", "--wide").stdout  # one line per benchmark
    assert "imagenet_v2, imagenet_c, imagenet_r, imagenet_es" in next(
        line for line in listed.splitlines() if line.startswith("imagenet_fs "))


def test_cifar_c_corruption_and_severity_lists(tmp_path, run_cli):
    """A tiny CIFAR-10-C (4 test images): the 15 corruptions x 5 severities of cifar10_fs's
    fallback, 300 images, of which its seeded 10,000-image sample keeps all."""
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "labels.npy", np.tile(np.arange(4, dtype=np.int64), 5))
    corruptions = load_benchmark("cifar10_fs").raw["csid"]["cifar10c"]["options"]["candidates"][1]["options"][
        "corruption"]
    assert len(corruptions) == 15
    for number, name in enumerate(corruptions):
        values = np.array([100 + 10 * number + s for s in range(1, 6) for _ in range(4)], dtype=np.uint8)
        np.save(root / f"{name}.npy", np.broadcast_to(values[:, None, None, None], (20, 32, 32, 3)).copy())
    data = load_source(DatasetRef("cifar_c", {"corruption": corruptions[1:3], "severity": [5, 2]}), tmp_path,
                       ImageSpec(32, 3))
    assert [int(data[i][0][0, 0, 0]) for i in range(len(data))] == [115] * 4 + [112] * 4 + [125] * 4 + [122] * 4
    assert [data[i][1] for i in range(len(data))] == [0, 1, 2, 3] * 4
    done = run_cli("data", "status", "cifar10_fs", "--data-root", tmp_path, "--wide")
    line = next(line for line in done.stdout.splitlines() if line.startswith("csid:cifar10c"))
    assert "present" in line and "300" in line and "15 corruptions severities [1, 2, 3, 4, 5]" in line
