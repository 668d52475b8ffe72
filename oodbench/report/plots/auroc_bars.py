"""``oodbench compare``'s figure: AUROC per postprocessor of robust against standard models
(the PRO paper's Fig. 4), grouped bars, a panel per OOD group."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from oodbench.report.plots.style import DOUBLE_COLUMN, figure_legend, figure_title, palette, paper_style

CHANCE = "chance (50)"


@paper_style
def auroc_bars(long: pd.DataFrame) -> Figure:
    """Grouped bars of AUROC (x100, zero-based axis) per postprocessor, one bar per model
    (robust models hatched), a panel per OOD group; a dotted line marks chance (50)."""
    auroc = long[long.metric == "auroc"]
    groups = list(dict.fromkeys(auroc.group))
    names = [p for p in long.attrs["postprocessors"] if p in set(auroc.postprocessor)]
    models = list(dict.fromkeys(auroc.model))
    tag_of = dict(zip(auroc.model, auroc.tag))
    colours = palette(len(models))
    figure = Figure(figsize=(DOUBLE_COLUMN, 2.2 * len(groups) + 0.5), layout="constrained")
    axes = figure.subplots(len(groups), 1, squeeze=False)[:, 0]
    width = 0.8 / len(models)
    positions = np.arange(len(names))
    for ax, group in zip(axes, groups):
        values = auroc[auroc.group == group].set_index(["model", "postprocessor"]).value
        for index, model in enumerate(models):
            heights = [100 * values.get((model, name), np.nan) for name in names]
            ax.bar(positions + (index - (len(models) - 1) / 2) * width, heights, width, color=colours[index],
                   hatch="////" if tag_of[model] == "robust" else None, edgecolor="white", linewidth=0.3,
                   label=f"{model} ({tag_of[model]})")
        ax.axhline(50, color="0.3", linestyle=":", linewidth=0.8, label=CHANCE)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{group}-OOD AUROC\n(x100, axis from 0)")
        ax.set_xticks(positions, names, rotation=30, ha="right")
    entries = sorted(zip(*axes[0].get_legend_handles_labels()), key=lambda entry: entry[1] == CHANCE)
    figure_legend(figure, [h for h, _ in entries], [label for _, label in entries])
    figure_title(figure, f"{long.attrs['benchmark']}: robust vs standard, AUROC per postprocessor")
    return figure
