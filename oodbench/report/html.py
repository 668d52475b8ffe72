"""The leaderboard as one self-contained HTML page (``oodbench leaderboard --format html``).

One file that opens anywhere without a network: style and sort script inline, figures as
base64 PNG. Per table (a benchmark, a seed family with ``--average-seeds``, or one FPR@95
convention of a benchmark whose cells were run under both), as the other formats carry it:

- the caption (`oodbench.report.tables.caption`: metrics, convention profile, what was
  sampled, intervals, seeds or checkpoints, missing sets, data fingerprints);
- a sortable column per number: ID accuracy, then FPR@95 and AUROC of each OOD set and of the
  averages, each value as the text tables print it (`oodbench.report.text.number`: x100,
  ``±`` the standard deviation over checkpoints or seeds, ``[low, high]`` with ``--ci``),
  best bold, second italic, ``~`` not significantly worse; a failed cell shows its status in
  every metric column, and its reason under the table and on hover;
- with ``--reference``, the published columns of `oodbench.report.reference.reference_block`.

Then the robust-vs-standard tables (`oodbench.tasks.compare`) when the rows hold models
tagged ``standard`` and ``robust``, and the figures: the near-OOD tradeoff and the
robust-vs-standard bars drawn from the rows, and those other commands saved for the benchmark
(``plot``, ``compare``, ``calibration``, ``failure``: ``<kind>_<benchmark>*.png`` in the plots
folder beside the store, ``results/plots`` by default).

A click on a column header sorts the table by it (again: the other way); the address
``page.html#sort=<table id>:<column key>:<asc|desc>`` sorts on load (a link to a sorted table).
"""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path

import jinja2
import matplotlib as mpl
import numpy as np
import pandas as pd

from oodbench.version import __version__
from oodbench.errors import OodbenchError
from oodbench.registry import POSTPROCESSORS
from oodbench.tasks.compare import DELTA, METRICS, comparison_long, delta_table, pro_gain_table
from oodbench.report.compare import GAIN_NOTE, value_text
from oodbench.report.plots import DPI, PAPER_STYLE, auroc_bars, tradeoff_figure, tradeoff_points, tradeoff_title
from oodbench.report.ranking import accuracy_header, marks_legend, rank_marks, ranked
from oodbench.report.render import leaderboard_rows
from oodbench.report.text import HEADER, failure_notes, number
from oodbench.benchmark.cells import run_name, sampled_splits
from oodbench.benchmark.leaderboard import AVERAGES, FS, FPR_CAPTION, accuracy_columns, metric_columns
from oodbench.report.tables import caption

DRAWN = ("tradeoff", "compare")  # figure kinds the page draws from its own rows (a saved one would repeat them)
BETTER = {"auroc": "higher", "fpr": "lower", "acc": "higher"}  # which way a column is better: its first sort
TEMPLATE = Path(__file__).with_name("page.html.j2")


def write_page(frames: list[pd.DataFrame], store, output: str | None = None, resamples: int | None = None,
               seed: int = 0, reference: str | None = None) -> Path:
    """`leaderboard_page` written to `output`, by default ``tables/<benchmark>/leaderboard.html``
    beside the store (``tables/leaderboard.html`` for several benchmarks); returns the path.
    Raises OodbenchError (one line) when the file cannot be written."""
    names = list(dict.fromkeys(frame.attrs["benchmark"] for frame in frames))
    default = Path(store.path).parent / "tables" / (names[0] if len(names) == 1 else "") / "leaderboard.html"
    target = Path(output).expanduser() if output else default
    if output and not target.parent.is_dir():
        raise OodbenchError(f"cannot write {target}: its folder {target.parent} does not exist (create it first)")
    page = leaderboard_page(frames, store, resamples, seed, reference)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise OodbenchError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def leaderboard_page(frames: list[pd.DataFrame], store, resamples: int | None = None, seed: int = 0,
                     reference: str | None = None) -> str:
    """The page of `frames` (`leaderboard_frames`, or `average_frames` of them) as HTML text.
    Intervals (`resamples`, `seed`) need the store; `reference` names a published ledger."""
    ledger = None
    if reference:
        from oodbench.report.ledger import load_ledger

        ledger = load_ledger(reference)
    stored = sorted(set(store.frame("cells").benchmark))
    plots = Path(store.path).parent / "plots"
    sections = [section(frame, store, index, resamples, seed, ledger, plots, stored)
                for index, frame in enumerate(frames)]
    names = ", ".join(dict.fromkeys(frame.attrs["benchmark"] for frame in frames))
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template(TEMPLATE.name).render(
        title=f"oodbench leaderboard: {names}", sections=sections, version=__version__, store=str(store.path),
        built=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def section(frame: pd.DataFrame, store, index: int, resamples: int | None, seed: int, ledger, plots: Path,
            stored: list[str]) -> dict:
    """One table's part of the page: heading, caption, leaderboard, notes, comparison, figures."""
    rows = ranked(leaderboard_rows(frame, store, resamples, seed))
    legend = "Each metric in a column of its own; click a header to sort. " + marks_legend(
        rows, "in bold", "in italics", "~")
    table = leaderboard_table(rows, f"leaderboard-{index}")
    notes = [note.removeprefix("- ") for note in failure_notes(rows)]
    published = None
    if ledger is not None:
        from oodbench.report.reference import nothing_published, reference_block

        nothing = nothing_published(rows, ledger)
        if nothing:
            notes.append(nothing)
        else:
            block = reference_block(rows, ledger)
            table["columns"] += [column("published for", "published-for")] + [
                column(name, f"published-{i}") for i, name in enumerate(block.header)]
            for cells, (_, _, architecture, values) in zip(table["rows"], block.lines):
                cells += [cell(architecture)] + [cell(value, leading_number(value)) for value in values]
            published = {"legend": block.legend, "notes": [n.removeprefix("- ") for n in block.notes]}
    long = comparison(frame)
    figures = drawn_figures(rows, long)
    kinds = {figure["kind"] for figure in figures}
    figures += saved_figures(plots, frame.attrs["benchmark"], stored, skip=kinds, runs=shown_runs(frame, store))
    title = frame.attrs["benchmark"] + (f" (FPR@95 {frame.attrs['fpr']})" if frame.attrs.get("fpr_others") else "")
    return {"title": title, "caption": caption(rows, legend), "table": table, "notes": notes,
            "published": published, "compare": compare_tables(long, index) if long is not None else None,
            "figures": figures}


def column(header: str, key: str, better: str = "", label: bool = False) -> dict:
    """A table column: its header, its cells' key, which way is better (sorting starts
    there) and whether it labels the rows (kept in view when the table scrolls sideways)."""
    return {"header": header, "key": key, "better": better, "label": label}


def cell(text: str, value: float | None = None, mark: str = "", reason: str = "") -> dict:
    """A table cell: its text, the number it sorts by (None: by its text; NaN: last), its rank
    mark (best / second / tie) and the reason shown on hover (a failed cell's)."""
    sort = None if value is None else "" if np.isnan(value) else repr(float(value))
    return {"text": text, "sort": sort, "mark": mark, "reason": reason}


def leading_number(text: str) -> float:
    """The number a published cell starts with (``71.30±0.40`` -> 71.3, ``+1.20 yes`` -> 1.2; ``-`` -> NaN)."""
    head = text.split(" ")[0].split("±")[0]
    try:
        return float(head)
    except ValueError:
        return float("nan")


def leaderboard_table(rows: pd.DataFrame, identifier: str) -> dict:
    """Columns and cells of the leaderboard: model, postprocessor, n (checkpoints or seeds, when a row
    has several), the accuracies, FPR@95 and AUROC of every OOD set and average, the status."""
    accuracies, groups = accuracy_columns(rows), metric_columns(rows)
    missing = set(rows.attrs["missing"])
    several = "checkpoints" in rows and bool((rows.checkpoints > 1).any())
    columns = [column("model", "model", label=True), column("postprocessor", "postprocessor", label=True)]
    columns += [column("seeds" if rows.attrs.get("seeds") else "checkpoints", "n", "higher")] if several else []
    columns += [column(accuracy_header(a), a, "higher") for a in accuracies]
    columns += [column(f"{group} {HEADER[metric]}", f"{group}|{metric}", BETTER[metric])
                for group in groups for metric in ("fpr", "auroc")]
    columns.append(column("status", "status"))
    marks = {(g, m): rank_marks(rows, g, m) for g in groups for m in ("fpr", "auroc")}
    body = []
    for index, row in zip(rows.index, rows.to_dict("records")):
        done, reason = row["status"] == "done", row["reason"] or ""
        params = ", ".join(f"{k}={v}" for k, v in json.loads(row["params"] or "{}").items())
        cells = [cell(row["model"]), cell(row["label"], reason=f"params: {params}" if params else "")]
        cells += [cell(str(row["checkpoints"]), row["checkpoints"])] if several else []
        cells += [cell(number(row, a), row[a]) if done else cell("-", np.nan) for a in accuracies]
        for group in groups:
            for metric in ("fpr", "auroc"):
                name = f"{group}|{metric}"
                if not done:
                    cells.append(cell(row["status"].upper(), np.nan, reason=reason))
                elif group.removeprefix(FS) in missing:
                    cells.append(cell("missing", np.nan))
                else:
                    cells.append(cell(number(row, name), row[name], marks[(group, metric)].get(index, "")))
        cells.append(cell(row["status"], reason=reason))
        body.append(cells)
    return {"id": identifier, "columns": columns, "rows": body}


def comparison(frame: pd.DataFrame) -> pd.DataFrame | None:
    """The robust-vs-standard long frame of the done rows (`compare.comparison_long`), each
    postprocessor by its row label; None unless models are tagged both standard and robust."""
    board = frame[frame.status == "done"]
    if board.empty or "tags" not in board:
        return None
    tags = dict(zip(board.model, board.tags.map(lambda t: json.loads(t or "[]"))))
    tagged = {tag: [m for m, own in tags.items() if tag in own] for tag in ("standard", "robust")}
    if not all(tagged.values()) or set(tagged["standard"]) & set(tagged["robust"]):
        return None
    board = board[board.model.isin(tagged["standard"] + tagged["robust"])].assign(postprocessor=board.label)
    return comparison_long(board, tagged, list(dict.fromkeys(board.label)))


def compare_tables(long: pd.DataFrame, index: int) -> dict:
    """The comparison tables (per metric: each model and the robust gain; the PRO gains) for the page."""
    tagged = long.attrs["tagged"]
    intro = (f"Robust ({', '.join(tagged['robust'])}) vs standard ({', '.join(tagged['standard'])}), "
             f"near/far-OOD averages x100; {GAIN_NOTE}. {FPR_CAPTION[long.attrs['fpr']]}.")
    tables = [(f"{label} per model ({BETTER[metric]} is better) and the gain of the robust models",
               delta_table(long, metric), BETTER[metric]) for metric, label in METRICS.items()]
    tables += [(f"PRO gain over its base score: {label} (positive = better)", pro_gain_table(long, metric), "")
               for metric, label in METRICS.items()]
    shown = [{"title": title, **frame_table(table, f"compare-{index}-{i}", better)}
             for i, (title, table, better) in enumerate(tables) if not table.empty]
    return {"intro": intro, "tables": shown}


def frame_table(table: pd.DataFrame, identifier: str, better: str) -> dict:
    """A comparison frame (row index levels, then value columns) x100, as `compare.render_table`
    prints it; `better`: which way the per-model values are better ('' for a table of gains, signed)."""
    signed = not better
    columns = [column(name, name, label=True) for name in table.index.names]
    columns += [column(name, name, "higher" if signed or name == DELTA else better) for name in table.columns]
    body = []
    for keys, values in table.iterrows():
        cells = [cell(str(key)) for key in keys]
        for name, value in values.items():
            cells.append(cell(value_text(value, signed or name == DELTA), 100 * value))
        body.append(cells)
    return {"id": identifier, "columns": columns, "rows": body}


def drawn_figures(rows: pd.DataFrame, long: pd.DataFrame | None) -> list[dict]:
    """The tradeoff figure of the done rows with near-OOD values, and the robust-vs-standard bars."""
    figures = []
    near = f"{AVERAGES['near']}|auroc", f"{AVERAGES['near']}|fpr"
    board = rows[rows.status == "done"].dropna(subset=list(near))
    if not board.empty:
        families = {}
        for name in dict.fromkeys(board.postprocessor):
            try:
                families[name] = POSTPROCESSORS.get(name).family
            except OodbenchError:  # a plugin's method this process has not loaded
                families[name] = "other"
        points = tradeoff_points(board, families)
        title = tradeoff_title(rows.attrs["benchmark"], points)
        figures.append({"kind": "tradeoff", "title": title, "png": png(tradeoff_figure(points, title,
                                                                                        points.attrs["fpr"]))})
    if long is not None:
        figures.append({"kind": "compare", "title": f"{long.attrs['benchmark']}: robust vs standard, AUROC",
                        "png": png(auroc_bars(long))})
    return figures


def shown_runs(frame: pd.DataFrame, store) -> list[str]:
    """The run names (`run_name`) of the rows a leaderboard frame shows: the benchmark's for rows
    of whole splits, ``<benchmark>-limitN`` for rows of a ``--limit N`` run."""
    benchmark = frame.attrs["benchmark"]
    if "data_fingerprint" not in frame or frame.empty:  # seeds averaged over benchmarks: their whole runs
        return [benchmark]
    shown = set(zip(frame.model, frame.data_fingerprint))
    limited = sampled_splits(store.frame("datasets", benchmark=benchmark))
    limited = limited[[pair in shown for pair in zip(limited.model, limited.data_fingerprint)]]
    if limited.empty:
        return [benchmark]
    sampled = limited.groupby(["model", "data_fingerprint"]).samples.max()
    whole = any(pair not in sampled.index for pair in shown)
    return [*([benchmark] if whole else []), *(run_name(benchmark, int(n)) for n in sorted(set(sampled)))]


def saved_figures(folder: Path, benchmark: str, stored: list[str], skip: set[str],
                  runs: list[str] | None = None) -> list[dict]:
    """The PNG figures in `folder` whose stem (``<kind>_<run>[_<detail>]``) names one of `runs`
    (default: the benchmark's whole run; ``<benchmark>-limitN`` for a sampled run's rows) and
    not another stored benchmark (of the `stored` names, the longest the stem names:
    digits_seed1's are not digits'), except the kinds in `skip`; in name order."""
    runs = runs if runs is not None else [benchmark]
    figures = []
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        kind, _, rest = path.stem.partition("_")
        owners = [name for name in [*stored, *runs] if rest == name or rest.startswith(name + "_")]
        if kind not in skip and owners and max(owners, key=len) in runs:
            figures.append({"kind": kind, "title": f"{path.name} (saved {modified(path)})",
                            "png": base64.b64encode(path.read_bytes()).decode("ascii")})
    return figures


def modified(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def png(figure) -> str:
    """`figure` as base64 PNG at the saved figures' resolution and style."""
    buffer = io.BytesIO()
    with mpl.rc_context(PAPER_STYLE):
        figure.savefig(buffer, format="png", dpi=DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
