"""The figure kinds of ``oodbench plot``, each a `*_data` gatherer feeding its builder."""

from __future__ import annotations

from matplotlib.figure import Figure

from oodbench.benchmark.cells import run_name
from oodbench.benchmark.experiment import CachedExperiment
from oodbench.errors import OodbenchError
from oodbench.report.plots.features import feature_data, scatter_figure
from oodbench.report.plots.histogram import histogram_figure, pro_shift_data, score_data
from oodbench.report.plots.landscape import landscape_data, landscape_figure
from oodbench.report.plots.tradeoff import tradeoff_data, tradeoff_figure, tradeoff_title


def build_plot(kind: str, experiment: CachedExperiment, postprocessor: str = "msp", eps: float = 1e-3,
               samples: int = 500, seed: int = 0, index: int = 0, radius: float = 1.0, steps: int = 41,
               projection: str = "pca", fpr: str | None = None) -> tuple[Figure, str]:
    """The figure of one `oodbench plot` kind and the file stem to save it under."""
    bench, name = experiment.benchmark.name, run_name(experiment.benchmark.name, experiment.config.limit)
    if kind == "hist":
        return (histogram_figure(score_data(experiment, postprocessor), f"{postprocessor} score (higher = ID)",
                                 f"{bench}: {postprocessor} scores, ID test vs OOD test sets"),
                f"hist_{name}_{postprocessor}")
    if kind == "pro-shift":
        return (histogram_figure(pro_shift_data(experiment, eps, samples, seed),
                                 "MSP change s1 - s0 (probability)",
                                 f"{bench}: MSP change after one PRO step (eps={eps:g} in [0,1] pixels; "
                                 f"seeded subsample of at most {samples:,} images per set)"),
                f"pro-shift_{name}")
    if kind == "landscape":
        return (landscape_figure(landscape_data(experiment, postprocessor, index, radius, steps, seed), radius,
                                 f"{postprocessor} score (higher = ID)",
                                 f"{bench}: {postprocessor} on x + a d1 + b d2"),
                f"landscape_{name}_{postprocessor}")
    if kind == "features":
        points, axis_labels = feature_data(experiment, projection, samples, seed)
        return (scatter_figure(points, f"{bench}: penultimate features ({projection.upper()} fitted on ID test)",
                               axis_labels),
                f"features_{name}_{projection}")
    if kind == "tradeoff":
        frame = tradeoff_data(experiment, fpr)
        return tradeoff_figure(frame, tradeoff_title(bench, frame), frame.attrs["fpr"]), f"tradeoff_{name}"
    raise OodbenchError(f"unknown plot kind '{kind}'; choose from hist, pro-shift, landscape, features, tradeoff")
