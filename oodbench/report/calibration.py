"""The logit-noise calibration table (`oodbench.tasks.calibration`) as Markdown or LaTeX."""

from __future__ import annotations

import pandas as pd


def render_calibration(frame: pd.DataFrame, fmt: str = "markdown") -> str:
    """The table x100 (NLL in nats) as markdown or LaTeX (the tidy CSV/JSON: `oodbench.report.tidy`)."""
    from tabulate import tabulate

    shown = frame.copy()
    for column in shown.columns:
        if column in ("acc", "ece") or column.startswith("auroc_"):
            shown[column] = 100 * shown[column]
    headers = [{"level": "noise s", "acc": "ACC", "ece": "ECE", "nll": "NLL"}.get(c, c.replace("auroc_", "MSP AUROC "))
               for c in shown.columns]
    title = ("Logit noise N(0, (s * std(logits))^2) per split; ACC, ECE (15 bins) and MSP AUROC x100; "
             "NLL in nats.")
    if fmt == "latex":
        from oodbench.report.latex import escape, table, tabular

        body = [[escape(v) if isinstance(v, str) else f"{v:.2f}" for v in row] for row in shown.values.tolist()]
        lines = tabular([" & ".join(map(escape, headers)) + r" \\"], "l" + "r" * (len(headers) - 1), [body])
        return table(lines, title, "tab:oodbench-calibration", scaled=False, packages="booktabs")
    return f"{title}\n\n{tabulate(shown.values.tolist(), headers=headers, tablefmt='pipe', floatfmt='.2f')}"
