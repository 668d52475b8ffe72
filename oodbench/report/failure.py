"""The failure-detection table (`oodbench.tasks.failure`) as Markdown or LaTeX."""

from __future__ import annotations

import pandas as pd

from oodbench.tasks.failure import LOWER_IS_BETTER


HEADERS = {"model": "model", "postprocessor": "postprocessor", "acc": "ACC", "aurc": "AURC",
           "eaurc": "E-AURC", "augrc": "AUGRC", "auroc": "AUROC_f", "fpr95": "FPR@95_f"}

SCALE = {"acc": 100, "aurc": 1000, "eaurc": 1000, "augrc": 1000, "auroc": 100, "fpr95": 100}


def render_failure(frame: pd.DataFrame, fmt: str = "markdown", sort: str = "aurc") -> str:
    """The table per model, best `sort` metric first: ACC, AUROC_f and FPR@95_f x100, the
    areas x1000 (as FD-Shifts reports them); markdown or LaTeX."""
    from tabulate import tabulate

    ascending = LOWER_IS_BETTER.get(sort, False)
    shown = frame.sort_values(["model", sort], ascending=[True, ascending], kind="stable", na_position="last")
    shown = shown.assign(**{c: SCALE[c] * shown[c] for c in SCALE})
    headers = [HEADERS[c] for c in shown.columns]
    title = ("Failure detection on ID test (right vs wrong predictions): ACC, AUROC_f and FPR@95_f (right = "
             "positive) x100; AURC, E-AURC, AUGRC x1000, lower is better.")
    perfect = sorted(set(frame.model[frame.auroc.isna() & (frame.acc == 1)]))
    if perfect:  # AUROC_f and FPR@95_f need both right and wrong predictions
        title += (f" No wrong prediction by {', '.join(perfect)} on ID test: nothing to detect, so no AUROC_f or "
                  "FPR@95_f (nan) and zero risk areas.")
    if fmt == "latex":
        from oodbench.report.latex import escape, table, tabular

        blocks = [[[escape(v) if isinstance(v, str) else f"{v:.2f}" for v in row]
                   for row in rows.values.tolist()] for _, rows in shown.groupby("model", sort=False)]
        lines = tabular([" & ".join(map(escape, headers)) + r" \\"], "ll" + "r" * (len(headers) - 2), blocks)
        return table(lines, title, "tab:oodbench-failure", scaled=False, packages="booktabs")
    return f"{title}\n\n{tabulate(shown.values.tolist(), headers=headers, tablefmt='pipe', floatfmt='.2f')}"
