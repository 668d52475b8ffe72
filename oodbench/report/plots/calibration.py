"""``oodbench calibration``'s figure: accuracy, ECE, NLL and MSP AUROC under Gaussian logit
noise, 2x2 panels in the calibration table's units."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from oodbench.report.plots.style import DOUBLE_COLUMN, figure_legend, figure_title, palette, paper_style


CALIBRATION_PANELS = (  # column, y label, scale (the calibration table's units)
    ("acc", "accuracy on ID test (x100)", 100),
    ("ece", "ECE, 15 bins (x100)", 100),
    ("nll", "NLL on ID test (nats)", 1),
    ("auroc", "MSP AUROC, ID vs OOD (x100)", 100),
)
GROUP_LINESTYLES = ("-", "--", ":", "-.")


@paper_style
def calibration_figure(frame: pd.DataFrame) -> Figure:
    """2x2 panels of `experiment_calibration`'s frame (accuracy, ECE, NLL, MSP AUROC), in the
    table's units; one colour per model, and in the AUROC panel one line style per OOD group."""
    groups = [c.removeprefix("auroc_") for c in frame.columns if c.startswith("auroc_")]
    models = list(dict.fromkeys(frame.model))
    colours = dict(zip(models, palette(len(models))))
    figure = Figure(figsize=(DOUBLE_COLUMN, 4.4), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (metric, label, scale) in zip(axes, CALIBRATION_PANELS):
        columns = [f"auroc_{g}" for g in groups] if metric == "auroc" else [metric]
        for model, rows in frame.groupby("model", sort=False):
            for column, style in zip(columns, GROUP_LINESTYLES):
                name = f"{model}, {column.removeprefix('auroc_')}-OOD" if metric == "auroc" else model
                ax.plot(rows.level, scale * rows[column], color=colours[model], linestyle=style, marker="o",
                        markersize=2.5, label=name)
        ax.set_ylabel(label)
    for ax in axes[2:]:
        ax.set_xlabel("logit noise s (x std of the logits)")
    handles = [Line2D([], [], color=colours[m], marker="o", markersize=2.5) for m in models]
    handles += [Line2D([], [], color="black", linestyle=s) for s in GROUP_LINESTYLES[:len(groups)]]
    figure_legend(figure, handles, [*models, *(f"{g}-OOD (AUROC panel)" for g in groups)])
    figure_title(figure, "Accuracy, calibration and MSP detection under Gaussian logit noise N(0, (s std)^2)")
    return figure
