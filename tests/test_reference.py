"""The published-reference ledger (configs/reference/*.csv) and `leaderboard --reference`:
the values it must hold, its checks on load, the converter that writes it, and the published
column beside a store's rows (difference, inside the seed spread or bootstrap interval, and
why a row is not compared)."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from oodbench import registry
from oodbench.cli import main
from oodbench.errors import OodbenchError
from oodbench.metrics.detection import ood_metrics
from oodbench.report.ledger import COLUMNS, REFERENCE_DIR, architecture_pattern, load_ledger, published_entry
from oodbench.report.reference import comparisons
from oodbench.report.render import leaderboard_rows
from oodbench.storage.store import Cell, ResultStore
from oodbench.benchmark.leaderboard import leaderboard_frame
from tests.conftest import REPO, SHARED
from tests.test_tables import compile_latex, requires_pdflatex

OPENOOD_CSVS = SHARED / "reference" / "openood-v1.5"
SETS = {"cifar100": "near", "tin": "near", "mnist": "far", "svhn": "far"}
MODELS = ("openood:cifar10_resnet18_32x32", "cifar_resnet:resnet56")
METHODS = {"msp": ("default@openood", 1.7), "ebo": ("default@openood", 1.6), "knn": ("default", 1.9),
           "mc_dropout": ("default@openood", 1.0)}


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cifar10_store(tmp_path_factory):
    """A cifar10 store of synthetic scores: two models, three checkpoints each, msp/ebo/mc_dropout
    under the openood profile and knn under paper; returns (path, {(model, method): [metrics]})."""
    path = tmp_path_factory.mktemp("reference") / "cifar10.sqlite"
    rng = np.random.default_rng(0)
    store, written = ResultStore(path), {}
    oods = {name: rng.normal(0, 1, 300) for name in SETS}
    for model in MODELS:
        store.write_datasets("cifar10", model, [{"dataset": d, "group": g, "status": "present", "samples": 300}
                                                for d, g in SETS.items()], "data1")
        for method, (setting, shift) in METHODS.items():
            for checkpoint in ("s0", "s1", "s2"):
                scores = rng.normal(shift, 1, 400)
                metrics = {d: ood_metrics(scores, o) for d, o in oods.items()}
                metrics["id_test"] = {"acc": 0.95 + 0.002 * rng.standard_normal()}
                fingerprint = hashlib.sha256(f"{model}{method}{checkpoint}".encode()).hexdigest()[:16]
                store.write_cell(Cell("cifar10", model, method, setting, fingerprint=fingerprint,
                                      data_fingerprint="data1", metrics=metrics, checkpoint=checkpoint,
                                      groups={**SETS, "id_test": "id"}, tags=["standard"],
                                      scores={"id_test": scores, **oods}))
                written.setdefault((model, method), []).append(metrics)
    store.close()
    return path, written


# --------------------------------------------------------------------------- the data


@pytest.mark.parametrize("method, near, far", [("msp", 88.03, 90.73), ("ebo", 87.58, 91.21), ("knn", 90.64, 92.96),
                                               ("vim", 88.68, 93.48)])
def test_the_openood_ledger_holds_the_published_cifar10_resnet18_values(method, near, far):
    ledger = load_ledger("openood-v1.5")
    entry = published_entry(ledger, "cifar10", method, "openood:cifar10_resnet18")
    assert entry.architecture == "ResNet18" and entry.training == "CrossEntropy" and entry.same_architecture
    assert entry.values["near_auroc"][0] == near and entry.values["far_auroc"][0] == far
    assert entry.values["acc"] == (95.06, 0.30)
    assert entry.conventions == "openood" and entry.date == "2025-07-19"
    assert entry.source.endswith("/results/cifar10.csv") and "zjysteven/OpenOOD" in entry.source


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "plus"))


def test_every_published_method_oodbench_registers_is_under_its_registry_name():
    ledger = load_ledger("openood-v1.5")
    registered = {_normal(n): registry.POSTPROCESSORS.get(n) for n in registry.POSTPROCESSORS.names()}
    canonical = {cls: entry.name for entry in registry.POSTPROCESSORS.entries() for cls in [entry.obj]}
    for published, method in set(zip(ledger.published_method, ledger.method)):
        if _normal(published) in registered:  # e.g. MDSEns (alias mdsens), i-ODIN, NNGuide, AdaSCALE-A
            assert method == canonical[registered[_normal(published)]], published
        if method != published:
            assert method in registry.POSTPROCESSORS.names(), (published, method)
    mapped = set(ledger[ledger.method != ledger.published_method].method)
    assert {"temp_scaling", "mds_ensemble", "iodin", "vim", "adascale_a", "nnguide"} <= mapped
    assert "OpenGAN" in set(ledger.method)  # not registered: kept under its published name


def test_every_benchmark_of_the_leaderboard_is_in_the_ledger_under_its_oodbench_name():
    ledger = load_ledger("openood-v1.5")
    assert set(ledger.benchmark) == {"cifar10", "cifar100", "imagenet200", "imagenet200_fs", "imagenet",
                                     "imagenet_fs"}
    entry = published_entry(ledger, "imagenet", "msp", "torchvision:resnet50")
    assert (entry.architecture, entry.values["near_auroc"][0], entry.values["acc"][0]) == ("ResNet50", 76.02, 76.18)
    assert published_entry(ledger, "imagenet", "msp", "torchvision:vit_b_16").architecture == "ViT-B/16"
    other = published_entry(ledger, "imagenet", "msp", "timm:convnext_tiny")
    assert other.architecture == "ResNet50" and not other.same_architecture
    assert np.isnan(published_entry(ledger, "imagenet", "msp", "torchvision:resnet50").values["acc"][1])


@pytest.mark.skipif(not OPENOOD_CSVS.is_dir(), reason=f"the published leaderboard files are not at {OPENOOD_CSVS}")
def test_the_converter_rewrites_the_committed_ledger_from_the_published_files():
    written = subprocess.run([sys.executable, str(REPO / "tools" / "openood_ledger.py"), str(OPENOOD_CSVS)],
                             capture_output=True, text=True, check=True).stdout
    assert written == (REFERENCE_DIR / "openood-v1.5.csv").read_text()
    published = pd.read_csv(OPENOOD_CSVS / "cifar10.csv", dtype=str)
    assert len(pd.read_csv(io.StringIO(written)).query("benchmark == 'cifar10'")) == sum(
        (published[c] != "/").sum() for c in ("Near-OOD_AUROC", "Far-OOD_AUROC", "ID_Accuracy"))


@pytest.mark.parametrize("model, architecture, named", [
    ("openood:cifar10_resnet18_32x32", "ResNet18", True), ("cifar_resnet:resnet56", "ResNet18", False),
    ("torchvision:resnet50", "ResNet50", True), ("torchvision:wide_resnet50_2", "ResNet50", False),
    ("torchvision:resnet101", "ResNet18", False), ("torchvision:swin_t", "Swin-T", True),
    ("torchvision:vit_b_16", "ViT-B/16", True), ("torchvision:regnet_y_16gf", "RegNet_Y_16GF", True)])
def test_a_model_name_names_an_architecture(model, architecture, named):
    assert bool(architecture_pattern(architecture).search(model)) is named


# --------------------------------------------------------------------------- checks on load


GOOD = ("cifar10,msp,MSP,CrossEntropy,ResNet18,100 epochs,no,near_auroc,88.03,0.25,,openood,"
        "https://example.org/t.csv,leaderboard,2025-07-19")


@pytest.mark.parametrize("header, line, message", [
    (",".join(COLUMNS) + ",extra", GOOD + ",1", "unknown column 'extra'"),
    (",".join(COLUMNS[:-1]), GOOD.rsplit(",", 1)[0], "missing column(s) date"),
    (None, GOOD.replace("88.03", "high"), "line 2: 'value' must be a number"),
    (None, GOOD.replace("88.03", "880.3"), "line 2: 'value' must lie in [0, 100]"),
    (None, GOOD.replace("near_auroc", "near_aurco"), "did you mean: near_auroc"),
    (None, GOOD.replace("cifar10,", "cifar11,", 1), "unknown benchmark 'cifar11'"),
    (None, GOOD.replace("near_auroc", "near_fpr95"), "needs fpr_convention classic or openood"),
    (None, GOOD.replace("2025-07-19", "19.07.2025"), "date must be YYYY-MM-DD"),
    (None, GOOD.replace(",openood,", ",openod,"), "unknown conventions 'openod'"),
    (None, GOOD + "\n" + GOOD, "is given 2 times"),
])
def test_a_bad_ledger_is_one_line_naming_file_and_line(tmp_path, capsys, header, line, message):
    path = tmp_path / "bad.csv"
    path.write_text((header or ",".join(COLUMNS)) + "\n" + line + "\n")
    with pytest.raises(OodbenchError) as error:
        load_ledger(str(path))
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_reference_is_one_line_and_exit_2(cifar10_store, capsys):
    code, out, err = cli(capsys, "leaderboard", "--results", cifar10_store[0], "--reference", "openood-v15")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "unknown reference 'openood-v15'" in err and "openood-v1.5" in err


def test_list_references_names_the_ledger(capsys):
    code, out, _ = cli(capsys, "list", "references")
    assert code == 0 and "openood-v1.5" in out and "2025-07-19" in out and "imagenet200_fs" in out


# --------------------------------------------------------------------------- the published column


def _block(out: str) -> list[str]:
    return out[out.index("Published reference openood-v1.5"):].splitlines()


def test_leaderboard_reference_gives_published_value_difference_and_seed_spread(cifar10_store, capsys):
    path, written = cifar10_store
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5")
    assert code == 0
    block = _block(out)
    assert any(line.startswith(f"{MODELS[0]}: published for ResNet18") for line in block)
    assert any(line.startswith(f"{MODELS[1]}: published for ResNet18 (not this model's)") for line in block)
    published = {"msp": (88.03, 90.73), "ebo": (87.58, 91.21)}
    for model in MODELS:
        start = next(i for i, line in enumerate(block) if line.startswith(f"{model}:"))
        for method, values in published.items():
            line = next(l for l in block[start:] if l.split() and l.split()[0] == method).split()
            for column, (group, value) in enumerate(zip(("near", "far"), values)):
                means = [np.mean([m[d]["auroc"] for d, g in SETS.items() if g == group])
                         for m in written[(model, method)]]
                mean, std = 100 * np.mean(means), 100 * np.std(means, ddof=1)
                assert line[1 + 3 * column].startswith(f"{value:.2f}±")
                assert line[2 + 3 * column] == f"{mean - value:+.2f}"
                assert line[3 + 3 * column] == ("yes" if abs(mean - value) <= std else "no")
    notes = " ".join(block[block.index(next(l for l in block if l.startswith("- not compared"))):])
    assert "ran under the paper conventions" in notes and f"{MODELS[0]} / knn" in notes
    assert "no CrossEntropy value for mc_dropout on cifar10" in notes
    assert all(len(line) <= 100 for line in out.splitlines())


def test_leaderboard_reference_with_intervals_says_whether_the_published_value_is_inside(cifar10_store, capsys):
    path, _ = cifar10_store
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5", "--ci",
                       "--resamples", "200", "--model", MODELS[0], "--postprocessor", "msp")
    assert code == 0
    store = ResultStore(path, readonly=True)
    frame = leaderboard_frame(store, "cifar10", [MODELS[0]], ["msp"])
    row = leaderboard_rows(frame, store, 200, 0).iloc[0]  # the same resamples as the command's
    line = next(l for l in _block(out) if l.split() and l.split()[0] == "msp").split()
    for column, value in ((3, 88.03), (6, 90.73)):
        name = "near-OOD|auroc" if column == 3 else "far-OOD|auroc"
        assert line[column] == ("yes" if row[f"{name}|low"] <= value / 100 <= row[f"{name}|high"] else "no")
    assert "95% bootstrap interval" in " ".join(_block(out))


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_tidy_reference_columns_on_the_published_metrics(cifar10_store, capsys, fmt):
    path, written = cifar10_store
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5", "--format", fmt)
    assert code == 0
    tidy = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.read_json(io.StringIO(out))
    rows = tidy[(tidy.model == MODELS[0]) & (tidy.postprocessor == "ebo") & (tidy.dataset == "far-OOD")
                & (tidy.metric == "auroc")]
    assert len(rows) == 3 and np.allclose(rows.published, 0.9121) and np.allclose(rows.published_std, 0.0092)
    assert np.allclose(rows.published_difference, (rows.value - 0.9121).round(4), rtol=0, atol=1e-12)
    assert (rows.published_architecture == "ResNet18").all()
    knn = tidy[(tidy.postprocessor == "knn") & (tidy.dataset == "near-OOD") & (tidy.metric == "auroc")]
    assert knn.published_difference.isna().all() and knn.published_note.str.contains("paper conventions").all()
    assert tidy[tidy.dataset == "mnist"].published.isna().all()


def _rows(benchmark: str, columns: dict, fpr: str = "openood", csid: tuple = ()) -> pd.DataFrame:
    rows = pd.DataFrame([{"model": "openood:imagenet200_resnet18", "label": "msp", "postprocessor": "msp",
                          "setting": "default@openood", "status": "done", **columns}])
    rows.attrs.update(benchmark=benchmark, fpr=fpr, csid=list(csid))
    return rows


def test_a_full_spectrum_row_is_compared_on_its_fs_columns():
    ledger = load_ledger("openood-v1.5")
    rows = _rows("imagenet200_fs", {"FS near-OOD|auroc": 0.55, "FS far-OOD|auroc": 0.66, "FS|acc": 0.44,
                                    "near-OOD|auroc": 0.80, "acc": 0.86}, csid=("imagenet_c",))
    found = comparisons(rows, ledger).set_index("metric")
    assert found.loc["near_auroc", "published"] == 54.35 and found.loc["acc", "published"] == 43.92
    assert found.loc["near_auroc", "difference"] == pytest.approx(55 - 54.35)
    assert found.loc["far_auroc", "difference"] == pytest.approx(66 - 66.11)
    assert found.loc["acc", "difference"] == pytest.approx(44 - 43.92)
    assert set(found.inside) == {"-"}  # no interval, no seeds


def test_an_fpr_is_compared_only_in_the_convention_it_was_published_in(tmp_path):
    rows = [GOOD, GOOD.replace("near_auroc,88.03,0.25,", "near_fpr95,40.00,,openood")]
    (tmp_path / "mine.csv").write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n")
    ledger = load_ledger(str(tmp_path / "mine.csv"))
    columns = {"near-OOD|auroc": 0.88, "near-OOD|fpr": 0.41, "near-OOD|fpr|std": 0.02}
    shown = comparisons(_rows("cifar10", columns, fpr="openood"), ledger).set_index("metric")
    assert shown.loc["near_fpr95", "difference"] == pytest.approx(1.0) and shown.loc["near_fpr95", "inside"] == "yes"
    other = comparisons(_rows("cifar10", columns, fpr="classic"), ledger).set_index("metric")
    assert "published in the openood convention, shown here in the classic one" in other.loc["near_fpr95", "reason"]
    assert np.isnan(other.loc["near_fpr95", "difference"]) and other.loc["near_auroc", "reason"] == ""


@requires_pdflatex
def test_the_latex_published_table_compiles(cifar10_store, tmp_path, capsys):
    code, out, _ = cli(capsys, "leaderboard", "--results", cifar10_store[0], "--reference", "openood-v1.5",
                       "--format", "latex", "--model", MODELS[1], "--conventions", "openood")
    assert code == 0 and out.count(r"\begin{table}") == 2 and r"$\Delta$" in out and "(not this model's)" in out
    compile_latex(tmp_path, "reference", out)


def test_a_difference_on_other_data_than_the_published_says_how_it_differs(tmp_path, capsys):
    """near-OOD over TIN alone (CIFAR-100 missing), far-OOD over MNIST alone, both read from the
    fallback sources: the Δ is printed with a note naming all of that, in text and CSV/JSON."""
    path = tmp_path / "partial.sqlite"
    store = ResultStore(path)
    rng = np.random.default_rng(1)
    store.write_datasets("cifar10", MODELS[0], [
        {"dataset": "cifar100", "group": "near", "status": "missing", "reason": "no list"},
        {"dataset": "tin", "group": "near", "status": "present", "samples": 50, "reason": "fallback: tin (candidate 2 of 2)"},
        {"dataset": "mnist", "group": "far", "status": "present", "samples": 50, "reason": "fallback: mnist (candidate 2 of 2)"},
        *({"dataset": d, "group": "far", "status": "missing", "reason": "no files"} for d in ("svhn", "texture", "places365"))],
        "data1")
    oods = {"tin": rng.normal(0, 1, 50), "mnist": rng.normal(0, 1, 50)}
    scores = rng.normal(1, 1, 60)
    store.write_cell(Cell("cifar10", MODELS[0], "msp", "default@openood", fingerprint="f1", data_fingerprint="data1",
                          metrics={d: ood_metrics(scores, o) for d, o in oods.items()}, checkpoint="s0",
                          groups={"tin": "near", "mnist": "far", "id_test": "id"}, scores={"id_test": scores, **oods}))
    store.close()
    expected = ("the data differ from the published benchmark's: near-OOD over tin only (cifar100 missing); far-OOD "
                "over mnist only (svhn, texture, places365 missing); mnist, tin read from fallback sources, not the "
                "published lists")
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5")
    assert code == 0 and expected in " ".join(" ".join(_block(out)).split())
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5", "--format", "csv")
    tidy = pd.read_csv(io.StringIO(out))
    near = tidy[(tidy.dataset == "near-OOD") & (tidy.metric == "auroc")].iloc[0]
    assert near.published == pytest.approx(0.8803) and near.published_note == expected
    assert near.published_difference == round(near.value - 0.8803, 4)


def test_nothing_published_is_one_line(tmp_path, capsys):
    path = tmp_path / "digits.sqlite"
    store = ResultStore(path)
    rng = np.random.default_rng(2)
    store.write_datasets("digits", "m", [{"dataset": "noise", "group": "far", "status": "present", "samples": 30}], "d")
    for method in ("msp", "ebo"):
        scores, ood = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
        store.write_cell(Cell("digits", "m", method, "default", fingerprint=method, data_fingerprint="d",
                              metrics={"noise": ood_metrics(scores, ood)}, groups={"noise": "far", "id_test": "id"}))
    store.close()
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5")
    assert code == 0
    tail = out.rstrip().splitlines()[-1]
    assert tail.startswith("openood-v1.5 publishes nothing for digits; it covers cifar10, cifar100")
    assert "Published reference" not in out and "not compared" not in out


def test_the_latex_reference_caption_writes_options_as_typed(tmp_path, capsys):
    """LaTeX sets -- as an en dash: the caption's --ci (one checkpoint, no interval) is written -{}-ci."""
    path = tmp_path / "one.sqlite"
    store = ResultStore(path)
    rng = np.random.default_rng(3)
    store.write_datasets("cifar10", MODELS[0], [{"dataset": d, "group": g, "status": "present", "samples": 40}
                                                for d, g in SETS.items()], "d")
    scores, oods = rng.normal(1, 1, 40), {d: rng.normal(0, 1, 40) for d in SETS}
    store.write_cell(Cell("cifar10", MODELS[0], "msp", "default@openood", fingerprint="f", data_fingerprint="d",
                          metrics={d: ood_metrics(scores, o) for d, o in oods.items()}, groups={**SETS, "id_test": "id"}))
    store.close()
    code, out, _ = cli(capsys, "leaderboard", "--results", path, "--reference", "openood-v1.5", "--format", "latex")
    reference = out[out.rindex(r"\begin{table}"):]
    assert code == 0 and "(-{}-ci, or several checkpoints)" in reference and "--ci" not in reference
