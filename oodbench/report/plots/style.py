"""The figures users look at, built from the results store and the output cache.

Figure builders take plain data (arrays per model and split, or a frame) and return a
matplotlib `Figure` (no pyplot state, so no display is needed); `save_figure` writes it as
PNG and PDF. Every figure is paper-sized (3.5 in single column or 7 in double column wide,
8 pt text, so it reads at 100%), labels every axis with its units, and gives every set,
model or class its own colour. The `*_data` functions gather the data:

- ``hist``: scores of one postprocessor, ID test vs each OOD test set, per model;
- ``pro-shift``: s_1 - s_0 of MSP under one PRO step x_1 = x_0 - eps sign(grad_x MSP)
  (the PRO paper's Fig. 3), on a seeded subsample, batched through the model;
- ``landscape``: the score g(x + a d1 + b d2) over a grid of (a, b), d1 and d2 random
  unit-L2 directions in [0,1]-pixel space, for one ID and one image of each OOD set
  (Fig. 6), on one colour scale;
- ``features``: a 2-D PCA (or LDA) of the penultimate features, ID test classes from one
  continuous palette, each OOD set with its own marker and a colour outside it;
- ``tradeoff``: near-OOD FPR@95 against near-OOD AUROC per method (the PRO paper's
  Fig. 1), a panel per model, marker by method family (`Postprocessor.family`), from the store;
- ``oodbench failure``'s risk–coverage figure (selective and generalized risk against coverage);
- the robust-vs-standard bar chart of AUROC per postprocessor and model (Fig. 4), and the
  2x2 calibration-under-noise figure.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import ScalarFormatter

from oodbench.datasets.base import load_dataset
from oodbench.errors import OodbenchError
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.postprocessors.gradient import model_device
from oodbench.postprocessors.pro import max_softmax, pro_trajectory
from oodbench.registry import POSTPROCESSORS
from oodbench.benchmark.leaderboard import AVERAGES, leaderboard_frame

ID_LABEL = "ID test"
CLASS_PREFIX = "class "
SINGLE_COLUMN, DOUBLE_COLUMN = 3.5, 7.0  # figure widths in inches
DPI = 200
PAPER_STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "figure.titlesize": 9, "figure.labelsize": 8,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7, "legend.frameon": False,
    "axes.formatter.useoffset": False, "lines.linewidth": 1.2,
    "pdf.fonttype": 42, "ps.fonttype": 42,  # TrueType fonts in the PDF, as publishers ask
}
FPR_SHORT = {"classic": "ID-positive", "openood": "OpenOOD convention"}
# Outside the ID classes' viridis range: warm hues and black, so OOD points stand out.
OOD_COLOURS = ("#d62728", "#000000", "#ff7f0e", "#e7298a", "#8c564b", "#b8860b", "#7f7f7f", "#f781bf")
OOD_MARKERS = ("^", "s", "D", "v", "P", "*", "X", "h", "<", ">", "p", "d")
FAMILY_STYLE = {  # Postprocessor.family -> (marker, legend label)
    "softmax": ("o", "softmax-based"),
    "logit": ("s", "logit/energy-based"),
    "feature": ("D", "feature-based"),
    "activation": ("^", "activation shaping"),
    "gradient": ("*", "gradient-based"),
    "other": ("P", "other"),
}
CHANCE = "chance (50)"
MAX_CLASS_LEGEND = 20  # more ID classes get a colour bar instead of one legend entry each


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


def class_colours(count: int) -> list:
    """ID classes: evenly spaced on viridis (cool hues, any number of classes)."""
    return [mpl.colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, count)]


def ood_styles(count: int) -> list[tuple]:
    """(colour, marker) per OOD set, none shared with each other or with the ID classes."""
    colours = list(OOD_COLOURS[:count])
    colours += [mpl.colormaps["autumn"](x) for x in np.linspace(0, 0.9, count - len(colours))]
    return [(colour, OOD_MARKERS[index % len(OOD_MARKERS)]) for index, colour in enumerate(colours)]


def _panels(count: int, height: float, max_columns: int = 3, width: float | None = None) -> tuple[Figure, list]:
    """`count` panels in rows of at most `max_columns`; single-column wide for one panel unless `width`."""
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    width = width or (SINGLE_COLUMN if count == 1 else DOUBLE_COLUMN)
    figure = Figure(figsize=(width, height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for spare in axes[count:]:
        figure.delaxes(spare)
    return figure, axes[:count]


def _figure_legend(figure: Figure, handles: list, labels: list[str], **kwargs) -> None:
    """One legend under the panels, as many columns as the width holds; the figure grows by its height."""
    longest = max(len(label) for label in labels)
    column_pt = 7 * 0.55 * longest + 30  # 7 pt text at ~0.55 em a character, plus the handle and spacing
    columns = max(1, min(len(labels), int(figure.get_figwidth() * 72 / column_pt)))
    figure.set_figheight(figure.get_figheight() + 0.15 * math.ceil(len(labels) / columns))
    figure.legend(handles, labels, loc="outside lower center", ncol=columns, **kwargs)


def _title(figure: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    characters = int(figure.get_figwidth() * 72 / (PAPER_STYLE["figure.titlesize"] * 0.6))
    figure.suptitle(textwrap.fill(text, characters))


def _unique_handles(axes) -> tuple[list, list[str]]:
    """Legend handles of all `axes`, one per label, in first-seen order."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def _split_label(split: str) -> str:
    group, _, name = split.partition(":")
    return f"{name} ({group})"


# --------------------------------------------------------------------------- builders


@paper_style
def histogram_figure(values: dict[str, dict[str, np.ndarray]], xlabel: str, title: str, bins: int = 50) -> Figure:
    """One panel per model; one step histogram (density) per split, on shared bins.

    ID test is black and solid, each OOD set dashed in a colour of its own; the legend
    gives the number of scores behind each histogram."""
    labels = list(dict.fromkeys(label for splits in values.values() for label in splits))
    ood = [label for label in labels if label != ID_LABEL]
    colours = {ID_LABEL: "black", **dict(zip(ood, palette(len(ood))))}
    figure, axes = _panels(len(values), height=2.1)
    for ax, (model, splits) in zip(axes, values.items()):
        edges = np.histogram_bin_edges(np.concatenate(list(splits.values())), bins=bins)
        for label, data in splits.items():
            ax.hist(data, bins=edges, density=True, histtype="step", linewidth=1.2, color=colours[label],
                    linestyle="-" if label == ID_LABEL else "--", label=f"{label} (n={len(data):,})")
        ax.set(title=model, xlabel=xlabel, ylabel="density (area = 1)")
    _figure_legend(figure, *_unique_handles(axes))
    _title(figure, title)
    return figure


@paper_style
def landscape_figure(surfaces: dict[str, dict[str, np.ndarray]], radius: float, score_label: str,
                     title: str) -> Figure:
    """Rows = models, columns = images; each panel the score over (a, b) in [-radius, radius]^2.

    Every panel shares one colour scale (one colour bar, no offset on its ticks) and the
    same contour levels, so panels compare directly; + marks the clean image."""
    models = list(surfaces)
    images = list(surfaces[models[0]])
    values = np.concatenate([surface.ravel() for panels in surfaces.values() for surface in panels.values()])
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    norm = Normalize(low, high)
    levels = np.linspace(low, high, 10)[1:-1]
    side = min(1.5, (DOUBLE_COLUMN - 1.3) / len(images))
    figure = Figure(figsize=(DOUBLE_COLUMN, side * len(models) + 1.2), layout="constrained")
    axes = figure.subplots(len(models), len(images), squeeze=False, sharex=True, sharey=True)
    for row, model in enumerate(models):
        for column, image in enumerate(images):
            ax, surface = axes[row, column], surfaces[model][image]
            shown = ax.imshow(surface, origin="lower", extent=(-radius, radius, -radius, radius), cmap="viridis",
                              norm=norm)
            ax.contour(np.linspace(-radius, radius, surface.shape[1]), np.linspace(-radius, radius, surface.shape[0]),
                       surface, levels=levels, colors="white", linewidths=0.4)
            ax.plot([0], [0], marker="+", color="red", markersize=6, linestyle="")
            ax.set_label(f"{model} | {image}")
            ax.set_xticks([-radius, 0, radius])
            ax.set_yticks([-radius, 0, radius])
            if row == 0:
                ax.set_title("\n".join(textwrap.wrap(image, 18)))
            if column == 0:
                ax.set_ylabel(f"{model}\nb (along d2)")
            if row == len(models) - 1:
                ax.set_xlabel("a (along d1)")
    bar = figure.colorbar(shown, ax=axes, shrink=0.9, label=f"{score_label}\n(one scale for all panels)")
    bar.formatter = ScalarFormatter(useOffset=False)
    figure.supxlabel("a, b: L2 steps along random unit-norm directions d1, d2, in [0,1]-pixel units "
                     "(+ = the clean image)")
    _title(figure, title)
    return figure


@paper_style
def scatter_figure(points: dict[str, dict[str, np.ndarray]], title: str,
                   axis_labels: dict[str, tuple[str, str]]) -> Figure:
    """One panel per model: ID test classes (labels ``class <c>``) as dots coloured from
    viridis, each OOD set on top with its own marker and a colour no class uses; one legend
    names every set (past `MAX_CLASS_LEGEND` classes, a colour bar stands for the classes)."""
    labels = list(dict.fromkeys(label for series in points.values() for label in series))
    classes = [label for label in labels if label.startswith(CLASS_PREFIX)]
    ood = [label for label in labels if label not in classes]
    style = {label: (colour, "o") for label, colour in zip(classes, class_colours(len(classes)))}
    style.update(zip(ood, ood_styles(len(ood))))
    figure, axes = _panels(len(points), height=2.6)
    for ax, (model, series) in zip(axes, points.items()):
        for label, xy in series.items():
            colour, marker = style[label]
            if label in classes:
                ax.scatter(xy[:, 0], xy[:, 1], s=5, marker=marker, color=colour, alpha=0.75, linewidths=0, label=label)
            else:
                ax.scatter(xy[:, 0], xy[:, 1], s=14, marker=marker, color=colour, alpha=0.85, edgecolors="white",
                           linewidths=0.3, label=label, zorder=3)
        ax.set(title=model, xlabel=axis_labels[model][0], ylabel=axis_labels[model][1])
    handles, names = _unique_handles(axes)
    if len(classes) > MAX_CLASS_LEGEND:
        colours = class_colours(len(classes))
        mappable = mpl.cm.ScalarMappable(Normalize(-0.5, len(classes) - 0.5), mpl.colors.ListedColormap(colours))
        figure.colorbar(mappable, ax=axes, shrink=0.9, label="ID test class (index)")
        summary = Line2D([], [], linestyle="", marker="o", markersize=3, color=colours[len(colours) // 2])
        kept = [(h, n) for h, n in zip(handles, names) if n not in classes]
        handles, names = [summary, *(h for h, _ in kept)], [f"ID test ({len(classes)} classes, colour bar)",
                                                            *(n for _, n in kept)]
    _figure_legend(figure, handles, names, markerscale=1.5)
    _title(figure, title)
    return figure


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
    _figure_legend(figure, [h for h, _ in entries], [label for _, label in entries])
    _title(figure, f"{long.attrs['benchmark']}: robust vs standard, AUROC per postprocessor")
    return figure


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
    _figure_legend(figure, handles, [*models, *(f"{g}-OOD (AUROC panel)" for g in groups)])
    _title(figure, "Accuracy, calibration and MSP detection under Gaussian logit noise N(0, (s std)^2)")
    return figure


@paper_style
def tradeoff_figure(frame: pd.DataFrame, title: str, fpr: str = "classic") -> Figure:
    """Near-OOD FPR@95 against near-OOD AUROC (both x100), one panel per model on shared
    axes: one point per method, a colour per method and a marker per method family; the
    legend has one column per family, headed by its name."""
    models = list(dict.fromkeys(frame.model))
    families = [f for f in FAMILY_STYLE if f in set(frame.family)]
    columns = {f: list(dict.fromkeys(frame[frame.family == f].postprocessor)) for f in families}
    colours = dict(zip([m for f in families for m in columns[f]], palette(len(frame.postprocessor.unique()))))
    figure, axes = _panels(len(models), height=2.5, width=DOUBLE_COLUMN)
    for ax, model in zip(axes, models):
        for row in frame[frame.model == model].itertuples():
            marker = FAMILY_STYLE[row.family][0]
            ax.scatter([row.auroc], [row.fpr], marker=marker, s=60 if marker == "*" else 30,
                       color=colours[row.postprocessor], edgecolors="0.2", linewidths=0.4, label=row.postprocessor,
                       zorder=3)
        ax.grid(linewidth=0.3, color="0.85")
        ax.set(title=model, xlabel="near-OOD AUROC (x100, higher is better)",
               ylabel=f"near-OOD FPR@95, {FPR_SHORT[fpr]}\n(x100, lower is better)")
        ax.label_outer()
    for ax in axes[1:]:
        ax.sharex(axes[0])
        ax.sharey(axes[0])
    axes[0].margins(0.1)
    rows = 1 + max(len(methods) for methods in columns.values())
    handles, labels = [], []
    blank = Line2D([], [], linestyle="", marker="")
    for family in families:  # column by column: the legend fills each column before the next
        marker, name = FAMILY_STYLE[family]
        entries = [(blank, name)]
        entries += [(Line2D([], [], linestyle="", marker=marker, color=colours[m], markeredgecolor="0.2",
                            markeredgewidth=0.4, markersize=7 if marker == "*" else 5.5), m)
                    for m in columns[family]]
        entries += [(blank, "")] * (rows - len(entries))
        handles += [h for h, _ in entries]
        labels += [label for _, label in entries]
    figure.set_figheight(figure.get_figheight() + 0.15 * rows)
    legend = figure.legend(handles, labels, loc="outside lower center", ncol=len(families), handlelength=1,
                           columnspacing=1.2)
    for text in legend.get_texts():
        if text.get_text() in {FAMILY_STYLE[f][1] for f in families}:
            text.set_fontweight("bold")
    _title(figure, title)
    return figure


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
    _figure_legend(figure, *_unique_handles(axes.ravel()))
    _title(figure, title)
    return figure


# --------------------------------------------------------------------------- data


def score_data(experiment: CachedExperiment, name: str) -> dict[str, dict[str, np.ndarray]]:
    """model -> split label -> scores of postprocessor `name` (stored hyperparameters and fit)."""
    data = {}
    for spec in experiment.config.models:
        method = experiment.fitted(spec, name)
        splits = ["id:test", *experiment.ood_tests(spec)]
        data[spec.display] = {ID_LABEL if s == "id:test" else _split_label(s): experiment.scores(method, spec, s)
                              for s in splits}
    return data


def _images(experiment: CachedExperiment, spec, split: str, indices: np.ndarray | None = None) -> torch.Tensor:
    """[0,1] images of a split (the ones at `indices`) as model `spec` reads them (its test
    transform), loaded from the data root."""
    ref = experiment.splits[split]
    dataset = load_dataset(ref.ref, experiment.config.data_root, experiment.context(spec).image, ood=ref.ood)
    indices = np.arange(len(dataset)) if indices is None else indices
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])


def _subsample(experiment: CachedExperiment, spec, split: str, samples: int, seed: int) -> torch.Tensor:
    size = len(experiment.outputs(experiment.config.models[0], split))
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(size, size=min(samples, size), replace=False))
    return _images(experiment, spec, split, indices)


def pro_shift_data(experiment: CachedExperiment, eps: float, samples: int = 500,
                   seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """model -> split label -> s_1 - s_0 of MSP after one PRO step of size `eps`."""
    data = {}
    for spec in experiment.config.models:
        model = experiment.model(spec)
        device = model_device(model)
        data[spec.display] = {}
        for split in ["id:test", *experiment.ood_tests(spec)]:
            images = _subsample(experiment, spec, split, samples, seed)
            shifts = [pro_trajectory(max_softmax, model, batch.to(device), eps, steps=1).diff(dim=1)[:, 0].cpu()
                      for batch in images.split(experiment.config.batch_size)]
            data[spec.display][ID_LABEL if split == "id:test" else _split_label(split)] = torch.cat(shifts).numpy()
    return data


def score_surface(method: Postprocessor, model, image: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                  radius: float, steps: int, batch_size: int = 1024) -> np.ndarray:
    """steps x steps scores g(x + a d1 + b d2), rows b, columns a, over [-radius, radius]^2."""
    coefficients = torch.linspace(-radius, radius, steps)
    b, a = torch.meshgrid(coefficients, coefficients, indexing="ij")
    shifts = a.reshape(-1, 1, 1, 1) * d1 + b.reshape(-1, 1, 1, 1) * d2
    scores = []
    with torch.no_grad():
        for chunk in shifts.split(batch_size):
            features, logits = model.features((image + chunk).to(model_device(model)))
            scores.append(method.score(Outputs(logits=logits.cpu(), features=features.cpu())).double())
    return torch.cat(scores).reshape(steps, steps).numpy()


def random_directions(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent Gaussian directions of unit L2 norm."""
    generator = torch.Generator().manual_seed(seed)
    d1, d2 = (torch.randn(shape, generator=generator) for _ in range(2))
    return d1 / d1.norm(), d2 / d2.norm()


def landscape_data(experiment: CachedExperiment, name: str, index: int = 0,
                   radius: float = 1.0, steps: int = 41, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """model -> image label -> score surface, for image `index` of ID test and of each OOD set."""
    if POSTPROCESSORS.get(name).needs_model:
        raise OodbenchError(f"the landscape plot scores model outputs directly; '{name}' needs input gradients")
    first = experiment.config.models[0]
    splits = ["id:test", *experiment.ood_tests(first)]
    labels = {}
    for split in splits:
        size = len(experiment.outputs(first, split))
        if not 0 <= index < size:
            raise OodbenchError(f"--index {index} is out of range for {split} ({size} images)")
        labels[split] = f"{ID_LABEL} #{index}" if split == "id:test" else f"{_split_label(split)} #{index}"
    data = {}
    for spec in experiment.config.models:  # each model's images through its own test transform
        images = {label: _images(experiment, spec, split, np.array([index]))[0] for split, label in labels.items()}
        d1, d2 = random_directions(tuple(next(iter(images.values())).shape), seed)
        method, model = experiment.fitted(spec, name), experiment.model(spec)
        data[spec.display] = {label: score_surface(method, model, image, d1, d2, radius, steps)
                              for label, image in images.items()}
    return data


def feature_data(experiment: CachedExperiment, method: str = "pca", samples: int = 300, seed: int = 0
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, tuple[str, str]]]:
    """model -> series label -> 2-D projection of penultimate features (fitted on ID test),
    and model -> the two axis labels (with the share of variance for PCA)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    data, axis_labels = {}, {}
    for spec in experiment.config.models:
        test = experiment.outputs(spec, "id:test")
        features, labels = test.features.double().numpy(), test.labels.numpy()
        if method == "pca":
            projection = PCA(n_components=2, random_state=seed).fit(features)
            axis_labels[spec.display] = tuple(f"PC {i + 1}, {share:.0%} of variance (feature units)"
                                              for i, share in enumerate(projection.explained_variance_ratio_))
        else:
            projection = LinearDiscriminantAnalysis(n_components=2).fit(features, labels)
            axis_labels[spec.display] = tuple(f"LD {i + 1} (whitened discriminant units)" for i in range(2))
        rng = np.random.default_rng(seed)
        series = {}
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            chosen = rng.choice(members, size=min(samples // len(np.unique(labels)) + 1, members.size), replace=False)
            series[f"{CLASS_PREFIX}{label}"] = projection.transform(features[chosen])
        for split in experiment.ood_tests(spec):
            ood = experiment.outputs(spec, split).features.double().numpy()
            chosen = rng.choice(len(ood), size=min(samples, len(ood)), replace=False)
            series[_split_label(split)] = projection.transform(ood[chosen])
        data[spec.display] = series
    return data, axis_labels


def tradeoff_data(experiment: CachedExperiment, fpr: str | None = None) -> pd.DataFrame:
    """One row per (model, postprocessor) of the config in the store (its setting, done):
    near-OOD AUROC and FPR@95 (x100; `fpr` convention, default the config's) and the method's family."""
    config, methods = experiment.config, experiment.plan.methods
    fpr = fpr or config.fpr
    if not experiment.benchmark.near:
        raise OodbenchError(f"benchmark '{experiment.benchmark.name}' has no near-OOD sets; the tradeoff plot "
                            "compares methods on them")
    board = leaderboard_frame(experiment.store, experiment.benchmark.name, [m.display for m in config.models],
                              list(methods), fpr=fpr)
    near = AVERAGES["near"]
    if not board.empty:
        settings = board.postprocessor.map(lambda name: methods[name].setting)
        board = board[(board.status == "done") & (board.setting == settings)]
        board = board.dropna(subset=[f"{near}|auroc", f"{near}|fpr"])
    if board.empty:
        raise OodbenchError(f"no near-OOD results of {config.source} in {experiment.store.path}; "
                            f"{experiment.run_first}")
    return tradeoff_points(board, {name: plan.cls.family for name, plan in methods.items()}, "postprocessor")


def tradeoff_points(board: pd.DataFrame, families: dict[str, str], name: str = "label") -> pd.DataFrame:
    """`tradeoff_figure`'s frame from `board` (`leaderboard_frame` rows, done, with near-OOD values):
    per row its model, postprocessor (the board's column `name`: the row's label, or the bare
    postprocessor where the board holds one setting of each), family (`families`: postprocessor name ->
    `Postprocessor.family`; an unknown or unlisted one counts as other) and near-OOD AUROC and
    FPR@95 (x100, the board's convention)."""
    near = AVERAGES["near"]
    family = board.postprocessor.map(lambda name: families.get(name) if families.get(name) in FAMILY_STYLE else "other")
    frame = pd.DataFrame({"model": board.model, "postprocessor": board[name], "family": family,
                          "auroc": 100 * board[f"{near}|auroc"], "fpr": 100 * board[f"{near}|fpr"]}
                         ).reset_index(drop=True)
    frame.attrs.update(near=[d for d, g in board.attrs.get("groups", {}).items() if g == "near"],
                       fpr=board.attrs["fpr"])
    return frame


def tradeoff_title(benchmark: str, points: pd.DataFrame) -> str:
    """The tradeoff figure's title: the benchmark and its near-OOD sets (`tradeoff_points`)."""
    return f"{benchmark}: near-OOD ({', '.join(points.attrs['near'])}) detection per method"


def build_plot(kind: str, experiment: CachedExperiment, postprocessor: str = "msp", eps: float = 1e-3,
               samples: int = 500, seed: int = 0, index: int = 0, radius: float = 1.0, steps: int = 41,
               projection: str = "pca", fpr: str | None = None) -> tuple[Figure, str]:
    """The figure of one `oodbench plot` kind and the file stem to save it under."""
    bench = experiment.benchmark.name
    if kind == "hist":
        return (histogram_figure(score_data(experiment, postprocessor), f"{postprocessor} score (higher = ID)",
                                 f"{bench}: {postprocessor} scores, ID test vs OOD test sets"),
                f"hist_{bench}_{postprocessor}")
    if kind == "pro-shift":
        return (histogram_figure(pro_shift_data(experiment, eps, samples, seed),
                                 "MSP change s1 - s0 (probability)",
                                 f"{bench}: MSP change after one PRO step (eps={eps:g} in [0,1] pixels; "
                                 f"seeded subsample of at most {samples:,} images per set)"),
                f"pro-shift_{bench}")
    if kind == "landscape":
        return (landscape_figure(landscape_data(experiment, postprocessor, index, radius, steps, seed), radius,
                                 f"{postprocessor} score (higher = ID)",
                                 f"{bench}: {postprocessor} on x + a d1 + b d2"),
                f"landscape_{bench}_{postprocessor}")
    if kind == "features":
        points, axis_labels = feature_data(experiment, projection, samples, seed)
        return (scatter_figure(points, f"{bench}: penultimate features ({projection.upper()} fitted on ID test)",
                               axis_labels),
                f"features_{bench}_{projection}")
    if kind == "tradeoff":
        frame = tradeoff_data(experiment, fpr)
        return tradeoff_figure(frame, tradeoff_title(bench, frame), frame.attrs["fpr"]), f"tradeoff_{bench}"
    raise OodbenchError(f"unknown plot kind '{kind}'; choose from hist, pro-shift, landscape, features, tradeoff")
