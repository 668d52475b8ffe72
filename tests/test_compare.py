"""`oodbench compare`: robust - standard deltas and PRO gains, checked against values written
by hand into a results store, and the grouped AUROC bar chart read back from its figure."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import yaml

from oodbench.benchmark.config import load_config
from oodbench.cli import main
from oodbench.errors import OodbenchError
from oodbench.report import plots
from oodbench.tasks.compare import DELTA, comparison_results, delta_table, pro_gain_table
from oodbench.report.compare import render_comparison
from oodbench.storage.store import Cell, ResultStore
from oodbench.report.tidy import COLUMNS as TIDY_COLUMNS

POSTPROCESSORS = ["msp", "entropy", "pro_msp", "pro_ent", "gen"]  # pro_ent's base entropy present; gen has no PRO
# AUROC per (model, postprocessor): near set digits_6_9; far sets textures and gaussian
AUROC = {
    ("std", "msp"): (0.80, 0.90, 0.70), ("std", "entropy"): (0.82, 0.92, 0.72), ("std", "pro_msp"): (0.85, 0.95, 0.75),
    ("std", "pro_ent"): (0.81, 0.91, 0.71), ("std", "gen"): (0.83, 0.93, 0.73),
    ("rob", "msp"): (0.70, 0.60, 0.50), ("rob", "entropy"): (0.72, 0.62, 0.52), ("rob", "pro_msp"): (0.90, 0.80, 0.70),
    ("rob", "pro_ent"): (0.74, 0.64, 0.54), ("rob", "gen"): (0.73, 0.63, 0.53),
}
SETS = {"digits_6_9": "near", "textures": "far", "gaussian": "far"}


@pytest.fixture
def store_and_config(tmp_path):
    store_path = tmp_path / "store.sqlite"
    store = ResultStore(store_path)
    for (model, name), values in AUROC.items():
        metrics = {d: {"auroc": v, "fpr95": 1 - v} for d, v in zip(SETS, values)}
        store.write_cell(Cell("digits", model, name, "default", metrics=metrics, groups=dict(SETS),
                              tags=["standard" if model == "std" else "robust"]))
    store.write_datasets("digits", "std", [{"dataset": d, "group": g, "status": "present"} for d, g in SETS.items()])
    store.close()
    config = {"benchmark": "digits", "search": False, "postprocessors": POSTPROCESSORS, "results": str(store_path),
              "models": [{"name": "digits-cnn", "label": "std", "tags": ["standard"]},
                         {"name": "digits-cnn-robust", "label": "rob", "tags": ["robust"]}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return ResultStore(store_path, readonly=True), load_config(path), path


def test_gains_are_robust_over_standard_of_the_group_means(store_and_config):
    store, config, _ = store_and_config
    table = delta_table(comparison_results(store, config), "auroc")
    # msp: near std 0.80, rob 0.70; far std mean(0.90, 0.70) = 0.80, rob mean(0.60, 0.50) = 0.55
    assert table.loc[("msp", "near"), "std"] == pytest.approx(0.80)
    assert table.loc[("msp", "far"), "rob"] == pytest.approx(0.55)
    assert table.loc[("msp", "near"), DELTA] == pytest.approx(-0.10)
    assert table.loc[("msp", "far"), DELTA] == pytest.approx(-0.25)
    assert table.loc[("pro_msp", "far"), DELTA] == pytest.approx(0.75 - 0.85)
    fpr = delta_table(comparison_results(store, config), "fpr")
    # FPR@95 = 1 - AUROC here: far std mean(0.10, 0.30) = 0.20, rob 0.45; the gain is the reduction
    assert fpr.loc[("msp", "far"), "std"] == pytest.approx(0.20)
    assert fpr.loc[("msp", "far"), DELTA] == pytest.approx(0.20 - 0.45)
    assert list(table.index.get_level_values(0)[::2]) == POSTPROCESSORS  # config order


def test_pro_gains_only_for_pairs_present(store_and_config):
    store, config, _ = store_and_config
    gains = pro_gain_table(comparison_results(store, config), "auroc")
    assert set(gains.index.get_level_values("pair")) == {"pro_msp vs msp", "pro_ent vs entropy"}
    assert gains.loc[("pro_msp vs msp", "near"), "std"] == pytest.approx(0.05)
    assert gains.loc[("pro_msp vs msp", "far"), "rob"] == pytest.approx(0.75 - 0.55)
    assert gains.loc[("pro_ent vs entropy", "near"), "rob"] == pytest.approx(0.02)
    fpr_gains = pro_gain_table(comparison_results(store, config), "fpr")  # a lower FPR@95 is a positive gain
    assert fpr_gains.loc[("pro_msp vs msp", "near"), "std"] == pytest.approx((1 - 0.80) - (1 - 0.85))
    assert fpr_gains.loc[("pro_ent vs entropy", "far"), "rob"] == pytest.approx(
        (1 - (0.62 + 0.52) / 2) - (1 - (0.64 + 0.54) / 2))


def test_bar_chart_holds_one_bar_per_model_and_postprocessor(store_and_config):
    store, config, _ = store_and_config
    long = comparison_results(store, config)
    figure = plots.auroc_bars(long)
    axes = [ax for ax in figure.axes if ax.containers]
    assert len(axes) == 2  # near, far
    for ax, group in zip(axes, ("near", "far")):
        assert len(ax.containers) == 2  # one bar series per model
        for container, model in zip(ax.containers, ("std", "rob")):
            heights = [bar.get_height() for bar in container]
            expected = [100 * long[(long.model == model) & (long.postprocessor == p) & (long.group == group)
                                   & (long.metric == "auroc")].value.item() for p in POSTPROCESSORS]
            np.testing.assert_allclose(heights, expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == POSTPROCESSORS


def test_compare_command_prints_tables_and_writes_the_chart(store_and_config, tmp_path, capsys):
    _, _, path = store_and_config
    assert main(["compare", str(path), "--output", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("|")]
    assert rows[2] == ["msp", "near", "80.00", "70.00", "-10.00"]  # first AUROC row, after header and rule
    assert "pro_msp vs msp" in out and "pro_gen" not in out
    assert (tmp_path / "plots" / "compare_digits.png").stat().st_size > 0
    assert (tmp_path / "plots" / "compare_digits.pdf").stat().st_size > 0


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_compare_tidy_export_loads_as_it_is(store_and_config, tmp_path, capsys, fmt):
    _, _, path = store_and_config
    assert main(["compare", str(path), "--format", fmt, "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tidy = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.read_json(io.StringIO(out))
    assert list(tidy.columns) == TIDY_COLUMNS
    assert tidy.value.dtype == float and not out.startswith("#")

    def value(model, postprocessor, dataset, metric):
        rows = tidy[(tidy.model == model) & (tidy.postprocessor == postprocessor) & (tidy.dataset == dataset)
                    & (tidy.metric == metric)]
        return rows.value.item()

    assert value("std", "msp", "near-OOD", "auroc") == pytest.approx(0.80)
    assert value("rob", "msp", "far-OOD", "fpr95") == pytest.approx(1 - (0.60 + 0.50) / 2)
    assert value("robust vs standard", "msp", "near-OOD", "auroc_gain") == pytest.approx(0.70 - 0.80)
    assert value("robust vs standard", "pro_msp", "near-OOD", "fpr95_gain") == pytest.approx((1 - 0.85) - (1 - 0.90))
    assert value("std", "pro_msp vs msp", "near-OOD", "fpr95_gain") == pytest.approx((1 - 0.80) - (1 - 0.85))
    gains = tidy[tidy.metric.str.endswith("_gain")]
    assert len(gains) == 2 * 2 * len(POSTPROCESSORS) + 2 * 2 * 2 * 2 and gains.higher_is_better.all()
    assert set(tidy[tidy.metric == "fpr95"].fpr_convention) == {"classic"}
    assert not tidy[tidy.metric == "fpr95"].higher_is_better.any()


def test_missing_cells_say_run_first(store_and_config, tmp_path, capsys):
    store, config, path = store_and_config
    raw = yaml.safe_load(path.read_text())
    raw["models"].append({"name": "digits-cnn", "label": "other", "tags": ["robust"]})
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no digits results for other" in err and "oodbench run" in err and "\n" not in err


def test_compare_needs_both_tags(store_and_config):
    store, config, _ = store_and_config
    for spec in config.models:
        spec.tags = ["standard"]
    with pytest.raises(OodbenchError, match="none is tagged robust"):
        comparison_results(store, config)


def test_render_shows_signed_deltas(store_and_config):
    store, config, _ = store_and_config
    text = render_comparison(comparison_results(store, config))
    assert "+5.00" in text  # pro_msp - msp near AUROC gain on std


LONG_NAMES = {"std": ["Standard_WideResNet-28-10_seed0", "Standard_WideResNet-28-10_seed1"],
              "rob": ["Diffenderfer2021Winning_LRR_CARD_Deck", "Hendrycks2020AugMix_ResNeXt_robust"]}


def test_compare_fits_100_columns_unless_wide(tmp_path, capsys):
    store_path = tmp_path / "store.sqlite"
    store = ResultStore(store_path)
    models = []
    for short, names in LONG_NAMES.items():
        for name in names:
            for method in ("msp", "pro_msp"):
                values = AUROC[(short, method)]
                store.write_cell(Cell("digits", name, method, "default", groups=dict(SETS),
                                      metrics={d: {"auroc": v, "fpr95": 1 - v} for d, v in zip(SETS, values)}))
            models.append({"name": "digits-cnn", "label": name, "tags": ["standard" if short == "std" else "robust"]})
    store.write_datasets("digits", names[0], [{"dataset": d, "group": g, "status": "present"} for d, g in SETS.items()])
    store.close()
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"benchmark": "digits", "search": False, "postprocessors": ["msp", "pro_msp"],
                                    "results": str(store_path), "models": models}))
    assert main(["compare", str(path), "--output", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100, [line for line in out.splitlines() if len(line) > 100]
    for name in (*LONG_NAMES["std"], *LONG_NAMES["rob"], DELTA):  # every column, in one of the split tables
        assert f" {name} |" in out
    assert main(["compare", str(path), "--wide", "--output", str(tmp_path / "plots")]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) > 100
