"""What every oodbench figure shares: paper size and type, colours, panel grids, the legend
under the panels, the wrapped title, and saving as PNG and PDF.

Every figure is paper-sized (3.5 in single column or 7 in double column wide, 8 pt text, so
it reads at 100%); builders run under `paper_style` so tick labels take that style as they
are made.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

ID_LABEL = "ID test"
SINGLE_COLUMN, DOUBLE_COLUMN = 3.5, 7.0  # figure widths in inches
DPI = 200
PAPER_STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 9, "figure.labelsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "axes.formatter.useoffset": False, "lines.linewidth": 1.2,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType fonts in the PDF, as publishers ask
}


def paper_style(builder):
    """Build the figure under `PAPER_STYLE` (tick labels read the style when they are made)."""

    @functools.wraps(builder)
    def build(*args, **kwargs):
        with mpl.rc_context(PAPER_STYLE):
            return builder(*args, **kwargs)

    return build


def save_figure(figure: Figure, output: str | Path, stem: str) -> list[Path]:
    """`figure` as <output>/<stem>.png and .pdf, at its paper size."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.{suffix}" for suffix in ("png", "pdf")]
    with mpl.rc_context(PAPER_STYLE):
        for path in paths:
            figure.savefig(path, dpi=DPI)
    return paths


def palette(count: int) -> list:
    """`count` distinct colours: tab10, then tab20's light shades, then evenly spaced on a continuous map."""
    if count <= 20:
        tab20 = mpl.colormaps["tab20"].colors
        return list(tab20[0::2] + tab20[1::2])[:count]
    return [mpl.colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, count)]


def panels(count: int, height: float, max_columns: int = 3, width: float | None = None) -> tuple[Figure, list]:
    """`count` panels in rows of at most `max_columns`; single-column wide for one panel unless `width`."""
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    width = width or (SINGLE_COLUMN if count == 1 else DOUBLE_COLUMN)
    figure = Figure(figsize=(width, height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for spare in axes[count:]:
        figure.delaxes(spare)
    return figure, axes[:count]


def figure_legend(figure: Figure, handles: list, labels: list[str], **kwargs) -> None:
    """One legend under the panels, as many columns as the width holds; the figure grows by its height."""
    longest = max(len(label) for label in labels)
    column_pt = 7 * 0.55 * longest + 30  # 7 pt text at ~0.55 em a character, plus the handle and spacing
    columns = max(1, min(len(labels), int(figure.get_figwidth() * 72 / column_pt)))
    figure.set_figheight(figure.get_figheight() + 0.15 * math.ceil(len(labels) / columns))
    figure.legend(handles, labels, loc="outside lower center", ncol=columns, **kwargs)


def figure_title(figure: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    characters = int(figure.get_figwidth() * 72 / (PAPER_STYLE["figure.titlesize"] * 0.6))
    figure.suptitle(textwrap.fill(text, characters))


def unique_handles(axes) -> tuple[list, list[str]]:
    """Legend handles of all `axes`, one per label, in first-seen order."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def split_label(split: str) -> str:
    """The legend label of split ``<group>:<name>``: ``<name> (<group>)``."""
    group, _, name = split.partition(":")
    return f"{name} ({group})"

