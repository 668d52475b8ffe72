"""``landscape``: the score g(x + a d1 + b d2) over a grid of (a, b), d1 and d2 random unit-L2
directions in [0,1]-pixel space, for one ID and one image of each OOD set (the PRO paper's
Fig. 6), every panel on one colour scale."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.errors import OodbenchError
from oodbench.postprocessors.base import Outputs, Postprocessor
from oodbench.postprocessors.gradient import model_device
from oodbench.registry import POSTPROCESSORS
from oodbench.report.plots.images import split_images
from oodbench.report.plots.style import DOUBLE_COLUMN, ID_LABEL, figure_title, paper_style, split_label


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
    figure_title(figure, title)
    return figure


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
        labels[split] = f"{ID_LABEL} #{index}" if split == "id:test" else f"{split_label(split)} #{index}"
    data = {}
    for spec in experiment.config.models:  # each model's images through its own test transform
        images = {label: split_images(experiment, spec, split, np.array([index]))[0] for split, label in labels.items()}
        d1, d2 = random_directions(tuple(next(iter(images.values())).shape), seed)
        method, model = experiment.fitted(spec, name), experiment.model(spec)
        data[spec.display] = {label: score_surface(method, model, image, d1, d2, radius, steps)
                              for label, image in images.items()}
    return data
