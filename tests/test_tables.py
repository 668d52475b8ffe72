"""Tables a reader can use: the compact terminal table, LaTeX compiled by a real pdflatex,
tidy exports read by pandas as they are, checkpoints as mean ± std, bootstrap intervals
from the stored scores, the store inventory, and stores of the previous schema."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from oodbench.benchmark.runner import run_experiment
from oodbench.cli import main
from oodbench.metrics.detection import ood_metrics
from oodbench.storage.store import Cell, ResultStore
from oodbench.report.tidy import COLUMNS as TIDY_COLUMNS
from tests.conftest import compact_rows, digits_config

requires_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                       reason="pdflatex not installed (make test installs Debian's texlive)")

WEIRD_BENCHMARK = "cifar_10%&co"
WEIRD_MODELS = ("wide_resnet_28 & 50% #1 {x}~^", "res\\net_18 $\\alpha$ <tiny>|x")
WEIRD_METHODS = {"my_score&co": 1.0, "msp": 0.4, "gen_%#": 1.6}
WEIRD_SETS = {"tiny_imagenet%&_1": "near", "svhn_#2": "far", "tex$tures~^{}": "far"}


def write_weird_store(path, checkpoints=("",)) -> dict:
    """A store whose names hold every LaTeX special character; returns the scores written."""
    rng = np.random.default_rng(0)
    store, written = ResultStore(path), {}
    oods = {name: rng.normal(0, 1, 150 + 10 * i) for i, name in enumerate(WEIRD_SETS)}
    for model in WEIRD_MODELS:
        store.write_datasets(WEIRD_BENCHMARK, model, [{"dataset": d, "group": g, "status": "present", "samples": 150}
                                                      for d, g in WEIRD_SETS.items()], "data1")
        for name, shift in WEIRD_METHODS.items():
            for checkpoint in checkpoints:
                id_scores = rng.normal(shift, 1, 200)
                fingerprint = hashlib.sha256(f"{model}{name}{checkpoint}".encode()).hexdigest()[:16]
                metrics = {d: ood_metrics(id_scores, ood) for d, ood in oods.items()}
                metrics["id_test"] = {"acc": 0.9 + 0.01 * rng.random()}
                store.write_cell(Cell(WEIRD_BENCHMARK, model, name, "default", fingerprint=fingerprint,
                                      data_fingerprint="data1", metrics=metrics, checkpoint=checkpoint,
                                      groups={**WEIRD_SETS, "id_test": "id"}, tags=["standard"],
                                      scores={"id_test": id_scores, **oods}))
                written[fingerprint] = (id_scores, oods, metrics)
    store.close()
    return written


def compile_latex(folder, name: str, body: str) -> None:
    """pdflatex on a minimal document holding `body`; fails with the end of its log."""
    document = "\n".join([r"\documentclass{article}", r"\usepackage{booktabs}", r"\usepackage{graphicx}",
                          r"\begin{document}", body, r"\end{document}", ""])
    (folder / f"{name}.tex").write_text(document)
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"], cwd=folder,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    log = (folder / f"{name}.log").read_text(errors="replace")
    assert "Missing character" not in log and (folder / f"{name}.pdf").stat().st_size > 0


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, session_cache):
    """A real digits run: a standard and a robust model, three methods, default settings."""
    folder = tmp_path_factory.mktemp("tables")
    config = digits_config(folder, postprocessors=["msp", "ebo", "knn"], models=[
        {"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn-robust", "tags": ["robust"]}])
    run_experiment(config, cache_dir=str(session_cache), quiet=True)
    return folder / "results.sqlite"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- LaTeX


@requires_pdflatex
@pytest.mark.parametrize("layout", [[], ["--wide"], ["--ci", "--resamples", "200"], ["--wide", "--ci"]])
def test_latex_of_the_digits_store_compiles(digits_store, tmp_path, capsys, layout):
    code, out, _ = cli(capsys, "leaderboard", "--results", digits_store, "--format", "latex", *layout)
    assert code == 0
    assert r"\toprule" in out and r"\textbf{" in out and "95\\%" in out  # booktabs, best bold, % escaped
    assert "ID as positive" in out and "All test images used" in out  # FPR convention and sampling
    compile_latex(tmp_path, "digits", out)


@requires_pdflatex
def test_latex_with_special_characters_in_every_name_compiles(tmp_path, capsys):
    write_weird_store(tmp_path / "weird.sqlite", checkpoints=("s_0%", "s&1"))
    bodies = []
    for layout in ([], ["--wide"], ["--ci", "--resamples", "100"]):
        code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", "--format", "latex", *layout)
        assert code == 0
        for raw, escaped in (("cifar_10%&co", r"cifar\_10\%\&co"), ("my_score&co", r"my\_score\&co"),
                             ("{x}~^", r"\{x\}\textasciitilde{}\textasciicircum{}"),
                             ("$\\alpha$", r"\$\textbackslash{}alpha\$")):
            assert escaped in out and raw not in out
        bodies.append(out)
    assert r"\underline{" in bodies[1] and r"$\pm$" in bodies[1]  # second underlined; mean ± std of 2 checkpoints
    assert r"\textsuperscript{\dag}" in bodies[2] or r"\dag" in bodies[2]
    compile_latex(tmp_path, "weird", "\n\n".join(bodies))


@requires_pdflatex
def test_compare_and_calibration_latex_compile(digits_store, tmp_path, capsys, session_cache):
    config = digits_store.parent / "experiment.yaml"
    code, compare, _ = cli(capsys, "compare", config, "--format", "latex", "--output", tmp_path)
    assert code == 0
    code, calibration, _ = cli(capsys, "calibration", config, "--cache-dir", session_cache, "--levels", "3",
                               "--format", "latex", "--output", tmp_path)
    assert code == 0
    compile_latex(tmp_path, "others", compare + "\n\n" + calibration)


# --------------------------------------------------------------------------- the compact table


def test_compact_table_fits_100_columns_and_ranks_within_each_model(tmp_path, capsys):
    write_weird_store(tmp_path / "weird.sqlite")
    for extra in ([], ["--ci", "--resamples", "100"]):
        code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", *extra)
        assert code == 0
        assert max(map(len, out.splitlines())) <= 100, out
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite")
    store = ResultStore(tmp_path / "weird.sqlite", readonly=True)
    results = store.frame("results", metric="auroc")
    near = results[results.dataset == "tiny_imagenet%&_1"]
    rows = compact_rows(out)
    assert len(rows) == len(WEIRD_MODELS) * len(WEIRD_METHODS)
    for model in WEIRD_MODELS:
        expected = near[near.model == model].sort_values("value", ascending=False)
        shown = [r for r in rows if model.startswith(r["model"].rstrip("."))]
        assert [r["postprocessor"] for r in shown] == list(expected.postprocessor)
        assert [r["near AUROC"].rstrip("*") for r in shown] == [f"{100 * v:.2f}" for v in expected.value]
    best = near.value.max()
    assert [r["near AUROC"].endswith("*") for r in rows] == [
        float(r["near AUROC"].rstrip("*")) == round(100 * best, 2) for r in rows]


# --------------------------------------------------------------------------- tidy exports


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_tidy_leaderboard_loads_with_pandas_and_matches_the_store(tmp_path, capsys, fmt):
    write_weird_store(tmp_path / "weird.sqlite", checkpoints=("s0", "s1"))
    read = (lambda out: pd.read_csv(io.StringIO(out))) if fmt == "csv" else (  # noqa: E731
        lambda out: pd.read_json(io.StringIO(out)))
    for fpr in ("classic", "openood"):  # the leaderboard: one convention, --fpr's
        code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", "--format", fmt, "--fpr", fpr)
        assert code == 0 and set(read(out).fpr_convention.dropna()) - {""} == {fpr}
    code, out, _ = cli(capsys, "results", tmp_path / "weird.sqlite", "export", "--format", fmt, "--fpr", "both")
    assert code == 0
    tidy = read(out)
    assert list(tidy.columns) == TIDY_COLUMNS + ["attack", "eps"] and tidy.value.dtype == float
    stored = pd.DataFrame(sqlite3.connect(tmp_path / "weird.sqlite").execute(
        "SELECT fingerprint, dataset, metric, value FROM results").fetchall(),
        columns=["fingerprint", "dataset", "metric", "value"])
    for row in stored.itertuples():  # every stored number, under its own name and convention
        convention = {"fpr95": "classic", "fpr95_openood": "openood"}.get(row.metric, "")
        metric = "fpr95" if convention else row.metric
        match = tidy[(tidy.fingerprint == row.fingerprint) & (tidy.dataset == row.dataset)
                     & (tidy.metric == metric) & (tidy.fpr_convention.fillna("") == convention)]
        assert match.value.item() == pytest.approx(row.value, abs=1e-12)
    means = tidy[(tidy.group == "mean") & (tidy.dataset == "far-OOD") & (tidy.metric == "auroc")]
    for row in means.itertuples():
        far = stored[(stored.fingerprint == row.fingerprint) & (stored.metric == "auroc")
                     & stored.dataset.isin([d for d, g in WEIRD_SETS.items() if g == "far"])]
        assert row.value == pytest.approx(far.value.mean(), abs=1e-12)
    assert set(tidy.checkpoint) == {"s0", "s1"} and set(tidy.model) == set(WEIRD_MODELS)
    assert not tidy[tidy.metric == "fpr95"].higher_is_better.any() and tidy[tidy.metric == "auroc"].higher_is_better.all()


def write_settings_store(path, order) -> None:
    """msp and ebo searched, default and with a fixed temperature (equal numbers where the
    hyperparameters agree, as real runs give), and a ViM cell that failed, written in `order`."""
    rng = np.random.default_rng(1)
    oods = {"near_set": rng.normal(0, 1, 40), "far_set": rng.normal(-1, 1, 40)}
    id_scores = rng.normal(1, 1, 50)
    metrics = {**{d: ood_metrics(id_scores, ood) for d, ood in oods.items()}, "id_test": {"acc": 0.9}}
    groups = {"near_set": "near", "far_set": "far", "id_test": "id"}
    cells = [Cell("bench", "net", method, setting, fingerprint=f"{method}-{setting}", data_fingerprint="data1",
                  metrics=metrics, groups=groups, params=params)
             for method, settings in (("msp", {"search": {}, "default": {}}),
                                      ("ebo", {"search": {"temperature": 1}, "default": {"temperature": 1},
                                               'default{"temperature": 2}': {"temperature": 2}}))
             for setting, params in settings.items()]
    cells.append(Cell("bench", "net", "vim", "default", fingerprint="vim-default", data_fingerprint="data1",
                      status="failed", reason="ValueError: dim=256 must be below the feature dimension 128"))
    store = ResultStore(path)
    store.write_datasets("bench", "net", [{"dataset": d, "group": g, "status": "present", "samples": 40}
                                          for d, g in groups.items()], "data1")
    for index in order:
        store.write_cell(cells[index])
    store.close()


def test_exports_tell_every_setting_apart_keep_failed_cells_and_do_not_depend_on_completion_order(tmp_path, capsys):
    outputs = {}
    for name, order in (("forward", range(6)), ("backward", reversed(range(6))), ("shuffled", [3, 0, 5, 2, 4, 1])):
        write_settings_store(tmp_path / f"{name}.sqlite", list(order))
        for command in (("results", tmp_path / f"{name}.sqlite", "export"),
                        ("leaderboard", "--results", tmp_path / f"{name}.sqlite", "--format", "json")):
            code, out, _ = cli(capsys, *command)
            assert code == 0
            outputs.setdefault(command[0], []).append(out)
    for texts in outputs.values():  # the same bytes, whatever order the cells finished in
        assert texts[0] == texts[1] == texts[2]
    tidy = pd.read_csv(io.StringIO(outputs["results"][0]), keep_default_na=False)
    numbers = tidy[tidy.status == "done"]
    assert not numbers.drop(columns=["fingerprint", "value"]).duplicated().any()
    assert not numbers.drop(columns=["fingerprint", "value", "setting"]).duplicated().any(), \
        "searched and default cells are told apart by the searched column, fixed ones by params"
    assert set(zip(numbers.postprocessor, numbers.searched.astype(str), numbers.params)) == {
        ("msp", "True", "{}"), ("msp", "False", "{}"), ("ebo", "True", '{"temperature": 1}'),
        ("ebo", "False", '{"temperature": 1}'), ("ebo", "False", '{"temperature": 2}')}
    failed = tidy[tidy.postprocessor == "vim"]
    assert len(failed) == 1 and failed.status.item() == "failed" and failed.value.item() == ""
    assert failed.reason.item() == "ValueError: dim=256 must be below the feature dimension 128"
    assert list(tidy.postprocessor.drop_duplicates()) == ["ebo", "msp", "vim"]
    records = json.loads(outputs["leaderboard"][0])
    assert [r["status"] for r in records if r["postprocessor"] == "vim"] == ["failed"]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_shown_as_mean_and_std(tmp_path, capsys):
    written = write_weird_store(tmp_path / "weird.sqlite", checkpoints=("s0", "s1", "s2"))
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", "--wide")
    assert code == 0 and "Mean ± standard deviation over 3 checkpoints" in out
    cells = ResultStore(tmp_path / "weird.sqlite", readonly=True).frame("cells")
    model, method = WEIRD_MODELS[0], "msp"
    values = [written[fp][2]["svhn_#2"]["auroc"]
              for fp in cells[(cells.model == model) & (cells.postprocessor == method)].fingerprint]
    assert len(values) == 3
    line = next(l for l in out.splitlines() if l.startswith(f"| {model}") and f"| {method} " in l)
    cell = line.split("|")[3 + 1 + list(WEIRD_SETS).index("svhn_#2")]
    shown_auroc = cell.split("/")[1].strip().strip("*_")
    assert shown_auroc == f"{100 * np.mean(values):.2f}±{100 * np.std(values, ddof=1):.2f}"


def perturbed_checkpoints(folder, session_cache, count: int = 3) -> list[str]:
    """State dicts of the built-in digits CNN with small seeded weight noise: different weights, same architecture."""
    from oodbench.models.adapter import ModelContext, ModelSpec, load_model

    net = load_model(ModelSpec("digits-cnn"), ModelContext(cache_dir=session_cache, data_root=folder)).net
    paths = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.is_floating_point() and "running" not in k
                 else v for k, v in net.state_dict().items()}
        paths.append(str(folder / f"s{seed}.pt"))
        torch.save(state, paths[-1])
    return paths


def test_a_model_with_several_checkpoints_runs_one_cell_each(tmp_path, session_cache, capsys):
    paths = perturbed_checkpoints(tmp_path, session_cache)
    options = {"module": "oodbench.models.digits:DigitsCNN"}
    config = digits_config(tmp_path, postprocessors=["msp", "ebo"], models=[
        {"name": "torch:seeds", "label": "cnn-seeds", "checkpoints": paths, "options": options}])
    frame = run_experiment(config, cache_dir=str(session_cache), quiet=True)
    assert sorted(frame.checkpoint) == ["s0", "s0", "s1", "s1", "s2", "s2"] and frame.fingerprint.nunique() == 6
    cells = ResultStore(tmp_path / "results.sqlite", readonly=True).frame("cells")
    assert cells.weights_hash.nunique() == 3 and set(cells.model) == {"cnn-seeds"}
    # the reference: each checkpoint run on its own, as a model of its own
    (tmp_path / "separate").mkdir()
    separate = digits_config(tmp_path / "separate", postprocessors=["msp", "ebo"],
                             models=[{"name": "torch:one", "label": f"one-{i}", "checkpoint": p, "options": options}
                                     for i, p in enumerate(paths)])
    reference = run_experiment(separate, cache_dir=str(session_cache), quiet=True)
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "results.sqlite", "--format", "csv")
    tidy = pd.read_csv(io.StringIO(out))
    for method in ("msp", "ebo"):
        expected = reference[reference.postprocessor == method]["near-OOD|auroc"]
        mine = tidy[(tidy.postprocessor == method) & (tidy.dataset == "near-OOD") & (tidy.metric == "auroc")]
        assert sorted(mine.value) == pytest.approx(sorted(expected), abs=1e-12)
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "results.sqlite")
    row = next(r for r in compact_rows(out) if r["postprocessor"] == "msp")
    expected = reference[reference.postprocessor == "msp"]["near-OOD|auroc"]
    assert row["near AUROC"].rstrip("* ") == f"{100 * expected.mean():.2f}±{100 * expected.std(ddof=1):.2f}"
    assert "over 3 checkpoints" in out


# --------------------------------------------------------------------------- intervals


def test_stored_scores_reproduce_the_stored_metrics(digits_store):
    db = sqlite3.connect(digits_store)
    stored = {(fp, d): v for fp, d, v in db.execute("SELECT fingerprint, dataset, value FROM results "
                                                    "WHERE metric = 'auroc'")}
    scores = {}
    for fp, dataset, count, checksum, data in db.execute("SELECT * FROM scores"):
        assert hashlib.sha256(data).hexdigest() == checksum and len(data) == 8 * count
        scores.setdefault(fp, {})[dataset] = np.frombuffer(data, dtype="<f8")
    assert set(scores) == {fp for fp, _ in stored}
    for (fp, dataset), value in stored.items():
        id_scores, ood = scores[fp]["id_test"], scores[fp][dataset]
        labels = np.r_[np.ones(id_scores.size), np.zeros(ood.size)]
        assert roc_auc_score(labels, np.r_[id_scores, ood]) == pytest.approx(value, abs=1e-12)


def test_ci_intervals_hold_the_estimates_and_mark_ties(digits_store, capsys):
    from oodbench.metrics.bootstrap import bootstrap_replicates, interval

    code, out, _ = cli(capsys, "leaderboard", "--results", digits_store, "--ci", "--resamples", "300", "--format", "csv")
    assert code == 0
    tidy = pd.read_csv(io.StringIO(out))
    with_ci = tidy[(tidy.metric == "auroc") | ((tidy.metric == "fpr95") & (tidy.fpr_convention == "classic"))]
    with_ci = with_ci[with_ci.group != "id"]
    assert ((with_ci.ci_low <= with_ci.value + 1e-12) & (with_ci.value <= with_ci.ci_high + 1e-12)).all()
    # one cell by hand: its scores straight from SQLite, resampled with the same seed
    cell = tidy[(tidy.postprocessor == "ebo") & (tidy.model == "digits-cnn")].fingerprint.iloc[0]
    db = sqlite3.connect(digits_store)
    scores = {d: np.frombuffer(b, dtype="<f8") for d, b in
              db.execute("SELECT dataset, data FROM scores WHERE fingerprint = ?", (cell,))}
    reps = bootstrap_replicates({cell: scores.pop("id_test")}, {cell: scores}, resamples=300, seed=0)[cell]
    row = tidy[(tidy.fingerprint == cell) & (tidy.dataset == "textures") & (tidy.metric == "auroc")]
    assert (row.ci_low.item(), row.ci_high.item()) == pytest.approx(interval(reps["textures"]["auroc"]), abs=1e-12)
    far = np.mean([reps[d]["auroc"] for d in ("textures", "gaussian", "uniform")], axis=0)
    row = tidy[(tidy.fingerprint == cell) & (tidy.dataset == "far-OOD") & (tidy.metric == "auroc")]
    assert (row.ci_low.item(), row.ci_high.item()) == pytest.approx(interval(far), abs=1e-12)
    code, text, _ = cli(capsys, "leaderboard", "--results", digits_store, "--ci", "--resamples", "300")
    assert "95% bootstrap intervals: 300 resamples" in text.replace("\n  ", " ")
    assert max(map(len, text.splitlines())) <= 100


def test_damaged_scores_are_left_out_with_one_line(tmp_path, capsys):
    write_weird_store(tmp_path / "weird.sqlite")
    db = sqlite3.connect(tmp_path / "weird.sqlite")
    victim = db.execute("SELECT fingerprint FROM cells WHERE postprocessor = 'msp' LIMIT 1").fetchone()[0]
    db.execute("UPDATE scores SET data = zeroblob(length(data)) WHERE fingerprint = ? AND dataset = 'id_test'",
               (victim,))
    db.commit()
    db.close()
    code, out, err = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", "--ci", "--resamples", "50")
    assert code == 0 and "1 row(s) have no stored per-image scores" in out.replace("\n  ", " ")
    assert err.count("\n") == 1 and f"scores of cell {victim} on id_test" in err and "fail their checksum" in err


# --------------------------------------------------------------------------- the store


def test_results_command_lists_what_the_store_holds(tmp_path, capsys):
    write_weird_store(tmp_path / "weird.sqlite", checkpoints=("s0", "s1"))
    store = ResultStore(tmp_path / "weird.sqlite")
    store.write_cell(Cell(WEIRD_BENCHMARK, WEIRD_MODELS[0], "knn", "search", fingerprint="f" * 16,
                          data_fingerprint="data1", status="failed", reason="knn: k=1000 exceeds the 650 fit samples"))
    store.close()
    code, out, _ = cli(capsys, "results", tmp_path / "weird.sqlite")
    assert code == 0
    flat = out.replace("\n  ", " ")
    assert f"{WEIRD_BENCHMARK}: 13 cells (12 done, 1 failed, 0 missing)" in flat and "data1 (13 cells" in flat
    lines = [l for l in out.splitlines() if l.startswith(WEIRD_MODELS[1][:10])]
    assert len(lines) == 2 and {l.split()[-7] for l in lines} == {"s0", "s1"}  # one line per checkpoint
    assert all("[default]" in l and "3/0/0" in l for l in lines)
    assert "knn [searched] (cell ffffffffffffffff" in flat and "k=1000 exceeds the 650 fit samples" in flat
    code, failed, _ = cli(capsys, "results", tmp_path / "weird.sqlite", "--failed")
    assert failed.startswith("1 cell(s) did not finish") and "my_score&co" not in failed
    code, exported, _ = cli(capsys, "results", tmp_path / "weird.sqlite", "export")
    _, board, _ = cli(capsys, "leaderboard", "--results", tmp_path / "weird.sqlite", "--format", "csv")
    assert exported == board  # FPR@95 as the cells were run (classic), as the leaderboard shows it
    code, exported, _ = cli(capsys, "results", tmp_path / "weird.sqlite", "export", "--fpr", "both")
    every, shown = pd.read_csv(io.StringIO(exported)), pd.read_csv(io.StringIO(board))
    assert every[every.fpr_convention != "openood"].reset_index(drop=True).equals(shown)
    assert len(every[every.fpr_convention == "openood"]) == len(shown[shown.fpr_convention == "classic"]) > 0
    assert main(["results", str(tmp_path / "weird.sqlite"), "--benchmark", "cifar"]) == 2
    assert "no benchmark 'cifar'" in capsys.readouterr().err


SCHEMA_2 = """
CREATE TABLE cells (benchmark TEXT NOT NULL, model TEXT NOT NULL, postprocessor TEXT NOT NULL, setting TEXT NOT NULL,
    fingerprint TEXT NOT NULL, data_fingerprint TEXT, status TEXT NOT NULL, reason TEXT, params TEXT, tags TEXT,
    benchmark_version TEXT, oodbench_version TEXT, git_hash TEXT, config_hash TEXT, weights_hash TEXT,
    fpr_convention TEXT, search_limit INTEGER, seconds REAL, created REAL,
    PRIMARY KEY (benchmark, model, postprocessor, setting, fingerprint));
CREATE TABLE results (benchmark TEXT NOT NULL, model TEXT NOT NULL, postprocessor TEXT NOT NULL, setting TEXT NOT NULL,
    fingerprint TEXT NOT NULL, dataset TEXT NOT NULL, ood_group TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (benchmark, model, postprocessor, setting, fingerprint, dataset, metric));
CREATE TABLE datasets (benchmark TEXT NOT NULL, model TEXT NOT NULL, data_fingerprint TEXT NOT NULL,
    dataset TEXT NOT NULL, ood_group TEXT NOT NULL, fingerprint TEXT, status TEXT NOT NULL, reason TEXT,
    samples INTEGER, available INTEGER, accuracy REAL, created REAL,
    PRIMARY KEY (benchmark, model, data_fingerprint, dataset));
INSERT INTO cells VALUES ('digits', 'old-model', 'msp', 'default', 'abc', 'd0', 'done', NULL, '{}', '[]', '1', '0.1',
    NULL, NULL, 'w', 'classic', NULL, 1.0, 1.0);
INSERT INTO results VALUES ('digits', 'old-model', 'msp', 'default', 'abc', 'textures', 'far', 'auroc', 0.75);
INSERT INTO datasets VALUES ('digits', 'old-model', 'd0', 'textures', 'far', 'x', 'present', NULL, 10, 10, NULL, 1.0);
PRAGMA user_version = 2;
"""


def test_a_schema_2_store_is_read_as_it_is_and_upgraded_on_write(tmp_path, capsys):
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript(SCHEMA_2)
    db.close()
    before = (tmp_path / "old.sqlite").read_bytes()
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "old.sqlite", "--ci")
    assert code == 0 and "old-model" in out and "75.00" in out
    assert "1 row(s) have no stored per-image scores" in out.replace("\n  ", " ")
    code, _, err = cli(capsys, "leaderboard", "--results", tmp_path / "old.sqlite", "--attack")
    assert code == 2 and "no attack results" in err and err.strip().count("\n") == 0  # no table attacks yet
    assert (tmp_path / "old.sqlite").read_bytes() == before  # reading never writes
    ResultStore(tmp_path / "old.sqlite").close()
    db = sqlite3.connect(tmp_path / "old.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 5  # schema 5 added table attacks, empty
    assert db.execute("SELECT count(*) FROM attacks").fetchone()[0] == 0
    assert db.execute("SELECT model, checkpoint, preprocessing FROM cells").fetchall() == [("old-model", "", "")]
    assert db.execute("SELECT count(*) FROM scores").fetchone()[0] == 0
    assert json.loads(json.dumps(db.execute("SELECT value FROM results").fetchall())) == [[0.75]]


def test_checkpoints_entry_errors_are_one_line(tmp_path, capsys):
    for entry, message in (({"name": "torch:x", "checkpoints": []}, "'checkpoints' must be a non-empty list"),
                           ({"name": "torch:x", "checkpoints": ["a.pt", "./a.pt"]}, "checkpoint 'a.pt' is listed twice"),
                           ({"name": "torch:x", "checkpoint": "a.pt", "checkpoints": ["b.pt"]}, "not both")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"benchmark": "digits", "models": [entry], "postprocessors": ["msp"]}))
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


# --------------------------------------------------------------------------- widths


def widest(text: str) -> int:
    return max(map(len, text.splitlines()))


def test_listings_and_params_fit_100_columns_unless_wide(tmp_path, capsys):
    store = tmp_path / "settings.sqlite"
    write_settings_store(store, range(6))
    writer = ResultStore(store)  # hyperparameters longer than the table leaves them
    writer.write_cell(Cell("bench", "net", "gen", 'default{"gamma": 0.1, "M": 100}', fingerprint="gen",
                      data_fingerprint="data1", groups={"near_set": "near", "id_test": "id"},
                      metrics={"near_set": {"auroc": 0.7, "fpr95": 0.5}, "id_test": {"acc": 0.9}},
                      params={"gamma": 0.1, "M": 100, "a_long_hyperparameter_name": "x" * 60,
                              "another_one": [1, 2, 3, 4, 5, 6, 7, 8]}))
    writer.close()
    for command, wide in ((("leaderboard", "--results", store, "--show-params"), None),
                          (("list", "models"), "--wide"), (("list", "datasets"), "--wide"),
                          (("list", "benchmarks"), "--wide"), (("data", "status", "--data-root", tmp_path), "--wide")):
        code, out, _ = cli(capsys, *command)
        assert code == 0 and widest(out) <= 100, (command, [line for line in out.splitlines() if len(line) > 100])
        if wide:
            code, out, _ = cli(capsys, *command, wide)
            assert code == 0 and widest(out) > 100, command
    code, out, _ = cli(capsys, "leaderboard", "--results", store, "--show-params")
    assert "x" * 60 in out and "another_one=[1, 2, 3, 4, 5, 6, 7, 8]" in " ".join(out.split())  # wrapped, not cut
