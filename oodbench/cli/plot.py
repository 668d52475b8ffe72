"""`oodbench plot KIND`: one figure (PNG + PDF) from the results store and the output cache."""

from __future__ import annotations

import argparse

from oodbench.cli.common import Once, add_figure_folder, add_run_options, at_least, figure_folder, overrides

# the kinds `oodbench.report.plots.build_plot` draws (named here: importing it imports matplotlib)
PLOT_KINDS = ("hist", "pro-shift", "landscape", "features", "tradeoff")


def add_parser(sub) -> None:
    parser = sub.add_parser("plot", help="figures (PNG + PDF) from the store and the output cache: "
                                         + ", ".join(PLOT_KINDS))
    parser.add_argument("kind", choices=PLOT_KINDS, help="hist: score histograms ID vs OOD; pro-shift: MSP change "
                        "after one PRO step; landscape: score on two random input directions; features: 2-D "
                        "projection of penultimate features; tradeoff: near-OOD FPR@95 against AUROC per method, "
                        "marker by method family (from the store)")
    add_run_options(parser)
    add_figure_folder(parser)
    parser.add_argument("--postprocessor", default="msp", action=Once,
                        help="the method whose scores hist and landscape draw (default msp)")
    parser.add_argument("--eps", type=float, default=1e-3, help="pro-shift step size in [0,1] pixels (default 1e-3)")
    parser.add_argument("--samples", type=at_least(1), default=500, help="images per set for pro-shift and features")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsample and random directions (default 0)")
    parser.add_argument("--index", type=int, default=0, help="landscape: index of the ID and OOD images")
    parser.add_argument("--radius", type=float, default=1.0,
                        help="landscape: a, b in [-radius, radius] (L2 steps in [0,1]-pixel units)")
    parser.add_argument("--steps", type=at_least(2), default=41, help="landscape: grid points per direction")
    parser.add_argument("--projection", choices=["pca", "lda"], default="pca", help="features: PCA or LDA")
    parser.add_argument("--fpr", choices=["classic", "openood"],
                        help="tradeoff: FPR@95 convention (default: the config's)")
    parser.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.report.plots import build_plot, save_figure

    experiment = CachedExperiment.open(args.config, **overrides(args))
    figure, stem = build_plot(args.kind, experiment, postprocessor=args.postprocessor, eps=args.eps,
                              samples=args.samples, seed=args.seed, index=args.index, radius=args.radius,
                              steps=args.steps, projection=args.projection, fpr=args.fpr)
    print("\n".join(map(str, save_figure(figure, figure_folder(args, experiment.config.results), stem))))
    return 0
