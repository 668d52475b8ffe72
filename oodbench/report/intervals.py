"""Bootstrap intervals for the rows of a leaderboard, from the per-image scores the store keeps.

`add_intervals` reads each row's cells' test scores (`ResultStore.read_scores`: checksum
and count verified; here also that they reproduce the cell's stored AUROC, so scores and
numbers cannot come from different runs), draws paired resamples of the ID and OOD test
images (`oodbench.metrics.bootstrap`), and computes each row's replicate of a column
exactly as its point estimate: the mean over its checkpoints, and for the near/far/all
averages the mean over the sets present. It adds, per column and metric,
``<column>|<metric>|low`` and ``|high`` (the 95% percentile interval) and ``|tie``: whether
the row is not significantly worse than the column's best (the percentile interval of
their paired difference reaches 0). The FS-OOD columns of a full-spectrum benchmark resample
the ID test and covariate-shifted images as one ID pool, as their point estimates count them.
No model and no output cache is read.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from oodbench.metrics.bootstrap import RESAMPLES, bootstrap_replicates, interval, not_significant
from oodbench.metrics.detection import auroc
from oodbench.storage.store import ResultStore
from oodbench.benchmark.leaderboard import AVERAGES, FS, metric_columns

ID_TEST = "id_test"
METRICS = ("auroc", "fpr")


def fs_pool(sets: dict[str, np.ndarray], csid: list[str]) -> np.ndarray:
    """The ID side of FS-OOD: the ID test scores and those of every shifted set present."""
    return np.concatenate([sets[ID_TEST], *(sets[c] for c in csid if c in sets)])


def verified_scores(store: ResultStore, benchmark: str, fingerprints: list[str],
                    csid: list[str] = ()) -> dict[str, dict[str, np.ndarray]]:
    """fingerprint -> dataset -> scores, for the cells whose scores verify; one warning line per
    entry that does not (a damaged blob, or scores that do not give the stored AUROC; the shifted
    ID sets `csid` must give the stored FS-OOD AUROC, else they are left out)."""
    scores, damaged = store.read_scores(fingerprints)
    results = store.frame("results", benchmark=benchmark, metric=["auroc", "fs_auroc"])
    stored = {(r.fingerprint, r.dataset, r.metric): r.value for r in results.itertuples()}
    for fingerprint, sets in list(scores.items()):
        if ID_TEST not in sets:
            del scores[fingerprint]
            continue
        shifted = [n for n in sets if n in csid]
        for name in [n for n in sets if n != ID_TEST and n not in csid]:
            expected = stored.get((fingerprint, name, "auroc"))
            ood = sets[name]
            found = auroc(np.r_[sets[ID_TEST], ood], np.r_[np.zeros(sets[ID_TEST].size), np.ones(ood.size)])
            if expected is None or abs(found - expected) > 1e-9:
                damaged.append(f"the stored scores of cell {fingerprint} on {name} in {store.path} do not reproduce "
                               "its stored AUROC; left out of the intervals")
                del sets[name]
            elif shifted:
                pool = fs_pool(sets, csid)
                found = auroc(np.r_[pool, ood], np.r_[np.zeros(pool.size), np.ones(ood.size)])
                if abs(found - stored.get((fingerprint, name, "fs_auroc"), np.inf)) > 1e-9:
                    damaged.append(f"the stored scores of cell {fingerprint} on the shifted ID sets in {store.path} "
                                   "do not reproduce its stored FS-OOD AUROC; FS columns left out of the intervals")
                    for shifted_set in shifted:
                        del sets[shifted_set]
                    shifted = []
    for line in damaged:
        warnings.warn(line, stacklevel=2)
    return scores


def add_intervals(rows: pd.DataFrame, store: ResultStore, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """`rows` (from `aggregate_checkpoints`) with interval and significance columns."""
    attrs, rows = rows.attrs, rows.copy()
    rows.attrs.update(attrs)
    columns = metric_columns(rows)
    sets = list(rows.attrs["datasets"])
    members = [fp for fps in rows.fingerprints for fp in fps]
    csid = list(rows.attrs.get("csid", []))
    scores = verified_scores(store, rows.attrs["benchmark"], members, csid)

    records = rows.to_dict("records")
    present = [[d for d in sets if not np.isnan(row[f"{d}|auroc"])] for row in records]
    usable = [row["status"] == "done" and bool(row["fingerprints"]) and all(
        fp in scores and all(d in scores[fp] for d in names) for fp in row["fingerprints"])
        for row, names in zip(records, present)]
    needed = {fp: names for row, names, ok in zip(records, present, usable) if ok for fp in row["fingerprints"]}
    replicates = bootstrap_replicates({fp: scores[fp][ID_TEST] for fp in needed},
                                      {fp: {d: scores[fp][d] for d in names} for fp, names in needed.items()},
                                      resamples=resamples, seed=seed, fpr=rows.attrs["fpr"]) if needed else {}
    full = {fp: names for fp, names in needed.items() if csid and any(c in scores[fp] for c in csid)}
    fs_replicates = bootstrap_replicates({fp: fs_pool(scores[fp], csid) for fp in full},
                                         {fp: {d: scores[fp][d] for d in names} for fp, names in full.items()},
                                         resamples=resamples, seed=seed, fpr=rows.attrs["fpr"],
                                         id_name="id_test+csid") if full else {}

    per_row: dict[int, dict[tuple[str, str], np.ndarray]] = {}
    for index, (row, names, ok) in enumerate(zip(records, present, usable)):
        if not ok:
            continue
        table = {}
        for prefix, found in (("", replicates), (FS, fs_replicates)):
            if not all(fp in found for fp in row["fingerprints"]):
                continue
            table.update({(prefix + d, m): np.mean([found[fp][d][m] for fp in row["fingerprints"]], axis=0)
                          for d in names for m in METRICS})
            for key, label in AVERAGES.items():
                group = [d for d in names if key == "all" or rows.attrs["groups"].get(d) == key]
                for m in METRICS:
                    if group:
                        table[(prefix + label, m)] = np.mean([table[(prefix + d, m)] for d in group], axis=0)
        per_row[index] = table

    for column in columns:
        for metric in METRICS:
            name = f"{column}|{metric}"
            bounds = [interval(per_row[i][(column, metric)]) if (column, metric) in per_row.get(i, {})
                      else (np.nan, np.nan) for i in range(len(rows))]
            rows[f"{name}|low"] = [low for low, _ in bounds]
            rows[f"{name}|high"] = [high for _, high in bounds]
            rows[f"{name}|tie"] = _ties(rows, per_row, column, metric)
    rows.attrs["ci"] = {"resamples": resamples, "seed": seed,
                        "without": sum(row["status"] == "done" and not ok for row, ok in zip(records, usable))}
    return rows


def _ties(rows: pd.DataFrame, per_row: dict, column: str, metric: str) -> list[bool]:
    """Per row: not significantly worse than the column's best row (paired bootstrap); False for
    the best itself, for rows of other data, and when the best has no replicates."""
    values = rows[f"{column}|{metric}"].where(rows.status == "done")
    ties = [False] * len(rows)
    if values.isna().all():
        return ties
    best = int(np.argmax(values.fillna(-np.inf)) if metric == "auroc" else np.argmin(values.fillna(np.inf)))
    reference = per_row.get(best, {}).get((column, metric))
    if reference is None:
        return ties
    for index, table in per_row.items():
        same_data = rows.data_fingerprint.iloc[index] == rows.data_fingerprint.iloc[best]
        if index != best and (column, metric) in table and same_data and values.iloc[index] != values.iloc[best]:
            ties[index] = not_significant(reference, table[(column, metric)], higher_is_better=metric == "auroc")
    return ties
