"""The leaderboard as text, for a terminal first.

- compact (default): model, postprocessor, ID ACC, near-OOD and far-OOD AUROC and FPR@95,
  rows ranked by near-OOD AUROC within each model, at most `WIDTH` characters wide; the
  best value per column marked ``*`` (and, with intervals, ``~`` for the rows not
  significantly worse); a last line gives the robust-vs-standard gap when the rows hold
  models tagged both ways;
- wide (``--wide``): one ``FPR / AUROC`` column per OOD set and the averages, as a Markdown
  table, best bold and second in italics.

Numbers are x100 with 2 decimals; ``±`` is the standard deviation over checkpoints, and with
``--ci`` the 95% bootstrap interval follows each value in brackets (in the compact text each
model then heads its rows on a line of its own, so that the bounds fit).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd

from oodbench.benchmark.leaderboard import FS, FS_ACC, accuracy_columns, metric_columns
from oodbench.report.ranking import accuracy_header, marks_legend, rank_marks, ranked
from oodbench.report.tables import caption, compact_columns

WIDTH = 100
HEADER = {"auroc": "AUROC", "fpr": "FPR@95"}


def compact_header(column: str, metric: str) -> str:
    """``near AUROC``, ``far FPR@95``; FS-OOD ones ``FS near AUROC``, ``FS far FPR`` (shorter, so
    that the table with its extra FS ACC column still fits `WIDTH`)."""
    name = f"{column.split('-')[0]} {HEADER[metric]}"
    return name.replace("FPR@95", "FPR") if column.startswith(FS) else name


def number(row: dict, name: str, decimals: int = 2) -> str:
    """x100 with 2 decimals; then the 95% interval (bounds with `decimals`) when the row has one,
    else ``±`` the standard deviation over checkpoints when there are several."""
    value = row[name]
    if np.isnan(value):
        return "-"
    text = f"{100 * value:.2f}"
    if not np.isnan(row.get(f"{name}|low", np.nan)):
        scale = 10**decimals  # bounds rounded outwards, so the printed interval holds the printed value
        low = np.floor(100 * row[f"{name}|low"] * scale + 1e-6) / scale
        high = np.ceil(100 * row[f"{name}|high"] * scale - 1e-6) / scale + 0.0  # + 0.0: never -0.0
        return text + (f" [{low:.{decimals}f},{high:.{decimals}f}]" if decimals < 2 else f" [{low:.2f}, {high:.2f}]")
    std = row.get(f"{name}|std", np.nan)
    return text if np.isnan(std) else f"{text}±{100 * std:.2f}"


def compact_text(rows: pd.DataFrame, markdown: bool = False, show_params: bool = False) -> str:
    """The compact table: plain text within `WIDTH` columns, or a Markdown table. With intervals
    the plain text puts each model on a line of its own (with its ID ACC) above its rows, so
    that four values with their bounds still fit."""
    rows = ranked(rows)
    blocks = bool(rows.attrs.get("ci")) and not markdown
    compact = compact_columns(rows)
    accuracies = ["acc", FS_ACC] if rows.attrs.get("csid") else ["acc"]
    marks = {(c, m): rank_marks(rows, c, m) for c, m in compact}
    symbol = {"best": "*", "tie": "~"}
    header = ([] if blocks else ["model"]) + ["postprocessor"] + (["params"] if show_params and markdown else []) + (
        [] if blocks else [accuracy_header(a) for a in accuracies]) + [compact_header(c, m) for c, m in compact]
    body, titles, params, previous = [], {}, {}, None
    for index, row in zip(rows.index, rows.to_dict("records")):
        first = row["model"] != previous
        if first and previous is not None and not markdown:
            body.append([""] * len(header))
        if first and blocks:
            titles[len(body)] = model_title(row)
        previous = row["model"]
        line = [] if blocks else [row["model"] if first or markdown else ""]
        line.append(row["label"])
        if show_params:  # a column in Markdown; in text, a line under the row (the table stays within WIDTH)
            chosen = ", ".join(f"{k}={v}" for k, v in json.loads(row["params"] or "{}").items()) or "-"
            if markdown:
                line.append(chosen)
            else:
                params[len(body)] = chosen
        if not blocks:
            line += [number(row, a) if row["status"] == "done" else "-" for a in accuracies]
        for column, metric in compact:
            done = row["status"] == "done"
            text = number(row, f"{column}|{metric}", decimals=1) if done else row["status"].upper()
            mark = marks[(column, metric)].get(index)
            if markdown:
                text = f"**{text}**" if mark == "best" else text + ("~" if mark == "tie" else "")
            else:
                text += symbol.get(mark, " ") if done and text != "-" else " "
            line.append(text)
        body.append(line)
    legend = f"Rows ranked by {compact[0][0]} AUROC within each model. " + marks_legend(
        rows, "in bold" if markdown else "marked *", None, "~")
    text = caption(rows, legend)
    notes = failure_notes(rows)
    gap = robust_gap(rows)
    if markdown:
        from tabulate import tabulate

        body = [[cell.replace("|", "\\|") for cell in line] for line in body]
        numeric = len(compact) + len(accuracies)
        table = tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True,
                         colalign=["left"] * (len(header) - numeric) + ["right"] * numeric)
        return "\n".join([text, "", table, *notes, *([gap] if gap else [])])
    table = aligned(header, body, numeric=len(compact) + (0 if blocks else len(accuracies)), fit=True,
                    indent=2 if blocks else 0)
    under = " " * table[0].index("postprocessor") + "  "
    lines = table[:2]
    for position, line in enumerate(table[2:]):
        lines += ([titles[position]] if position in titles else []) + [line]
        if position in params:
            lines += textwrap.wrap(f"params: {params[position]}", WIDTH, initial_indent=under,
                                   subsequent_indent=under + "  ", break_on_hyphens=False)
    if blocks:  # the column header under the first model's line
        lines = [lines[2], *lines[:2], *lines[3:]]
    wrap = lambda line: textwrap.fill(line, WIDTH, subsequent_indent="  ")  # noqa: E731
    return "\n".join([wrap(text), "", *lines, *map(wrap, notes), *(["", wrap(gap)] if gap else [])])


def model_title(row: dict) -> str:
    """A model's line above its rows: name, tags, ID ACC (and FS ACC; and its checkpoints)."""
    tags = json.loads(row.get("tags") or "[]")
    acc = number(row, "acc") if row["status"] == "done" else "-"
    if FS_ACC in row:
        acc += f", FS ACC {number(row, FS_ACC) if row['status'] == 'done' else '-'}"
    count = row.get("checkpoints", 1)
    return (f"{row['model']}" + (f" ({', '.join(tags)})" if tags else "") + f": ID ACC {acc}"
            + (f" over {count} checkpoints" if count > 1 else ""))


def aligned(header: list[str], body: list[list[str]], numeric: int, fit: bool, indent: int = 0) -> list[str]:
    """Columns two spaces apart after `indent` spaces, text left and the last `numeric` columns
    right; with `fit`, the text columns (first the first) are shortened until the table fits
    `WIDTH` (a shortened name ends in ``..``)."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    excess = indent + sum(widths) + 2 * (len(widths) - 1) - WIDTH
    for column in range(len(header) - numeric):
        if fit and excess > 0:
            cut = max(min(excess, widths[column] - max(len(header[column]), 10)), 0)
            widths[column] -= cut
            excess -= cut

    def cell(text: str, i: int) -> str:
        if len(text) > widths[i]:
            text = text[: widths[i] - 2] + ".."
        return text.rjust(widths[i]) if i >= len(widths) - numeric else text.ljust(widths[i])

    lines = ["  ".join(cell(h, i) for i, h in enumerate(header)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell(t, i) for i, t in enumerate(r)) for r in body]
    return [(" " * indent + line).rstrip() for line in lines]


def failure_notes(rows: pd.DataFrame) -> list[str]:
    records = rows.to_dict("records")
    return ([f"- {r['model']} / {r['label']}: {r['status']}: {r['reason']}" for r in records if r["status"] != "done"]
            + [f"- {r['model']} / {r['label']}: mean over the checkpoints that finished; {r['failed_checkpoints']}"
               for r in records if r["status"] == "done" and r.get("failed_checkpoints")])


def robust_gap(rows: pd.DataFrame) -> str:
    """One line: the best near-OOD AUROC of the standard and of the robust models, and the median
    gain over the postprocessors both ran (tag means, as `oodbench compare`)."""
    if "tags" not in rows:
        return ""
    tags = rows.tags.map(lambda t: set(json.loads(t or "[]")))
    scored = (rows.status == "done") & rows["near-OOD|auroc"].notna()
    values = {tag: rows[scored & tags.map(lambda t: tag in t)] for tag in ("standard", "robust")}
    if any(v.empty for v in values.values()):
        return ""
    means = {tag: v.groupby("label")["near-OOD|auroc"].mean() for tag, v in values.items()}
    both = means["standard"].index.intersection(means["robust"].index)
    if both.empty:
        return ""
    best = {tag: (values[tag]["near-OOD|auroc"].max(), values[tag].loc[values[tag]["near-OOD|auroc"].idxmax()])
            for tag in values}
    gains = (means["robust"][both] - means["standard"][both]).dropna()
    return (f"robust vs standard, near-OOD AUROC: best {100 * best['robust'][0]:.2f} ({best['robust'][1]['model']}, "
            f"{best['robust'][1]['label']}) vs {100 * best['standard'][0]:.2f} ({best['standard'][1]['model']}, "
            f"{best['standard'][1]['label']}); median gain of the robust model over {len(gains)} postprocessors "
            f"{100 * np.median(gains):+.2f} (positive = robust better).")


def wide_markdown(rows: pd.DataFrame, show_params: bool = False) -> str:
    """One ``FPR / AUROC`` column per OOD set and the averages; best bold, second italic, ``~``
    not significantly worse than the best; with intervals, their bounds in brackets."""
    from tabulate import tabulate

    columns = metric_columns(rows)
    accuracies = accuracy_columns(rows)
    missing = set(rows.attrs["missing"])
    marks = {(c, m): rank_marks(rows, c, m) for c in columns for m in ("fpr", "auroc")}
    style = {"best": "**{}**", "second": "_{}_", "tie": "{}~"}

    def value(index: int, row: dict, column: str, metric: str) -> str:
        return style.get(marks[(column, metric)].get(index), "{}").format(number(row, f"{column}|{metric}"))

    body = []
    for index, row in zip(rows.index, rows.to_dict("records")):
        line = [row["model"], row["label"]]
        if show_params:
            line.append(", ".join(f"{k}={v}" for k, v in json.loads(row["params"] or "{}").items()) or "-")
        line += [number(row, a) if row["status"] == "done" else "-" for a in accuracies]
        for column in columns:
            if row["status"] != "done":
                line.append(row["status"].upper())
            elif column.removeprefix(FS) in missing:
                line.append("missing")
            elif np.isnan(row[f"{column}|auroc"]):
                line.append("-")
            else:
                line.append(f"{value(index, row, column, 'fpr')} / {value(index, row, column, 'auroc')}")
        body.append(line)
    headers = ["model", "postprocessor"] + (["params"] if show_params else []) + list(map(
        accuracy_header, accuracies)) + columns
    text = caption(rows, "Each cell FPR@95 / AUROC. " + marks_legend(rows, "in bold", "in italics", "~"))
    body = [[cell.replace("|", "\\|") for cell in line] for line in body]  # a | would end the cell
    table = tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True,
                     colalign=["left"] * (len(headers) - len(columns) - len(accuracies))
                     + ["right"] * (len(columns) + len(accuracies)))
    return "\n".join([text, "", table, *failure_notes(rows)])
