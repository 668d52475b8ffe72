"""The leaderboard in each format: `render_leaderboard` dispatches to the text and Markdown
layouts (`oodbench.report.text`), LaTeX (`oodbench.report.latex`) and CSV/JSON
(`oodbench.report.tidy`), with the published reference block where asked; `write_tables`
writes the full tables of a run. `fit_table` fits any table within `WIDTH` columns.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pandas as pd

from oodbench.benchmark.leaderboard import aggregate_checkpoints
from oodbench.report.ranking import ranked
from oodbench.report.text import WIDTH, aligned, compact_text, wide_markdown


def fit_table(rows: list[list], headers: list[str], wide: bool = False, tablefmt: str = "simple") -> str:
    """`tabulate` of `rows` within `WIDTH` columns: the widest text columns are wrapped (never
    cut) at the widest width that makes the table fit; `wide` leaves every cell on one line."""
    from tabulate import tabulate

    texts = [[str(cell) for cell in row] for row in rows]
    table = tabulate(texts, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    natural = [max(len(text) for text in [header, *(r[i] for r in texts)]) for i, header in enumerate(headers)]
    cap = max(natural) + 1
    while cap > 1 and sum(min(w, cap) for w in natural) + 4 * len(natural) > WIDTH:
        cap -= 1  # the first guess: every column padded by 4 (tabulate's separator and padding)
    while not wide and cap > 10 and max(map(len, table.splitlines())) > WIDTH:
        cap -= 1  # the widest columns share what the others leave (tabulate pads and keeps long words)
        limits = [cap if w > cap else None for w in natural]
        table = tabulate(texts, headers=headers, tablefmt=tablefmt, disable_numparse=True, maxcolwidths=limits,
                         maxheadercolwidths=limits)
    return table


def leaderboard_rows(frame: pd.DataFrame, store=None, resamples: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The rows a table shows: checkpoints aggregated, and bootstrap intervals with `resamples`."""
    rows = aggregate_checkpoints(frame)
    if resamples and not rows.empty:
        from oodbench.report.intervals import add_intervals

        rows = add_intervals(rows, store, resamples, seed)
    return rows


def render_leaderboard(frame: pd.DataFrame, fmt: str = "text", wide: bool = False, show_params: bool = False,
                       store=None, resamples: int | None = None, seed: int = 0, reference: str | None = None) -> str:
    """`frame` (`leaderboard_frame`) in one of `FORMATS`; intervals need the store. `reference`: a
    published ledger (``configs/reference/<name>.csv``, `oodbench.report.reference`) shown beside
    the rows: a block below the table, or published columns in CSV/JSON."""
    if frame.empty:
        return f"(no results for benchmark '{frame.attrs.get('benchmark')}')"
    ledger = None
    if reference:
        from oodbench.report.ledger import load_ledger

        ledger = load_ledger(reference)
    if fmt in ("csv", "json"):
        from oodbench.report.tidy import leaderboard_tidy, render_tidy

        tidy = leaderboard_tidy(frame, store, resamples, seed)
        if ledger is not None:
            from oodbench.report.reference import tidy_reference

            tidy = tidy_reference(tidy, frame, ledger)
        return render_tidy(tidy, fmt)
    rows = leaderboard_rows(frame, store, resamples, seed)
    if fmt == "latex":
        from oodbench.report.latex import latex_leaderboard

        text = latex_leaderboard(rows, wide)
    elif wide:
        text = wide_markdown(rows, show_params)
    else:
        text = compact_text(rows, markdown=fmt == "markdown", show_params=show_params)
    if ledger is not None:
        from oodbench.report.reference import nothing_published, reference_block

        nothing = nothing_published(rows, ledger)
        if nothing:
            return text + "\n\n" + (f"% {nothing}" if fmt == "latex" else nothing)
        block = reference_block(rows if wide else ranked(rows), ledger)
        if fmt == "latex":
            from oodbench.report.latex import latex_reference

            text += "\n\n" + latex_reference(block, rows.attrs["benchmark"], ledger.attrs["name"])
        else:
            text += "\n\n" + reference_text(block, markdown=wide or fmt == "markdown")
    return text


def reference_text(block, markdown: bool = False) -> str:
    """The published block (`oodbench.report.reference.Block`) as a Markdown table, or as text
    within `WIDTH` columns: each model on a line of its own naming the published architecture
    (one per model, or each used), its rows indented below it."""
    if markdown:
        from tabulate import tabulate

        body = [[model if model != previous else "", label, architecture, *cells] for (model, label, architecture,
                cells), previous in zip(block.lines, [None, *(line[0] for line in block.lines)])]
        table = tabulate(body, headers=["model", "postprocessor", "published for", *block.header], tablefmt="pipe",
                         disable_numparse=True)
        return "\n".join([block.legend, "", table, *block.notes])
    body, titles, previous = [], {}, None
    for model, label, _, cells in block.lines:
        if model != previous:
            used = dict.fromkeys(a for m, _, a, _ in block.lines if m == model and a != "-")
            titles[len(body)] = f"{model}: published for {', '.join(used) or '-'}"
            previous = model
        body.append([label, *cells])
    lines = aligned(["postprocessor", *block.header], body, numeric=len(block.header), fit=True, indent=2)
    for position in sorted(titles, reverse=True):
        lines.insert(position + 2, titles[position])
    lines = [lines[2], *lines[:2], *lines[3:]]  # the first model's line above the column header
    wrap = lambda line: textwrap.fill(line, WIDTH, subsequent_indent="  ")  # noqa: E731
    return "\n".join([wrap(block.legend), "", *lines, *map(wrap, block.notes)])


def write_tables(frame: pd.DataFrame, folder: str | Path, store=None, resamples: int | None = None,
                 seed: int = 0) -> list[Path]:
    """The full tables of `frame` under `folder`/<benchmark>/ (a run with ``limit`` N:
    `folder`/<benchmark>-limitN/, so a quick sampled run never overwrites a full run's
    tables; a store whose cells were run under two FPR@95 conventions: `folder`/<benchmark>-fpr-<convention>/
    per convention): leaderboard.md (wide Markdown), leaderboard.tex (wide LaTeX) and
    leaderboard.csv (tidy); returns their paths."""
    from oodbench.benchmark.cells import run_name
    from oodbench.errors import OodbenchError
    from oodbench.report.latex import latex_leaderboard
    from oodbench.report.tidy import leaderboard_tidy, render_tidy

    limit = frame.attrs.get("limit")
    split = f"-fpr-{frame.attrs['fpr']}" if frame.attrs.get("fpr_others") else ""  # one table per convention
    target = Path(folder) / (run_name(frame.attrs["benchmark"], limit) + split)
    rows = leaderboard_rows(frame, store, resamples, seed)
    texts = {"leaderboard.md": wide_markdown(rows), "leaderboard.tex": latex_leaderboard(rows, wide=True),
             "leaderboard.csv": render_tidy(leaderboard_tidy(frame, store, resamples, seed), "csv")}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (target / name).write_text(text if text.endswith("\n") else text + "\n")
    except OSError as exc:
        raise OodbenchError(f"cannot write the tables to {target}: {exc.strerror or exc}") from None
    return [target / name for name in texts]


def say_where(paths: list[Path]) -> None:
    """The one line naming the full tables, on stderr (stdout holds the table itself)."""
    sys.stdout.flush()
    stem = paths[0].with_suffix("")
    print(f"full tables (Markdown, LaTeX, CSV): {stem}.{{md,tex,csv}}", file=sys.stderr)
