"""The figures users look at (being split into one module per figure kind)."""

from oodbench.report.plots.style import (  # noqa: F401
    DOUBLE_COLUMN, DPI, FAMILY_STYLE, MAX_CLASS_LEGEND, OOD_MARKERS, PAPER_STYLE, SINGLE_COLUMN, _figure_legend,
    _subsample, _title, auroc_bars, build_plot, calibration_figure, feature_data, landscape_data, landscape_figure,
    palette, paper_style, pro_shift_data, risk_coverage_figure, save_figure, scatter_figure, score_data,
    tradeoff_data, tradeoff_figure, tradeoff_points, tradeoff_title,
)
