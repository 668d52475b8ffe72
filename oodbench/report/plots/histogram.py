"""Histograms per model of one number per image, ID test against each OOD test set:

- ``hist``: the scores of one postprocessor (its stored hyperparameters and fit);
- ``pro-shift``: s_1 - s_0 of MSP under one PRO step x_1 = x_0 - eps sign(grad_x MSP)
  (the PRO paper's Fig. 3), on a seeded subsample, batched through the model.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from oodbench.benchmark.experiment import CachedExperiment
from oodbench.postprocessors.gradient import model_device
from oodbench.postprocessors.pro import max_softmax, pro_trajectory
from oodbench.report.plots.images import subsample_images
from oodbench.report.plots.style import (ID_LABEL, figure_legend, figure_title, palette, panels, paper_style,
                                        split_label, unique_handles)


@paper_style
def histogram_figure(values: dict[str, dict[str, np.ndarray]], xlabel: str, title: str, bins: int = 50) -> Figure:
    """One panel per model; one step histogram (density) per split, on shared bins.

    ID test is black and solid, each OOD set dashed in a colour of its own; the legend
    gives the number of scores behind each histogram."""
    labels = list(dict.fromkeys(label for splits in values.values() for label in splits))
    ood = [label for label in labels if label != ID_LABEL]
    colours = {ID_LABEL: "black", **dict(zip(ood, palette(len(ood))))}
    figure, axes = panels(len(values), height=2.1)
    for ax, (model, splits) in zip(axes, values.items()):
        edges = np.histogram_bin_edges(np.concatenate(list(splits.values())), bins=bins)
        for label, data in splits.items():
            ax.hist(data, bins=edges, density=True, histtype="step", linewidth=1.2, color=colours[label],
                    linestyle="-" if label == ID_LABEL else "--", label=f"{label} (n={len(data):,})")
        ax.set(title=model, xlabel=xlabel, ylabel="density (area = 1)")
    figure_legend(figure, *unique_handles(axes))
    figure_title(figure, title)
    return figure


def score_data(experiment: CachedExperiment, name: str) -> dict[str, dict[str, np.ndarray]]:
    """model -> split label -> scores of postprocessor `name` (stored hyperparameters and fit)."""
    data = {}
    for spec in experiment.config.models:
        method = experiment.fitted(spec, name)
        splits = ["id:test", *experiment.ood_tests(spec)]
        data[spec.display] = {ID_LABEL if s == "id:test" else split_label(s): experiment.scores(method, spec, s)
                              for s in splits}
    return data


def pro_shift_data(experiment: CachedExperiment, eps: float, samples: int = 500,
                   seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """model -> split label -> s_1 - s_0 of MSP after one PRO step of size `eps`."""
    data = {}
    for spec in experiment.config.models:
        model = experiment.model(spec)
        device = model_device(model)
        data[spec.display] = {}
        for split in ["id:test", *experiment.ood_tests(spec)]:
            images = subsample_images(experiment, spec, split, samples, seed)
            shifts = [pro_trajectory(max_softmax, model, batch.to(device), eps, steps=1).diff(dim=1)[:, 0].cpu()
                      for batch in images.split(experiment.config.batch_size)]
            data[spec.display][ID_LABEL if split == "id:test" else split_label(split)] = torch.cat(shifts).numpy()
    return data
