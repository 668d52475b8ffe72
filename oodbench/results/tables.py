"""Leaderboard tables rebuilt from the results store alone (no model is loaded).

Layout like the PRO paper's Table 1: one row per (model, postprocessor); one column per
OOD set, then the near-OOD, far-OOD and overall averages (unweighted means over the sets
present), each cell ``FPR@95 / AUROC`` x100 with 2 decimals; the best value per column in
bold, the second underlined. Missing sets and failed cells are shown as such, and an
average over fewer sets than the benchmark names says so.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from oodbench.results.store import ResultStore

AVERAGES = {"near": "near-OOD", "far": "far-OOD", "all": "average"}
FPR_METRIC = {"classic": "fpr95", "openood": "fpr95_openood"}
FPR_CAPTION = {
    "classic": "FPR@95 with ID as positive (share of OOD accepted at 95% ID TPR)",
    "openood": "FPR@95 in OpenOOD v1.5's convention (OOD as positive: share of ID rejected at 95% OOD TPR)",
}


def setting_label(setting: str) -> str:
    """``search`` -> ``[searched]``, ``default`` -> ``[default]``, explicit params -> ``T=2``."""
    base, _, params = setting.partition("{")
    fixed = ", ".join(f"{k}={v}" for k, v in json.loads("{" + params).items()) if params else ""
    mode = {"search": "[searched]", "default": "[default]"}.get(base, f"[{base}]")
    return f"{fixed} {mode}".strip() if fixed and base == "search" else (fixed or mode)


def select_cells(cells: pd.DataFrame, fingerprints: list[str] | None = None, fingerprint: str | None = None,
                 every: bool = False) -> tuple[pd.DataFrame, int]:
    """The cells a table shows, and how many other stored versions it leaves out.

    `fingerprints`: exactly these cells (a run's own). `fingerprint`: cells whose data or cell
    fingerprint starts with it. Otherwise, and unless `every`, the latest cell of each
    (model, postprocessor, setting): rows computed from other data or weights stay stored.
    """
    if fingerprints is not None:
        return cells[cells.fingerprint.isin(list(fingerprints))], 0
    if fingerprint:
        chosen = cells.data_fingerprint.fillna("").str.startswith(fingerprint) | cells.fingerprint.str.startswith(fingerprint)
        cells = cells[chosen]
    if every or cells.empty:
        return cells, 0
    latest = cells.sort_values("created", kind="stable").groupby(["model", "postprocessor", "setting"]).tail(1)
    return cells.loc[sorted(latest.index)], len(cells) - len(latest)


def leaderboard_frame(store: ResultStore, benchmark: str, models: list[str] | None = None,
                      postprocessors: list[str] | None = None, fpr: str = "classic",
                      fingerprints: list[str] | None = None, fingerprint: str | None = None,
                      every: bool = False) -> pd.DataFrame:
    """One row per shown cell (see `select_cells`); columns ``<set>|fpr``, ``<set>|auroc``.

    ``label`` names the postprocessor, with its setting when the table holds more than one
    setting of it for a model (``msp [searched]``, ``ebo temperature=2``), and with the cell's
    fingerprint when `every` shows several versions of one setting.
    """
    cells, hidden = select_cells(store.frame("cells", benchmark=benchmark, model=models, postprocessor=postprocessors),
                                 fingerprints, fingerprint, every)
    results = store.frame("results", benchmark=benchmark, model=models, postprocessor=postprocessors)
    results = results[results.fingerprint.isin(set(cells.fingerprint))]
    datasets = store.frame("datasets", benchmark=benchmark, model=models)
    datasets = datasets[datasets.data_fingerprint.isin(set(cells.data_fingerprint))]
    fpr_metric = FPR_METRIC[fpr]
    ood = datasets[datasets.ood_group.isin(["near", "far"])]
    order = list(dict.fromkeys(ood.sort_values("ood_group", key=lambda g: g.map({"near": 0, "far": 1}), kind="stable").dataset))
    group_of = dict(zip(ood.dataset, ood.ood_group))
    for dataset, group in zip(results.dataset, results.ood_group):
        if group in ("near", "far") and dataset not in group_of:
            group_of[dataset] = group
            order.append(dataset)
    missing = sorted(set(ood[ood.status == "missing"].dataset) - set(ood[ood.status == "present"].dataset))
    values_of = {key: dict(zip(zip(group.dataset, group.metric), group.value))
                 for key, group in results.groupby(["model", "postprocessor", "setting", "fingerprint"])}
    settings = cells.groupby(["model", "postprocessor"]).setting.nunique()
    versions = cells.groupby(["model", "postprocessor", "setting"]).fingerprint.nunique()

    rows = []
    for cell in cells.itertuples():
        label = cell.postprocessor
        if settings[(cell.model, cell.postprocessor)] > 1:
            label += f" {setting_label(cell.setting)}"
        if versions[(cell.model, cell.postprocessor, cell.setting)] > 1:
            label += f" @{cell.fingerprint[:8]}"
        row = {"model": cell.model, "postprocessor": cell.postprocessor, "label": label, "setting": cell.setting,
               "fingerprint": cell.fingerprint, "data_fingerprint": cell.data_fingerprint, "status": cell.status,
               "reason": cell.reason, "params": cell.params, "tags": cell.tags}
        values = values_of.get((cell.model, cell.postprocessor, cell.setting, cell.fingerprint), {})
        row["acc"] = values.get(("id_test", "acc"), np.nan)
        for dataset in order:
            row[f"{dataset}|fpr"] = values.get((dataset, fpr_metric), np.nan)
            row[f"{dataset}|auroc"] = values.get((dataset, "auroc"), np.nan)
        for key in AVERAGES:
            members = [d for d in order if key == "all" or group_of[d] == key]
            present = [d for d in members if not np.isnan(row[f"{d}|auroc"])]
            for metric in ("fpr", "auroc"):
                row[f"{AVERAGES[key]}|{metric}"] = (np.mean([row[f"{d}|{metric}"] for d in present])
                                                    if present and cell.status == "done" else np.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        model_rank = {m: i for i, m in enumerate(models or list(dict.fromkeys(frame.model)))}
        pp_rank = {p: i for i, p in enumerate(postprocessors or list(dict.fromkeys(frame.postprocessor)))}
        frame = frame.sort_values(["model", "postprocessor"], key=lambda s: s.map(model_rank if s.name == "model" else pp_rank).fillna(1e9), kind="stable")
        frame = frame.reset_index(drop=True)
    frame.attrs.update(benchmark=benchmark, fpr=fpr, datasets=order, groups=group_of, missing=missing,
                       hidden=hidden, data_fingerprints=sorted(set(cells.data_fingerprint.dropna())),
                       sampling=sampling_note(datasets, cells))
    return frame


def sampling_note(datasets: pd.DataFrame, cells: pd.DataFrame) -> str:
    """What was sampled: splits limited below their size (``ID test 1,000 of 9,000``) and
    the validation cap of input-gradient searches; empty when everything was used."""
    limited = datasets[(datasets.available > datasets.samples) & datasets.samples.notna()]
    names = {"id:test": "ID test", "id:val": "ID val", "id:train": "ID train"}
    parts = list(dict.fromkeys(f"{names.get(r.dataset, r.dataset)} {int(r.samples):,} of {int(r.available):,}"
                               for r in limited.itertuples()))
    limits = sorted(set(cells.search_limit.dropna().astype(int))) if "search_limit" in cells else []
    if limits:
        parts.append(f"input-gradient searches on at most {limits[-1]:,} ID + {limits[-1]:,} OOD validation images")
    return "; ".join(parts)


def _columns(frame: pd.DataFrame) -> list[str]:
    return list(frame.attrs["datasets"]) + list(AVERAGES.values())


def _rank_marks(values: pd.Series, lower_is_better: bool) -> dict[int, str]:
    ranked = values.dropna().sort_values(ascending=lower_is_better)
    unique = list(dict.fromkeys(ranked.round(12)))
    marks = {}
    for index, value in ranked.round(12).items():
        if value == unique[0]:
            marks[index] = "best"
        elif len(unique) > 1 and value == unique[1]:
            marks[index] = "second"
    return marks


def caption(frame: pd.DataFrame) -> str:
    groups = frame.attrs["groups"]
    missing = frame.attrs["missing"]
    text = (f"{frame.attrs['benchmark']}: FPR@95 / AUROC (x100). {FPR_CAPTION[frame.attrs['fpr']]}. "
            "Best per column in bold, second underlined.")
    if missing:
        by_group = {g: [d for d in missing if groups.get(d) == g] for g in ("near", "far")}
        detail = "; ".join(f"{g}-OOD average over the sets present (missing: {', '.join(d)})"
                           for g, d in by_group.items() if d)
        text += f" MISSING datasets: {', '.join(missing)} — {detail}."
    if any(name.startswith("pro_") for name in frame.get("postprocessor", [])):
        text += " PRO eps is in [0,1]-pixel units (normalisation happens inside the model)."
    if frame.attrs.get("sampling"):
        text += f" Sampled: {frame.attrs['sampling']}."
    fingerprints = frame.attrs.get("data_fingerprints", [])
    if len(fingerprints) == 1:
        text += f" Data fingerprint {fingerprints[0]}."
    elif fingerprints:
        text += f" Rows from {len(fingerprints)} data fingerprints (runs of different data or definitions)."
    if frame.attrs.get("hidden"):
        text += (f" {frame.attrs['hidden']} older result(s) of the same settings under other fingerprints are not "
                 "shown (leaderboard --all shows every stored version).")
    return text


def render(frame: pd.DataFrame, fmt: str = "markdown", show_params: bool = False) -> str:
    """The leaderboard as markdown, csv or latex."""
    from tabulate import tabulate

    if frame.empty:
        return f"(no results for benchmark '{frame.attrs.get('benchmark')}')"
    columns = _columns(frame)
    missing = set(frame.attrs["missing"])
    if fmt == "csv":
        keep = ["model", "postprocessor", "label", "setting", "fingerprint", "status", "params", "acc"] + [
            f"{c}|{m}" for c in columns for m in ("fpr", "auroc")]
        out = frame[keep].copy()
        for column in keep[7:]:
            out[column] = out[column] * 100
        return out.to_csv(index=False, float_format="%.2f")
    bold, under = ("**", "**"), ("<u>", "</u>")
    if fmt == "latex":
        bold, under = (r"\textbf{", "}"), (r"\underline{", "}")
    marks = {}
    for column in columns:
        marks[(column, "fpr")] = _rank_marks(frame[f"{column}|fpr"], lower_is_better=True)
        marks[(column, "auroc")] = _rank_marks(frame[f"{column}|auroc"], lower_is_better=False)

    def fmt_value(index: int, column: str, metric: str) -> str:
        value = frame.at[index, f"{column}|{metric}"]
        text = f"{100 * value:.2f}"
        mark = marks[(column, metric)].get(index)
        if mark == "best":
            return f"{bold[0]}{text}{bold[1]}"
        if mark == "second":
            return f"{under[0]}{text}{under[1]}"
        return text

    body = []
    for index, row in frame.iterrows():
        line = [row["model"], row["label"]]
        if show_params:
            params = json.loads(row["params"] or "{}")
            line.append(", ".join(f"{k}={v}" for k, v in params.items()) or "-")
        line.append("-" if np.isnan(row["acc"]) else f"{100 * row['acc']:.2f}")
        for column in columns:
            if row["status"] != "done":
                line.append(row["status"].upper())
            elif column in missing:
                line.append("missing")
            elif np.isnan(row[f"{column}|auroc"]):
                line.append("-")
            else:
                line.append(f"{fmt_value(index, column, 'fpr')} / {fmt_value(index, column, 'auroc')}")
        body.append(line)
    headers = ["model", "postprocessor"] + (["params"] if show_params else []) + ["ACC"] + columns
    if fmt == "latex":
        table = tabulate(body, headers=headers, tablefmt="latex_raw")
        return f"% {caption(frame)}\n\\begin{{table}}\n\\caption{{{caption(frame)}}}\n{table}\n\\end{{table}}"
    failed = frame[frame.status != "done"]
    notes = "".join(f"\n- {r.model} / {r.postprocessor}: {r.status}: {r.reason}" for r in failed.itertuples())
    return f"{caption(frame)}\n\n{tabulate(body, headers=headers, tablefmt='pipe')}{notes}"
