"""Machine-readable exports: one long ("tidy") table per command, the same columns for all.

Each row is one number: ``benchmark, fingerprint, model, checkpoint, postprocessor,
setting, searched, params, dataset, group, metric, value, fpr_convention,
higher_is_better, status, reason`` — values are fractions (tables show them x100),
``fpr_convention`` is ``classic`` or ``openood`` on FPR@95 rows and empty elsewhere, and
``higher_is_better`` says which way each metric points. Gains (``*_gain`` metrics) are
signed so that positive is always better: the AUROC difference, and the FPR@95
*reduction*. The setting columns tell every cell apart: ``setting`` (the store's key:
searched or default, fixed hyperparameters, a convention profile), ``searched`` (whether
the validation search chose the hyperparameters) and ``params`` (the hyperparameters the
cell ran with, JSON). A cell that did not finish is one row with its ``status``
(``failed`` or ``missing``), an empty metric and value, and its ``reason``; finished
rows say ``done``. With bootstrap intervals, ``ci_low`` and ``ci_high`` hold the 95%
interval (AUROC and FPR@95 rows). Rows come in a fixed order, whatever order the cells
finished in (local or Ray): by benchmark, model, checkpoint, postprocessor, setting and
cell fingerprint, then the cell's datasets in the benchmark's order. CSV and JSON
(records) carry exactly the same rows; no prose, no comment lines, so
``pandas.read_csv`` loads the CSV as it is.

- leaderboard: ``attack`` (``none``) and ``eps`` (0) columns after these, as
  `leaderboard --attack`'s rows carry them (the threat model, the budget in [0,1] pixel
  units), so clean and attacked tables concatenate; one row per cell (each checkpoint its
  own), dataset = ``id_test`` (ACC), each OOD set (AUROC, AUPR-In/Out, FPR@95 in the
  table's convention: the one the cells were run under, or ``--fpr``'s; ``results export``
  gives both), and group ``mean`` rows for the ``near-OOD``, ``far-OOD`` and ``average``
  columns (unweighted means over the sets present);
- full-spectrum benchmarks add ``acc`` on each covariate-shifted set (group ``csid``),
  ``fs_acc`` on ``id_test`` (the ID test and shifted sets together), and per OOD set and mean
  the FS-OOD metrics ``fs_auroc``, ``fs_aupr_in``, ``fs_aupr_out``, ``fs_fpr95`` (shifted sets
  counted as ID, OpenOOD v1.5's FS-OOD) beside the plain ones;
- compare and calibration: see `comparison_tidy` and `calibration_tidy`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from oodbench.benchmark.leaderboard import AVERAGES, FS

COLUMNS = ["benchmark", "fingerprint", "model", "checkpoint", "postprocessor", "setting", "searched", "params",
           "dataset", "group", "metric", "value", "fpr_convention", "higher_is_better", "status", "reason"]
CELL_ORDER = ["model", "checkpoint", "postprocessor", "setting", "fingerprint"]  # unique per cell
CI_COLUMNS = ["ci_low", "ci_high"]
CLEAN_ATTACK = {"attack": "none", "eps": 0.0}  # the leaderboard's rows: no attack
FPR_ROWS = {"fpr95": "classic", "fpr95_openood": "openood"}  # stored metric -> convention
LOWER_IS_BETTER = {"fpr95", "fs_fpr95", "ece", "nll"}
OOD_STORED = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood")
MEAN_GROUP = "mean"


def tidy_row(**values) -> dict:
    metric = values.get("metric", "")
    row = {column: values.get(column, "") for column in COLUMNS}
    row["higher_is_better"] = values.get("higher_is_better", metric not in LOWER_IS_BETTER if metric else "")
    row["status"] = values.get("status", "done")
    return row


def leaderboard_tidy(frame: pd.DataFrame, store, resamples: int | None = None, seed: int = 0,
                     every_fpr: bool = False) -> pd.DataFrame:
    """Every stored metric of the frame's finished cells, plus the group means, with FPR@95 in
    the frame's convention (the one its table shows), or with `every_fpr` in both; one row per
    cell that did not finish (its status and reason). Cells in `CELL_ORDER`."""
    frame_cells = frame.sort_values(CELL_ORDER, kind="stable")
    cells = frame_cells[frame_cells.status == "done"]
    results = store.frame("results", benchmark=frame.attrs["benchmark"])
    results = results[results.fingerprint.isin(set(cells.fingerprint))]
    values = {(r.fingerprint, r.dataset, r.metric): r.value for r in results.itertuples()}
    intervals = _cell_intervals(cells, frame.attrs, store, resamples, seed) if resamples else {}
    sets, groups = list(frame.attrs["datasets"]), frame.attrs["groups"]
    rows = []
    for cell in frame_cells.to_dict("records"):
        base = {k: cell[k] for k in CELL_ORDER}
        base.update(benchmark=frame.attrs["benchmark"], searched=cell["setting"].startswith("search"),
                    params=cell["params"])
        if cell["status"] != "done":
            rows.append(tidy_row(**base, value=np.nan, status=cell["status"], reason=cell["reason"] or ""))
            continue
        for dataset, group, metric in [("id_test", "id", "acc"), ("id_test", "id", "fs_acc"),
                                       *((c, "csid", "acc") for c in frame.attrs.get("csid", []))]:
            if (cell["fingerprint"], dataset, metric) in values:
                rows.append(tidy_row(**base, dataset=dataset, group=group, metric=metric,
                                     value=values[(cell["fingerprint"], dataset, metric)]))
        present = [d for d in sets if (cell["fingerprint"], d, "auroc") in values]
        means = {label: [d for d in present if key == "all" or groups.get(d) == key] for key, label in AVERAGES.items()}
        for dataset, group in [(d, groups.get(d, "")) for d in present] + [(m, MEAN_GROUP) for m in means if means[m]]:
            members = means.get(dataset, [dataset]) if group == MEAN_GROUP else [dataset]
            for prefix, stored in [("", s) for s in OOD_STORED] + [("fs_", s) for s in OOD_STORED]:
                if not every_fpr and FPR_ROWS.get(stored, frame.attrs["fpr"]) != frame.attrs["fpr"]:
                    continue
                found = [values.get((cell["fingerprint"], d, prefix + stored)) for d in members]
                if any(v is None for v in found):
                    continue
                metric = prefix + ("fpr95" if stored in FPR_ROWS else stored)
                row = tidy_row(**base, dataset=dataset, group=group, metric=metric, value=float(np.mean(found)),
                               fpr_convention=FPR_ROWS.get(stored, ""))
                short = "auroc" if stored == "auroc" else "fpr" if FPR_ROWS.get(stored) == frame.attrs["fpr"] else None
                if intervals and short:
                    column = (FS if prefix else "") + dataset
                    row["ci_low"], row["ci_high"] = intervals.get((cell["fingerprint"], column, short),
                                                                  (np.nan, np.nan))
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS + (CI_COLUMNS if intervals else [])).assign(**CLEAN_ATTACK)


def _cell_intervals(cells: pd.DataFrame, attrs: dict, store, resamples: int,
                    seed: int) -> dict[tuple[str, str, str], tuple]:
    """(fingerprint, column, auroc | fpr) -> the 95% interval of that cell alone."""
    from oodbench.report.intervals import add_intervals
    from oodbench.benchmark.leaderboard import metric_columns

    rows = cells.assign(checkpoints=1, fingerprints=[[fp] for fp in cells.fingerprint]).reset_index(drop=True)
    rows.attrs.update(attrs)
    rows = add_intervals(rows, store, resamples, seed)
    out = {}
    for row in rows.to_dict("records"):
        for column in metric_columns(rows):
            for metric in ("auroc", "fpr"):
                out[(row["fingerprint"], column, metric)] = (row[f"{column}|{metric}|low"],
                                                             row[f"{column}|{metric}|high"])
    return out


def calibration_tidy(frame: pd.DataFrame, benchmark: str, fingerprint: str,
                     models: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """The calibration-under-noise rows: per model and noise level s (``setting``
    ``noise_s=<s>``, and the number in an extra column ``noise_s``), ACC, ECE and NLL on
    ``id_test`` and the MSP AUROC per OOD group (dataset ``near-OOD`` / ``far-OOD``, group
    ``mean``). `fingerprint` is the data fingerprint of the run; `models` maps the frame's model
    names to (model, checkpoint)."""
    rows = []
    for record in frame.to_dict("records"):
        model, checkpoint = models.get(record["model"], (record["model"], ""))
        base = dict(benchmark=benchmark, fingerprint=fingerprint, model=model, checkpoint=checkpoint,
                    setting=f"noise_s={record['level']:g}")
        found = [dict(dataset="id_test", group="id", metric=m, value=record[m]) for m in ("acc", "ece", "nll")]
        found += [dict(postprocessor="msp", dataset=AVERAGES.get(c[len("auroc_"):], c), group=MEAN_GROUP,
                       metric="auroc", value=record[c]) for c in record if c.startswith("auroc_")]
        rows += [{**tidy_row(**base, **values), "noise_s": record["level"]} for values in found]
    return pd.DataFrame(rows, columns=COLUMNS + ["noise_s"])


def render_tidy(frame: pd.DataFrame, fmt: str) -> str:
    """CSV (header + rows, full precision) or JSON (a list of records)."""
    if fmt == "json":
        return frame.to_json(orient="records", indent=1, double_precision=15)
    return frame.to_csv(index=False)
