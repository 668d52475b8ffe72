"""Leaderboard and comparison tables as LaTeX that compiles as pasted.

Every name and the caption go through `escape` (``_ % & # $ { } ~ ^ \\`` and the few
non-ASCII symbols the captions use); rules are booktabs' (``\\toprule``, ``\\midrule``
between models, ``\\bottomrule``); the best value per column is ``\\textbf``, the second
``\\underline``, and with intervals ``\\textsuperscript{\\dag}`` marks the values not
significantly worse than the best. The caption names the FPR@95 convention and what was
sampled. Needs ``\\usepackage{booktabs}``, and ``graphicx`` for the wide table and for
tables with intervals, which are scaled to the line width.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from oodbench.report.ranking import accuracy_header, marks_legend, rank_marks, ranked
from oodbench.benchmark.leaderboard import FS, FS_ACC, accuracy_columns, metric_columns
from oodbench.report.tables import caption, compact_columns

SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
           ">": r"\textgreater{}", "|": r"\textbar{}", "±": r"$\pm$", "—": "---", "–": "--", "≥": r"$\geq$",
           "≤": r"$\leq$", "×": r"$\times$", "†": r"\dag{}",
           "Δ": r"$\Delta$"}
STYLE = {"best": r"\textbf{{{}}}", "second": r"\underline{{{}}}", "tie": r"{}\textsuperscript{{\dag}}"}


def escape(text: str) -> str:
    """`text` with every character LaTeX treats specially written as itself (``--`` too: an en
    dash in LaTeX, so an option such as ``--ci`` is written ``-{}-ci``)."""
    return re.sub(r"-(?=-)", "-{}", "".join(SPECIAL.get(char, char) for char in str(text)))


def _value(row: dict, name: str, mark: str | None) -> str:
    value = row[name]
    if np.isnan(value):
        return "--"
    text = f"{100 * value:.2f}"
    if f"{name}|low" in row and not np.isnan(row[f"{name}|low"]):
        text = STYLE.get(mark, "{}").format(text)
        return text + rf" {{\scriptsize[{100 * row[f'{name}|low']:.2f}, {100 * row[f'{name}|high']:.2f}]}}"
    if not np.isnan(row.get(f"{name}|std", np.nan)):
        text += rf"\,$\pm$\,{100 * row[f'{name}|std']:.2f}"
    return STYLE.get(mark, "{}").format(text)


def tabular(header_rows: list[str], spec: str, blocks: list[list[list[str]]]) -> list[str]:
    """A booktabs tabular: header lines, then blocks of rows separated by ``\\midrule``."""
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", *header_rows, r"\midrule"]
    for number, block in enumerate(blocks):
        if number:
            lines.append(r"\midrule")
        lines += [" & ".join(cells) + r" \\" for cells in block]
    return lines + [r"\bottomrule", r"\end{tabular}"]


def table(body: list[str], text: str, label: str, scaled: bool, packages: str) -> str:
    inner = [r"\resizebox{\linewidth}{!}{%", *body, "}"] if scaled else body
    return "\n".join([f"% oodbench table: needs \\usepackage{{{packages}}}", r"\begin{table}[t]", r"\centering",
                      rf"\caption{{{escape(text)}}}", rf"\label{{{label}}}", *inner, r"\end{table}"])


def latex_leaderboard(rows: pd.DataFrame, wide: bool = False) -> str:
    """Compact (ranked; near/far AUROC and FPR@95, FS-OOD ones for a full-spectrum benchmark) or
    wide (every OOD set and the averages; and their FS-OOD columns, every accuracy)."""
    if wide:
        columns = [(c, m) for c in metric_columns(rows) for m in ("fpr", "auroc")]
        groups = metric_columns(rows)
        accuracies = accuracy_columns(rows)
    else:
        rows = ranked(rows)
        columns = compact_columns(rows)
        groups = list(dict.fromkeys(c for c, _ in columns))
        accuracies = ["acc", FS_ACC] if rows.attrs.get("csid") else ["acc"]
    missing = set(rows.attrs["missing"])
    marks = {(c, m): rank_marks(rows, c, m) for c, m in columns}
    arrows = {"auroc": r"AUROC$\uparrow$", "fpr": r"FPR@95$\downarrow$"}
    top = " & ".join([""] * (2 + len(accuracies)) + [
        rf"\multicolumn{{{sum(c == g for c, _ in columns)}}}{{c}}{{{escape(g)}}}" for g in groups]) + r" \\"
    rules, start = [], 3 + len(accuracies)
    for group in groups:
        width = sum(c == group for c, _ in columns)
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    second = " & ".join(["Model", "Method"] + [escape(accuracy_header(a)) for a in accuracies]
                        + [arrows[m] for _, m in columns]) + r" \\"
    blocks: list[list[list[str]]] = []
    previous = None
    for index, row in zip(rows.index, rows.to_dict("records")):
        if row["model"] != previous:
            blocks.append([])
        cells = [escape(row["model"]) if row["model"] != previous else "", escape(row["label"])]
        previous = row["model"]
        cells += [_value(row, a, None) if row["status"] == "done" else "--" for a in accuracies]
        for column, metric in columns:
            if row["status"] != "done":
                cells.append(escape(row["status"]))
            elif column.removeprefix(FS) in missing:
                cells.append("missing")
            else:
                cells.append(_value(row, f"{column}|{metric}", marks[(column, metric)].get(index)))
        blocks[-1].append(cells)
    legend = marks_legend(rows, "in bold", "underlined", "†")
    if not wide:
        legend = f"Rows ranked by {columns[0][0]} AUROC within each model. " + legend
    text = caption(rows, legend)
    body = tabular([top, " ".join(rules), second], "ll" + "r" * (len(columns) + len(accuracies)), blocks)
    label = f"tab:oodbench-{rows.attrs['benchmark']}" + ("-full" if wide else "")
    scaled = wide or bool(rows.attrs.get("ci"))  # too wide for a column otherwise
    return table(body, text, _safe_label(label), scaled=scaled, packages="booktabs,graphicx" if scaled else "booktabs")


def _safe_label(label: str) -> str:
    """A \\label key: letters, digits and - : . only."""
    return "".join(c if c.isalnum() or c in "-:." else "-" for c in label)


def latex_reference(block, benchmark: str, reference: str) -> str:
    """The published block (`oodbench.report.reference.Block`) as a second booktabs table; the
    legend and the reasons rows are not compared make its caption."""
    body = [[escape(model if model != previous else ""), escape(label), escape(architecture),
             *map(escape, cells)] for (model, label, architecture, cells), previous
            in zip(block.lines, [None, *(line[0] for line in block.lines)])]
    head = ["model", "postprocessor", "published for", *block.header]
    lines = tabular([" & ".join(map(escape, head)) + r" \\"], "lll" + "r" * len(block.header), [body])
    text = " ".join([block.legend, *("N" + note.removeprefix("- n") + "." for note in block.notes)])
    return table(lines, text, _safe_label(f"tab:oodbench-{benchmark}-{reference}"), scaled=True,
                 packages="booktabs,graphicx")
