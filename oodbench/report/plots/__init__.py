"""The figures users look at, built from the results store and the output cache.

Figure builders take plain data (arrays per model and split, or a frame) and return a
matplotlib `Figure` (no pyplot state, so no display is needed); `save_figure` writes it as
PNG and PDF. Every figure is paper-sized (`style`), labels every axis with its units, and
gives every set, model or class its own colour. One module per figure kind, each with the
`*_data` function that gathers its data:

- `histogram`: ``hist`` (scores of one postprocessor) and ``pro-shift`` (MSP change under
  one PRO step), ID test vs each OOD test set, per model;
- `landscape`: the score over a 2-D slice of input space around one image per set;
- `features`: a 2-D PCA (or LDA) of the penultimate features;
- `tradeoff`: near-OOD FPR@95 against AUROC per method, from the store;
- `auroc_bars`, `calibration`, `risk_coverage`: the figures of ``oodbench compare``,
  ``calibration`` and ``failure``;
- `kinds`: `build_plot`, the kinds of ``oodbench plot`` by name.
"""

from oodbench.report.plots.auroc_bars import auroc_bars
from oodbench.report.plots.calibration import calibration_figure
from oodbench.report.plots.features import MAX_CLASS_LEGEND, OOD_MARKERS, feature_data, scatter_figure
from oodbench.report.plots.histogram import histogram_figure, pro_shift_data, score_data
from oodbench.report.plots.kinds import build_plot
from oodbench.report.plots.landscape import landscape_data, landscape_figure
from oodbench.report.plots.risk_coverage import risk_coverage_figure
from oodbench.report.plots.style import (DOUBLE_COLUMN, DPI, PAPER_STYLE, SINGLE_COLUMN, palette, paper_style,
                                        save_figure)
from oodbench.report.plots.tradeoff import FAMILY_STYLE, tradeoff_data, tradeoff_figure, tradeoff_points, tradeoff_title

__all__ = [
    "DOUBLE_COLUMN", "DPI", "FAMILY_STYLE", "MAX_CLASS_LEGEND", "OOD_MARKERS", "PAPER_STYLE", "SINGLE_COLUMN",
    "auroc_bars", "build_plot", "calibration_figure", "feature_data", "histogram_figure", "landscape_data",
    "landscape_figure", "palette", "paper_style", "pro_shift_data", "risk_coverage_figure", "save_figure",
    "scatter_figure", "score_data", "tradeoff_data", "tradeoff_figure", "tradeoff_points", "tradeoff_title",
]
