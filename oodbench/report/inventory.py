"""What a results store holds, without SQL: `oodbench results STORE`.

Per benchmark: its data fingerprints (the benchmark as each run found it, newest first,
with their cell counts), then one line per (model, checkpoint, setting) with its cells
done, failed and missing, how many cell fingerprints (stored versions) it has and when it
last ran; then the cells that did not finish, with their reasons. ``--failed`` prints
only those; ``export`` writes the tidy CSV (`oodbench.report.tidy`): FPR@95 in the convention
each cell was run under unless ``--fpr`` names one, or ``both``.
"""

from __future__ import annotations

import textwrap
import time

import pandas as pd

from oodbench.errors import OodbenchError, did_you_mean
from oodbench.report.text import WIDTH, aligned
from oodbench.storage.store import ResultStore
from oodbench.benchmark.cells import setting_label
from oodbench.benchmark.leaderboard import leaderboard_frames


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if pd.notna(seconds) else "-"


def benchmarks_in(store: ResultStore, asked: list[str] | None = None) -> list[str]:
    """`asked` (None: every benchmark `store` holds, sorted), each checked to be in the store;
    raises OodbenchError naming the close names and what it holds."""
    known = sorted(set(store.frame("cells").benchmark))
    for name in asked or []:
        if name not in known:
            raise OodbenchError(f"no benchmark '{name}' in {store.path}{did_you_mean(name, known)}; "
                                f"it holds: {', '.join(known) or 'nothing yet'}")
    return asked or known


def summary(store: ResultStore, benchmarks: list[str]) -> str:
    cells = store.frame("cells", benchmark=benchmarks)
    parts = [f"results store {store.path}: {len(cells)} cell(s) of {cells.benchmark.nunique()} benchmark(s)"]
    for benchmark, group in cells.groupby("benchmark", sort=True):
        data = group.groupby("data_fingerprint", dropna=False).agg(cells=("fingerprint", "size"),
                                                                   last=("created", "max"))
        data = data.sort_values("last", ascending=False)
        fingerprints = ", ".join(f"{fp} ({n} cells, {_when(t)})" for fp, n, t in
                                 zip(data.index, data.cells, data["last"]))
        counts = group.status.value_counts()
        parts.append(textwrap.fill(
            f"{benchmark}: {len(group)} cells ({counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
            f"{counts.get('missing', 0)} missing); data fingerprints, newest first: {fingerprints}",
            WIDTH, subsequent_indent="  "))
        rows = []
        for (model, checkpoint, setting), cell in group.groupby(["model", "checkpoint", "setting"], sort=False):
            status = cell.status.value_counts()
            rows.append([model, checkpoint or "-", setting_label(setting), str(cell.postprocessor.nunique()),
                         f"{status.get('done', 0)}/{status.get('failed', 0)}/{status.get('missing', 0)}",
                         str(cell.fingerprint.nunique()), _when(cell.created.max())])
        header = ["model", "checkpoint", "setting", "methods", "done/failed/missing", "versions", "last run"]
        parts.append("\n".join(aligned(header, rows, numeric=4, fit=True)))
    failed = failures(store, benchmarks)
    if failed:
        parts.append(failed)
    return "\n\n".join(parts)


def failures(store: ResultStore, benchmarks: list[str]) -> str:
    """The cells that did not finish, one paragraph each: where, which cell, why."""
    cells = store.frame("cells", benchmark=benchmarks)
    cells = cells[cells.status != "done"].sort_values(["benchmark", "model", "checkpoint", "postprocessor"])
    if cells.empty:
        return ""
    lines = [f"{len(cells)} cell(s) did not finish:"]
    for cell in cells.itertuples():
        where = f"{cell.benchmark} / {cell.model}" + (f" [{cell.checkpoint}]" if cell.checkpoint else "")
        lines.append(textwrap.fill(f"- {where} / {cell.postprocessor} {setting_label(cell.setting)} (cell "
                                   f"{cell.fingerprint}, {_when(cell.created)}): {cell.status}: {cell.reason}",
                                   WIDTH, subsequent_indent="  "))
    return "\n".join(lines)


def export(store: ResultStore, benchmarks: list[str], every: bool = False, fmt: str = "csv",
           fpr: str | None = None) -> str:
    """The tidy table of every benchmark: each latest cell, or with `every` each stored version;
    FPR@95 rows in the convention each cell was run under, in `fpr`'s, or with ``both`` in both
    conventions (every stored number, each row naming its own)."""
    from oodbench.report.tidy import CLEAN_ATTACK, COLUMNS, leaderboard_tidy, render_tidy

    frames = [frame for b in benchmarks for frame in
              leaderboard_frames(store, b, every=every, fpr=None if fpr == "both" else fpr) if not frame.empty]
    tidy = [leaderboard_tidy(frame, store, every_fpr=fpr == "both") for frame in frames]
    return render_tidy(pd.concat(tidy) if tidy else pd.DataFrame(columns=COLUMNS + list(CLEAN_ATTACK)), fmt)
