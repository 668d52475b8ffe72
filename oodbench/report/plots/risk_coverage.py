"""``oodbench failure``'s figure: selective and generalized risk against coverage, per model
and postprocessor, with the perfect ranking for reference."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from oodbench.report.plots.style import (DOUBLE_COLUMN, figure_legend, figure_title, palette, paper_style,
                                        unique_handles)


@paper_style
def risk_coverage_figure(curves: dict, title: str) -> Figure:
    """Selective risk (left) and generalized risk (right, x100) against coverage, one row of
    panels per model and one colour per postprocessor; a dotted black line is the perfect
    ranking at the model's accuracy. `curves`: (model, postprocessor) ->
    `oodbench.tasks.failure.RiskCoverage`."""
    models = list(dict.fromkeys(model for model, _ in curves))
    names = list(dict.fromkeys(name for _, name in curves))
    colours = dict(zip(names, palette(len(names))))
    figure = Figure(figsize=(DOUBLE_COLUMN, 2.3 * len(models) + 0.4), layout="constrained")
    axes = figure.subplots(len(models), 2, squeeze=False)
    for row, model in zip(axes, models):
        error = None
        for (owner, name), curve in curves.items():
            if owner != model:
                continue
            coverage = np.append(curve.coverage, 0.0)
            row[0].plot(coverage, 100 * np.append(curve.selective_risk, curve.selective_risk[-1]),
                        color=colours[name], label=name)
            row[1].plot(coverage, 100 * np.append(curve.generalized_risk, 0.0), color=colours[name], label=name)
            error = curve.generalized_risk[0]
        perfect = np.linspace(0, 1, 201)
        wrong_kept = np.clip(perfect - (1 - error), 0, None)
        row[0].plot(perfect, 100 * np.divide(wrong_kept, perfect, out=np.zeros_like(perfect), where=perfect > 0),
                    color="black", linestyle=":", label="perfect ranking")
        row[1].plot(perfect, 100 * wrong_kept, color="black", linestyle=":", label="perfect ranking")
        row[0].set(title=textwrap.fill(f"{model}: risk-coverage (AURC)", 50),
                   ylabel="selective risk: error on accepted (%)")
        row[1].set(title=textwrap.fill(f"{model}: generalized risk (AUGRC)", 50),
                   ylabel="accepted and wrong (% of all)")
        for ax in row:
            ax.set(xlim=(0, 1), xlabel="coverage (share of ID test accepted)")
            ax.set_ylim(bottom=0)
            ax.grid(linewidth=0.3, color="0.85")
    figure_legend(figure, *unique_handles(axes.ravel()))
    figure_title(figure, title)
    return figure
