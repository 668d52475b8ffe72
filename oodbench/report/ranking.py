"""What the text, Markdown and LaTeX leaderboards share: the row order (`ranked`), the best /
second / tie marks per column (`rank_marks`) and their legend, and the accuracy headers. Kept
apart from `oodbench.report.render` and `oodbench.report.latex` so that neither imports the other.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from oodbench.benchmark.leaderboard import FS_ACC
from oodbench.report.tables import compact_columns


def accuracy_header(column: str) -> str:
    """``acc`` -> ``ACC``, ``FS|acc`` -> ``FS ACC``, ``<shifted set>|acc`` -> ``ACC <set>``."""
    return "ACC" if column == "acc" else "FS ACC" if column == FS_ACC else f"ACC {column.split('|')[0]}"


def ranked(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows by model (in their order), then by near-OOD AUROC (FS-OOD for a full-spectrum
    benchmark), highest first (the overall average breaks ties and ranks a benchmark without
    near-OOD sets); unscored rows last."""
    model_order = {m: i for i, m in enumerate(dict.fromkeys(rows.model))}
    near = "|".join(compact_columns(rows)[0])
    average = near.replace("near-OOD", "average")
    keys = pd.DataFrame({"model": rows.model.map(model_order), "near": -rows[near].fillna(-np.inf),
                         "all": -rows[average].fillna(-np.inf)})
    return rows.loc[keys.sort_values(["model", "near", "all"], kind="stable").index]


def rank_marks(rows: pd.DataFrame, column: str, metric: str) -> dict[int, str]:
    """Row index -> ``best``, ``second`` or ``tie`` (not significantly worse than the best)."""
    values = rows[f"{column}|{metric}"].where(rows.status == "done").dropna().round(12)
    distinct = sorted(set(values), reverse=metric == "auroc")
    marks = {i: "best" if v == distinct[0] else "second" for i, v in values.items() if v in distinct[:2]}
    if f"{column}|{metric}|tie" in rows:
        marks.update({i: "tie" for i in rows.index[rows[f"{column}|{metric}|tie"].astype(bool)] if i not in marks
                      or marks[i] == "second"})
    return marks


def marks_legend(rows: pd.DataFrame, best: str, second: str | None, tie: str) -> str:
    text = f"Best per column {best}" + (f", second {second}" if second else "")
    if rows.attrs.get("ci"):
        text += (f"; {tie} not significantly worse than the best (paired bootstrap, 95%); [low, high] is the 95% "
                 "interval")
    if "checkpoints" in rows and (rows.checkpoints > 1).any():
        over = "seeds" if rows.attrs.get("seeds") else "checkpoints"
        text += f"; ± is the standard deviation over {over}" if not rows.attrs.get("ci") else (
            "; intervals are those of the mean over checkpoints")
    return text
