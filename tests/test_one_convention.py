"""One FPR@95 convention per printed number: `run`, `leaderboard` (text, CSV, JSON, LaTeX),
`compare` and the tables a run writes show the same FPR@95 for the same cells, in the
convention the cells were run under, and each caption names exactly that one; a store whose
cells were run under two conventions shows each under its own; ``--fpr`` asks for one."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest

from oodbench.cli import main
from oodbench.storage.store import ResultStore
from tests.conftest import compact_rows, digits_config

CLASSIC = "FPR@95 with ID as positive"
OPENOOD = "FPR@95 in OpenOOD v1.5's convention"
COMPACT = ("near AUROC", "near FPR@95", "far AUROC", "far FPR@95")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def conventions_named(text: str) -> set[str]:
    """Which FPR@95 conventions a caption names (either wording, and the profile descriptions')."""
    text = " ".join(text.split())
    named = {"classic" for phrase in (CLASSIC, "ID-positive", "ID positive") if phrase in text}
    return named | {"openood" for phrase in (OPENOOD, "OOD-positive", "OOD as positive") if phrase in text}


@pytest.fixture(scope="module")
def openood_run(tmp_path_factory, session_cache):
    """`oodbench run` of a digits experiment with ``conventions: openood`` (two models, three
    logit methods): (config, store, the run's printed table, its folder)."""
    folder = tmp_path_factory.mktemp("one-convention")
    config = digits_config(folder, postprocessors=["msp", "ebo", "gen"], conventions="openood", models=[
        {"name": "digits-cnn", "tags": ["standard"]}, {"name": "digits-cnn-robust", "tags": ["robust"]}])
    assert main(["run", str(config), "--cache-dir", str(session_cache), "--threads", "1"]) == 0
    return config, folder / "results.sqlite", folder


def test_run_and_leaderboard_print_the_same_numbers_in_the_run_convention(openood_run, capsys, session_cache):
    config, store, folder = openood_run
    code, run_text, _ = cli(capsys, "run", config, "--cache-dir", session_cache, "--threads", "1")  # all cached
    assert code == 0
    code, board_text, _ = cli(capsys, "leaderboard", "--results", store)
    assert code == 0
    assert board_text.strip() == run_text.strip()  # cell for cell, caption included
    head = board_text.split("\n\n")[0]
    assert conventions_named(head) == {"openood"}
    rows = compact_rows(board_text)
    assert len(rows) == 6
    # the printed FPR@95 is OpenOOD's (OOD positive), as stored for these cells
    results = ResultStore(store, readonly=True).frame("results", benchmark="digits")
    cells = ResultStore(store, readonly=True).frame("cells", benchmark="digits")
    differ = []
    for row in rows:
        fingerprint = cells[(cells.model == row["model"]) & (cells.postprocessor == row["postprocessor"])].fingerprint
        stored = results[results.fingerprint.isin(fingerprint) & (results.dataset == "digits_6_9")]  # the near set
        openood = stored[stored.metric == "fpr95_openood"].value.item()
        classic = stored[stored.metric == "fpr95"].value.item()
        assert row["near FPR@95"].rstrip("*") == f"{100 * openood:.2f}"
        differ.append(f"{100 * openood:.2f}" != f"{100 * classic:.2f}")
    assert any(differ)  # the two conventions print different numbers on this data
    # the full tables `run` wrote say the same
    written = pd.read_csv(folder / "tables" / "digits" / "leaderboard.csv")
    assert set(written[written.metric == "fpr95"].fpr_convention) == {"openood"}
    assert conventions_named((folder / "tables" / "digits" / "leaderboard.md").read_text().split("\n\n")[0]) == {
        "openood"}


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_tidy_exports_hold_the_printed_numbers_only(openood_run, capsys, fmt):
    _, store, _ = openood_run
    _, text, _ = cli(capsys, "leaderboard", "--results", store)
    code, out, _ = cli(capsys, "leaderboard", "--results", store, "--format", fmt)
    assert code == 0
    tidy = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.read_json(io.StringIO(out))
    assert set(tidy[tidy.metric == "fpr95"].fpr_convention) == {"openood"}
    for row in compact_rows(text):
        mine = tidy[(tidy.model == row["model"]) & (tidy.postprocessor == row["postprocessor"])]
        for header in COMPACT:
            group, metric = header.split()
            value = mine[(mine.dataset == f"{group}-OOD") & (mine.metric == ("fpr95" if "FPR" in metric else
                                                                             "auroc"))].value.item()
            assert row[header].rstrip("*") == f"{100 * value:.2f}"
    code, out, _ = cli(capsys, "results", store, "export", "--format", fmt)  # as run, like the leaderboard
    assert code == 0 and out == cli(capsys, "leaderboard", "--results", store, "--format", fmt)[1]
    code, out, _ = cli(capsys, "results", store, "export", "--fpr", "both")  # every stored number, labelled
    assert code == 0 and set(pd.read_csv(io.StringIO(out)).fpr_convention.dropna()) == {"classic", "openood"}


def test_latex_shows_the_printed_numbers_and_names_one_convention(openood_run, capsys):
    _, store, _ = openood_run
    _, text, _ = cli(capsys, "leaderboard", "--results", store)
    code, latex, _ = cli(capsys, "leaderboard", "--results", store, "--format", "latex")
    assert code == 0
    caption = re.search(r"\\caption\{(.*)\}", latex).group(1)
    assert conventions_named(caption.replace(r"$\pm$", "±")) == {"openood"}
    lines = [l for l in latex.splitlines() if l.endswith(r"\\") and "&" in l][2:]
    model = ""
    for line, row in zip(lines, compact_rows(text)):
        cells = [re.sub(r"\\textbf\{(.*)\}|\\underline\{(.*)\}", r"\1\2", c.strip()) for c in line[:-2].split("&")]
        model = cells[0].replace(r"\_", "_") or model
        assert (model, cells[1]) == (row["model"], row["postprocessor"])
        assert cells[3:] == [row[h].rstrip("*") for h in COMPACT]


def test_compare_shows_the_run_convention(openood_run, capsys):
    config, store, folder = openood_run
    _, text, _ = cli(capsys, "leaderboard", "--results", store)
    code, out, _ = cli(capsys, "compare", config, "--format", "csv", "--output", folder / "plots")
    assert code == 0
    tidy = pd.read_csv(io.StringIO(out))
    fpr = tidy[(tidy.metric == "fpr95")]
    assert set(fpr.fpr_convention) == {"openood"}
    for row in compact_rows(text):
        value = fpr[(fpr.model == row["model"]) & (fpr.postprocessor == row["postprocessor"])
                    & (fpr.dataset == "near-OOD")].value.item()
        assert row["near FPR@95"].rstrip("*") == f"{100 * value:.2f}"
    code, out, _ = cli(capsys, "compare", config, "--output", folder / "plots")
    assert code == 0 and conventions_named(out.split("\n\n")[0]) == {"openood"}
    assert "FPR@95: FPR@95" not in " ".join(out.split())  # the convention is named once


def test_a_store_of_two_conventions_shows_each_under_its_own(openood_run, capsys, session_cache, tmp_path):
    config, store, folder = openood_run
    mixed = tmp_path / "mixed.sqlite"
    mixed.write_bytes(store.read_bytes())
    code, paper_text, _ = cli(capsys, "run", config, "--conventions", "paper", "--results", mixed, "--models",
                              "digits-cnn", "--cache-dir", session_cache, "--threads", "1", "--tables", tmp_path)
    assert code == 0 and conventions_named(paper_text.split("\n\n")[0]) == {"classic"}
    code, out, _ = cli(capsys, "leaderboard", "--results", mixed, "--tables", tmp_path / "both")
    assert code == 0
    tables = [part for part in out.split("\n\n") if part.startswith("digits:")]
    assert [conventions_named(t) for t in tables] == [{"openood"}, {"classic"}]
    assert "other cell(s) of this benchmark were run under the other one" in " ".join(tables[0].split())
    openood_rows, classic_rows = (compact_rows(part) for part in out.split("digits: ")[1:])
    assert len(openood_rows) == 6 and len(classic_rows) == 3
    assert [r["near FPR@95"] for r in classic_rows] == [r["near FPR@95"] for r in compact_rows(paper_text)]
    assert {p.name for p in (tmp_path / "both").iterdir()} == {"digits-fpr-openood", "digits-fpr-classic"}
    # one convention for every row when asked, and the caption says it was asked
    code, out, _ = cli(capsys, "leaderboard", "--results", mixed, "--fpr", "classic")
    assert code == 0 and out.count("digits: ") == 1 and conventions_named(out.split("\n\n")[0]) == {"classic"}
    assert "as asked (--fpr)" in " ".join(out.split())
    # a table of both profiles names every row's, and its caption says so once
    caption = " ".join(out.split("\n\n")[0].split())
    assert "Conventions:" not in caption and "Rows of 2 convention profiles, each row's named in its label: openood (" \
        in caption and "; paper (" in caption
    labels = [row["postprocessor"] for row in compact_rows(out)]
    assert len(labels) == 9 and all(label.endswith((", openood]", ", paper]")) for label in labels), labels
    assert sum(label.endswith(", paper]") for label in labels) == 3
    code, out, _ = cli(capsys, "leaderboard", "--results", mixed, "--format", "json")
    tidy = pd.read_json(io.StringIO(out))
    by_setting = tidy[tidy.metric == "fpr95"].groupby(tidy.setting.str.contains("openood")).fpr_convention
    assert {k: set(v) for k, v in by_setting} == {True: {"openood"}, False: {"classic"}}
    assert np.isfinite(tidy.value).all()


def test_run_says_in_one_line_that_nothing_is_published_for_its_benchmark(openood_run, capsys, session_cache):
    config, _, _ = openood_run
    code, out, _ = cli(capsys, "run", config, "--cache-dir", session_cache, "--threads", "1", "--reference",
                       "openood-v1.5")
    assert code == 0 and "Published reference" not in out and "has no CrossEntropy value" not in out
    assert "openood-v1.5 publishes nothing for digits; it covers cifar10, cifar100" in out  # one line



def test_seeds_run_under_two_conventions_are_averaged_only_in_one_asked_for(tmp_path, capsys):
    from oodbench.metrics.detection import ood_metrics
    from oodbench.storage.store import Cell

    rng = np.random.default_rng(0)
    store = ResultStore(tmp_path / "seeds.sqlite")
    for seed, setting in ((1, "default"), (2, "default@openood")):
        benchmark = f"osr_toy_seed{seed}"
        store.write_datasets(benchmark, "lenet", [{"dataset": "unseen", "group": "near", "status": "present",
                                                   "samples": 50}], "data")
        scores, ood = rng.normal(1, 1, 60), rng.normal(0, 1, 50)
        store.write_cell(Cell(benchmark, "lenet", "msp", setting, fingerprint=f"{seed:016d}", data_fingerprint="data",
                              metrics={"unseen": ood_metrics(scores, ood), "id_test": {"acc": 0.9}},
                              groups={"unseen": "near", "id_test": "id"}, scores={"id_test": scores, "unseen": ood}))
    store.close()
    code, _, err = cli(capsys, "leaderboard", "--results", tmp_path / "seeds.sqlite", "--benchmark", "osr_toy")
    assert code == 2 and "different FPR@95 conventions" in err and "--fpr" in err and len(err.splitlines()) == 1
    code, out, _ = cli(capsys, "leaderboard", "--results", tmp_path / "seeds.sqlite", "--benchmark", "osr_toy",
                       "--fpr", "openood")
    assert code == 0 and "over seeds 1, 2" in out and conventions_named(out.split("\n\n")[0]) == {"openood"}
