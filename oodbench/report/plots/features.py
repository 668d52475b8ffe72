"""``features``: a 2-D PCA (or LDA) of the penultimate features per model, ID test classes
coloured from one continuous palette, each OOD set with its own marker and a colour outside it."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.report.plots.style import figure_legend, figure_title, panels, paper_style, split_label, unique_handles

CLASS_PREFIX = "class "
# Outside the ID classes' viridis range: warm hues and black, so OOD points stand out.
OOD_COLOURS = ("#d62728", "#000000", "#ff7f0e", "#e7298a", "#8c564b", "#b8860b", "#7f7f7f", "#f781bf")
OOD_MARKERS = ("^", "s", "D", "v", "P", "*", "X", "h", "<", ">", "p", "d")
MAX_CLASS_LEGEND = 20  # more ID classes get a colour bar instead of one legend entry each


def class_colours(count: int) -> list:
    """ID classes: evenly spaced on viridis (cool hues, any number of classes)."""
    return [mpl.colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, count)]


def ood_styles(count: int) -> list[tuple]:
    """(colour, marker) per OOD set, none shared with each other or with the ID classes."""
    colours = list(OOD_COLOURS[:count])
    colours += [mpl.colormaps["autumn"](x) for x in np.linspace(0, 0.9, count - len(colours))]
    return [(colour, OOD_MARKERS[index % len(OOD_MARKERS)]) for index, colour in enumerate(colours)]


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
    figure, axes = panels(len(points), height=2.6)
    for ax, (model, series) in zip(axes, points.items()):
        for label, xy in series.items():
            colour, marker = style[label]
            if label in classes:
                ax.scatter(xy[:, 0], xy[:, 1], s=5, marker=marker, color=colour, alpha=0.75, linewidths=0, label=label)
            else:
                ax.scatter(xy[:, 0], xy[:, 1], s=14, marker=marker, color=colour, alpha=0.85, edgecolors="white",
                           linewidths=0.3, label=label, zorder=3)
        ax.set(title=model, xlabel=axis_labels[model][0], ylabel=axis_labels[model][1])
    handles, names = unique_handles(axes)
    if len(classes) > MAX_CLASS_LEGEND:
        colours = class_colours(len(classes))
        mappable = mpl.cm.ScalarMappable(Normalize(-0.5, len(classes) - 0.5), mpl.colors.ListedColormap(colours))
        figure.colorbar(mappable, ax=axes, shrink=0.9, label="ID test class (index)")
        summary = Line2D([], [], linestyle="", marker="o", markersize=3, color=colours[len(colours) // 2])
        kept = [(h, n) for h, n in zip(handles, names) if n not in classes]
        handles, names = [summary, *(h for h, _ in kept)], [f"ID test ({len(classes)} classes, colour bar)",
                                                            *(n for _, n in kept)]
    figure_legend(figure, handles, names, markerscale=1.5)
    figure_title(figure, title)
    return figure


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
            series[split_label(split)] = projection.transform(ood[chosen])
        data[spec.display] = series
    return data, axis_labels
