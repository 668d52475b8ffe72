"""Leaderboard frames: the stored cells of one benchmark as a DataFrame (no model is loaded).

`leaderboard_frame`: one row per shown cell, with each OOD set's FPR@95 and AUROC and the
near-OOD, far-OOD and overall averages (unweighted means over the sets present).
`aggregate_checkpoints`: one row per (model, postprocessor, setting), the mean and standard
deviation over the model's checkpoints (one row of one when it has one). The run returns
these frames; tasks (compare) read them; the report floor (`oodbench.report`) renders them
as text, LaTeX, tidy exports and HTML; `oodbench.benchmark.cells` chooses which stored cells
a frame shows. Missing sets and failed cells are kept as such.

A full-spectrum benchmark (``csid:`` sets, covariate-shifted ID) adds, per row, the accuracy on
each shifted set (``<set>|acc``) and over the ID test and all shifted sets together (``FS|acc``),
and an ``FS <column>`` for every OOD set and average: the FS-OOD metrics, with the shifted sets
counted as ID, beside the plain ones (`fs_columns`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from oodbench.benchmark.cells import (FPR_METRIC, conventions_of, last_read, limited_runs, named_profile, newest_first,
                                      run_fpr, sampled_data, select_cells, setting_label)
from oodbench.storage.store import FALLBACK, ResultStore

AVERAGES = {"near": "near-OOD", "far": "far-OOD", "all": "average"}
FS = "FS "  # column prefix of the full-spectrum metrics (stored as fs_<metric>)
FS_ACC = "FS|acc"
FPR_CAPTION = {
    "classic": "FPR@95 with ID as positive (share of OOD accepted at 95% ID TPR)",
    "openood": "FPR@95 in OpenOOD v1.5's convention (OOD as positive: share of ID rejected at 95% OOD TPR)",
}


def leaderboard_frames(store: ResultStore, benchmark: str, models: list[str] | None = None,
                       postprocessors: list[str] | None = None, fpr: str | None = None,
                       fingerprint: str | None = None, every: bool = False,
                       conventions: str | None = None) -> list[pd.DataFrame]:
    """The leaderboard of `benchmark` as one frame per FPR@95 convention: with `fpr` None, each
    cell's FPR@95 in the convention it was run under (`run_fpr`), so that a table shows the numbers
    its run printed; cells run under different conventions make one frame each, whose
    ``attrs["fpr_others"]`` counts the shown cells of the other conventions (the caption says so).
    An explicit `fpr` shows every cell in that one convention (``attrs["fpr_asked"]``). Other
    arguments as `leaderboard_frame`."""
    frame = leaderboard_frame(store, benchmark, models, postprocessors, fpr=fpr or "classic",
                              fingerprint=fingerprint, every=every, conventions=conventions)
    if frame.empty:
        return [frame]
    cells = store.frame("cells", benchmark=benchmark).set_index("fingerprint").loc[list(frame.fingerprint)]
    convention = run_fpr(cells.reset_index())
    used = list(dict.fromkeys(convention))
    if fpr is not None:
        frame.attrs["fpr_asked"] = any(c != fpr for c in used)
        return [frame]
    frames = []
    for name in used:
        chosen = [fp for fp, c in zip(frame.fingerprint, convention) if c == name]
        part = leaderboard_frame(store, benchmark, models, postprocessors, fpr=name, fingerprints=chosen)
        part.attrs.update(hidden=frame.attrs["hidden"] if not frames else 0,
                          fpr_others={c: int((convention == c).sum()) for c in used if c != name})
        frames.append(part)
    return frames


def leaderboard_frame(store: ResultStore, benchmark: str, models: list[str] | None = None,
                      postprocessors: list[str] | None = None, fpr: str = "classic",
                      fingerprints: list[str] | None = None, fingerprint: str | None = None,
                      every: bool = False, conventions: str | None = None,
                      limit: int | None = None) -> pd.DataFrame:
    """One row per shown cell (see `select_cells`); columns ``<set>|fpr``, ``<set>|auroc``.
    `conventions`: only cells computed under that profile (`oodbench.benchmark.conventions`), named in
    the caption; None: every profile's cells. `limit`: only cells of the ``--limit limit`` run
    where the store holds one (a command given ``--limit`` reads that run even beside a whole
    one); with none sampled so, the usual choice (a limit above every split's size reads them whole).

    ``label`` names the postprocessor, with its setting when the table holds more than one
    setting of it for a model (``msp [searched]``, ``ebo temperature=2``), and with the cell's
    fingerprint when `every` shows several versions of one setting.
    """
    cells = store.frame("cells", benchmark=benchmark, model=models, postprocessor=postprocessors)
    if conventions is not None:
        cells = cells[cells.setting.map(conventions_of) == conventions]
    datasets = store.frame("datasets", benchmark=benchmark, model=models)
    if limit is not None and (runs := limited_runs(datasets, limit)):
        cells = cells[[pair in runs for pair in zip(cells.model, cells.data_fingerprint)]]
    read = last_read(datasets)
    cells, hidden = select_cells(cells, fingerprints, fingerprint, every, sampled_data(datasets), read)
    results = store.frame("results", benchmark=benchmark, model=models, postprocessor=postprocessors)
    results = results[results.fingerprint.isin(set(cells.fingerprint))]
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
    shifted = datasets[datasets.ood_group == "csid"]
    csid = list(dict.fromkeys([*shifted.dataset, *results[results.ood_group == "csid"].dataset]))
    csid_missing = sorted(set(shifted[shifted.status == "missing"].dataset)
                          - set(shifted[shifted.status == "present"].dataset))
    values_of = {key: dict(zip(zip(group.dataset, group.metric), group.value))
                 for key, group in results.groupby(["model", "postprocessor", "setting", "fingerprint"])}
    settings = cells.groupby(["model", "postprocessor"]).setting.nunique()
    mixed = cells.setting.map(conventions_of).nunique() > 1  # every row then names its profile
    versions = cells.groupby(["model", "checkpoint", "postprocessor", "setting"]).fingerprint.nunique()

    rows = []
    for cell in cells.itertuples():
        label = cell.postprocessor
        if mixed:
            label += f" {setting_label(named_profile(cell.setting))}"
        elif settings[(cell.model, cell.postprocessor)] > 1:
            label += f" {setting_label(cell.setting)}"
        if versions[(cell.model, cell.checkpoint, cell.postprocessor, cell.setting)] > 1:
            label += f" @{cell.fingerprint[:8]}"
        row = {"model": cell.model, "checkpoint": cell.checkpoint, "postprocessor": cell.postprocessor, "label": label,
               "setting": cell.setting,
               "fingerprint": cell.fingerprint, "data_fingerprint": cell.data_fingerprint, "status": cell.status,
               "reason": cell.reason, "params": cell.params, "tags": cell.tags,
               "preprocessing": cell.preprocessing}
        values = values_of.get((cell.model, cell.postprocessor, cell.setting, cell.fingerprint), {})
        row["acc"] = values.get(("id_test", "acc"), np.nan)
        for dataset in csid:
            row[f"{dataset}|acc"] = values.get((dataset, "acc"), np.nan)
        for prefix, stored in [("", ""), *([(FS, "fs_")] if csid else [])]:
            if csid and prefix:
                row[FS_ACC] = values.get(("id_test", "fs_acc"), np.nan)
            for dataset in order:
                row[f"{prefix}{dataset}|fpr"] = values.get((dataset, stored + fpr_metric), np.nan)
                row[f"{prefix}{dataset}|auroc"] = values.get((dataset, stored + "auroc"), np.nan)
            for key in AVERAGES:
                members = [d for d in order if key == "all" or group_of[d] == key]
                present = [d for d in members if not np.isnan(row[f"{prefix}{d}|auroc"])]
                for metric in ("fpr", "auroc"):
                    row[f"{prefix}{AVERAGES[key]}|{metric}"] = (
                        np.mean([row[f"{prefix}{d}|{metric}"] for d in present])
                        if present and cell.status == "done" else np.nan)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        model_rank = {m: i for i, m in enumerate(models or list(dict.fromkeys(frame.model)))}
        pp_rank = {p: i for i, p in enumerate(postprocessors or list(dict.fromkeys(frame.postprocessor)))}
        frame = frame.sort_values(["model", "postprocessor", "checkpoint"], kind="stable", key=lambda s: s.map(
            model_rank if s.name == "model" else pp_rank).fillna(1e9) if s.name != "checkpoint" else s)
        frame = frame.reset_index(drop=True)
    profiles = sorted(set(cells.setting.map(conventions_of))) if conventions is None else [conventions]
    present = datasets[datasets.status == "present"]
    fallback = sorted(set(present[present.reason.fillna("").str.startswith(FALLBACK)].dataset))
    frame.attrs.update(benchmark=benchmark, fpr=fpr, conventions=profiles, datasets=order, groups=group_of, missing=missing,
                       fallback=fallback, csid=csid, csid_missing=csid_missing,
                       hidden=hidden, data_fingerprints=newest_first(cells, read),
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


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The table's columns of FPR/AUROC pairs: every OOD set, then the averages; for a
    full-spectrum benchmark, then the same again as FS-OOD (`fs_columns`)."""
    plain = list(frame.attrs["datasets"]) + list(AVERAGES.values())
    return plain + fs_columns(frame)


def fs_columns(frame: pd.DataFrame) -> list[str]:
    """``FS <set>`` and ``FS <average>``: the FS-OOD columns (empty without shifted ID sets)."""
    if not frame.attrs.get("csid"):
        return []
    return [FS + column for column in list(frame.attrs["datasets"]) + list(AVERAGES.values())]


def accuracy_columns(frame: pd.DataFrame) -> list[str]:
    """``acc`` (ID test), then for a full-spectrum benchmark ``<set>|acc`` per shifted set and
    ``FS|acc`` (the ID test and every shifted set together, OpenOOD's csid accuracy)."""
    csid = list(frame.attrs.get("csid", []))
    return ["acc"] + [f"{name}|acc" for name in csid] + ([FS_ACC] if csid else [])


def aggregate_checkpoints(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, postprocessor label, setting): the mean of each accuracy and of every FPR
    and AUROC column over the model's checkpoints that finished, their sample standard deviation
    (``<column>|std``, ``acc|std``; NaN for one checkpoint), how many (``checkpoints``) and
    their fingerprints (``fingerprints``). A row none of whose checkpoints finished keeps
    the first one's status and reason; otherwise ``failed_checkpoints`` names those that failed."""
    if frame.empty:
        return frame.assign(checkpoints=pd.Series(dtype=int), fingerprints=pd.Series(dtype=object))
    values = accuracy_columns(frame) + [f"{c}|{m}" for c in metric_columns(frame) for m in ("fpr", "auroc")]
    rows = []
    for _, group in frame.groupby(["model", "label", "setting"], sort=False):
        done = group[group.status == "done"]
        shown = done if len(done) else group.iloc[:1]
        row = shown.iloc[0].to_dict()
        for column in values:
            row[column] = shown[column].mean() if len(done) else np.nan
            row[f"{column}|std"] = shown[column].std(ddof=1) if len(done) > 1 else np.nan
        failed = group[group.status != "done"] if len(done) else group.iloc[:0]
        row["failed_checkpoints"] = "; ".join(f"checkpoint {r.checkpoint or r.fingerprint[:8]} {r.status}: {r.reason}"
                                              for r in failed.itertuples())
        row.update(checkpoints=len(done), fingerprints=list(done.fingerprint),
                   checkpoint=", ".join(c for c in shown.checkpoint if c))
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(frame.attrs)
    return out
