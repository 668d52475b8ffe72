"""The robust-vs-standard comparison (`oodbench.tasks.compare`) as Markdown or LaTeX tables,
or tidy CSV / JSON rows: each model's near/far means, the robust models' gain, and the gain of
each PRO variant over its base score. Gains are signed so that positive is better.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from oodbench.benchmark.leaderboard import AVERAGES, FPR_CAPTION
from oodbench.report.text import WIDTH
from oodbench.tasks.compare import DELTA, METRICS, delta_table, pro_gain_table


GAIN_NOTE = "gains: positive = better (AUROC up, FPR@95 down)"



def comparison_tidy(long: pd.DataFrame) -> pd.DataFrame:
    """The tidy rows (`oodbench.report.tidy`): each model's near/far means (dataset ``near-OOD`` /
    ``far-OOD``, group ``mean``), the robust-vs-standard gains (model ``robust vs standard``) and
    the PRO gains (postprocessor ``<pro> vs <base>``), as ``auroc_gain`` / ``fpr95_gain``."""
    from oodbench.report.tidy import COLUMNS, MEAN_GROUP, tidy_row

    benchmark, fpr = long.attrs["benchmark"], long.attrs["fpr"]
    name = {"auroc": "auroc", "fpr": "fpr95"}
    rows = [tidy_row(benchmark=benchmark, fingerprint=r["fingerprint"], model=r["model"], checkpoint=r["checkpoint"],
                     postprocessor=r["postprocessor"], setting=r["setting"], dataset=AVERAGES[r["group"]],
                     group=MEAN_GROUP, metric=name[r["metric"]], value=r["value"],
                     fpr_convention=fpr if r["metric"] == "fpr" else "") for r in long.to_dict("records")]
    for metric in METRICS:
        for (postprocessor, group), value in delta_table(long, metric)[DELTA].items():
            rows.append(tidy_row(benchmark=benchmark, model="robust vs standard", postprocessor=postprocessor,
                                 dataset=AVERAGES[group], group=MEAN_GROUP, metric=f"{name[metric]}_gain", value=value,
                                 fpr_convention=fpr if metric == "fpr" else "", higher_is_better=True))
        for (pair, group), values in pro_gain_table(long, metric).iterrows():
            rows += [tidy_row(benchmark=benchmark, model=model, postprocessor=pair, dataset=AVERAGES[group],
                              group=MEAN_GROUP, metric=f"{name[metric]}_gain", value=value,
                              fpr_convention=fpr if metric == "fpr" else "", higher_is_better=True)
                     for model, value in values.items()]
    return pd.DataFrame(rows, columns=COLUMNS)



def value_text(value: float, signed: bool) -> str:
    """A comparison value (a fraction) x100 with 2 decimals, with its sign when `signed` (a gain); NaN: ``-``."""
    return "-" if np.isnan(value) else f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def render_table(table: pd.DataFrame, title: str, fmt: str = "markdown", signed: bool = False,
                 label: str = "tab:oodbench-compare", wide: bool = False) -> str:
    """A comparison table x100 (2 decimals; `signed`: the gain columns with their sign) as
    markdown or latex, under its title (its caption in LaTeX). A Markdown table wider than
    `WIDTH` is split into tables of as many model columns as fit (each with the row names),
    unless `wide`."""
    from tabulate import tabulate

    if table.empty:
        return f"{title}\n\n(no pairs in the store)" if fmt != "latex" else f"% {title}: no pairs in the store"
    body = [[*index, *(value_text(v, signed or column == DELTA) for column, v in row.items())]
            for index, row in table.iterrows()]
    headers = [*table.index.names, *table.columns]
    if fmt == "latex":
        from oodbench.report.latex import escape, table as latex_table, tabular

        lines = tabular([" & ".join(escape(h) for h in headers) + r" \\"],
                        "l" * table.index.nlevels + "r" * len(table.columns), [[list(map(escape, r)) for r in body]])
        return latex_table(lines, title, label, scaled=False, packages="booktabs")
    names = table.index.nlevels

    def pipe(columns: list[int]) -> str:
        return tabulate([[*r[:names], *(r[names + c] for c in columns)] for r in body],
                        headers=[*headers[:names], *(headers[names + c] for c in columns)], tablefmt="pipe",
                        disable_numparse=True, colalign=["left"] * names + ["right"] * len(columns))

    parts, columns = [], []
    for column in range(len(table.columns)):
        if columns and not wide and max(map(len, pipe(columns + [column]).splitlines())) > WIDTH:
            parts.append(pipe(columns))
            columns = []
        columns.append(column)
    parts.append(pipe(columns))
    return "\n\n".join([textwrap.fill(title, WIDTH), *parts])



def render_comparison(long: pd.DataFrame, fmt: str = "markdown", wide: bool = False) -> str:
    """Markdown (within `WIDTH` columns unless `wide`) or LaTeX tables, or the tidy CSV / JSON."""
    if fmt in ("csv", "json"):
        from oodbench.report.tidy import render_tidy

        return render_tidy(comparison_tidy(long), fmt)
    tagged = long.attrs["tagged"]
    intro = (f"{long.attrs['benchmark']}: robust ({', '.join(tagged['robust'])}) vs standard "
             f"({', '.join(tagged['standard'])}), near/far-OOD averages x100; {GAIN_NOTE}. "
             f"{FPR_CAPTION[long.attrs['fpr']]}.")
    counts = sorted(set(long.checkpoints))
    if counts[-1] > 1:
        intro += " Models with several checkpoints count with their mean."
    if long.attrs.get("sampling"):  # rows of a --limit run, where the store holds no whole one
        intro += f" {long.attrs['sampling']}"
    parts = [] if fmt == "latex" else [intro if wide else textwrap.fill(intro, WIDTH)]
    prefix = f"{intro} " if fmt == "latex" else ""
    for metric, label in METRICS.items():
        better = "higher" if metric == "auroc" else "lower"
        parts.append(render_table(delta_table(long, metric), f"{prefix}{label} per model ({better} is better) and the "
                                  "gain of the robust models", fmt, label=f"tab:oodbench-robust-{metric}", wide=wide))
    for metric, label in METRICS.items():
        parts.append(render_table(pro_gain_table(long, metric), f"{prefix}PRO gain over its base score: {label} "
                                  "(positive = better)", fmt, signed=True, label=f"tab:oodbench-pro-{metric}",
                                  wide=wide))
    return "\n\n".join(parts)
