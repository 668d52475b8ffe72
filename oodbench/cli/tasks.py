"""Whole tasks on a finished run's output cache and store: `oodbench calibration` (under logit
noise), `oodbench report --operating-point` and `oodbench failure` (failure detection)."""

from __future__ import annotations

import argparse
import sys

from oodbench.cli.common import (Once, add_figure_folder, add_run_options, figure_folder, name_filter, overrides,
                                 save_figure_and_table)
from oodbench.errors import OodbenchError


def add_parser(sub) -> None:
    add_calibration(sub)
    add_report(sub)
    add_failure(sub)


def add_calibration(sub) -> None:
    parser = sub.add_parser("calibration", help="accuracy, ECE, NLL and MSP AUROC under Gaussian logit noise, "
                                                "per model; from the output cache")
    add_run_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--levels", type=int, default=10, help="number of noise levels s (default 10)")
    parser.add_argument("--max-level", type=float, default=2.0, help="largest s, in units of std(logits) (default 2)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex (compiles as pasted) or csv / json (one tidy row per number)")
    add_figure_folder(parser)
    parser.set_defaults(func=cmd_calibration)


def cmd_calibration(args: argparse.Namespace) -> int:
    from oodbench.benchmark.cells import run_name
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.report.calibration import render_calibration
    from oodbench.report.plots import calibration_figure
    from oodbench.tasks.calibration import experiment_calibration, noise_levels

    if args.levels < 1:
        raise OodbenchError("--levels must be at least 1")
    experiment = CachedExperiment.open(args.config, **overrides(args))
    frame = experiment_calibration(experiment, noise_levels(args.levels, args.max_level), args.seed)
    if args.format in ("csv", "json"):
        from oodbench.report.tidy import calibration_tidy, render_tidy

        models = {m.display: (m.model_label, m.member or "") for m in experiment.config.models}
        print(render_tidy(calibration_tidy(frame, experiment.benchmark.name, experiment.plan.fingerprint, models),
                          args.format).rstrip("\n"))
    else:
        print(render_calibration(frame, args.format))
    save_figure_and_table(calibration_figure(frame), frame, figure_folder(args, experiment.config.results), f"calibration_{run_name(experiment.benchmark.name, experiment.config.limit)}")
    return 0


def add_report(sub) -> None:
    parser = sub.add_parser("report", help="operating-point report of one postprocessor: threshold keeping 95%% "
                                           "of ID validation (or --tau), then rates on test; with several models "
                                           "(e.g. one entry per head of a model, each with its 'output' option) or "
                                           "holdout_classes on the benchmark's test split, a summary row per head "
                                           "with seen/unseen accuracy")
    add_run_options(parser)
    parser.add_argument("--operating-point", action="store_true", required=True, help="the operating-point report")
    parser.add_argument("--postprocessor", required=True, action=Once, help="a postprocessor of the config's run")
    parser.add_argument("--tau", type=float, help="use this score threshold instead of the 95%% ID-val one")
    name_filter(parser, "models", "only these models (default all)")
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.registry import POSTPROCESSORS
    from oodbench.tasks.operating_point import (model_operating_point, render_operating_point, render_summary,
                                                summary_frame)

    experiment = CachedExperiment.open(args.config, **overrides(args))
    _, specs = experiment.selected([args.postprocessor], args.models)
    if POSTPROCESSORS.get(args.postprocessor).needs_model:
        print(f"note: {args.postprocessor} needs input gradients: the model runs again over every split",
              file=sys.stderr)
    reports = [model_operating_point(experiment, spec, args.postprocessor, args.tau) for spec in specs]
    if len(reports) > 1 or experiment.benchmark.holdout_classes:
        print(render_summary(summary_frame(reports)) + "\n")
    print("\n\n".join(render_operating_point(r) for r in reports))
    return 0


def add_failure(sub) -> None:
    parser = sub.add_parser("failure", help="failure detection on ID test (right vs wrong predictions) for every "
                                            "postprocessor of a finished run: AURC, E-AURC, AUGRC, AUROC_f, "
                                            "FPR@95_f, and a risk-coverage plot; from the store's scores")
    add_run_options(parser)
    name_filter(parser, "postprocessors", "only these postprocessors (default all)")
    name_filter(parser, "models", "only these models (default all)")
    parser.add_argument("--sort", choices=["aurc", "eaurc", "augrc", "auroc", "fpr95"], default="aurc",
                        help="rank each model's rows by this metric, best first (default aurc)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex, or csv / json (one row per cell, fractions)")
    add_figure_folder(parser)
    parser.set_defaults(func=cmd_failure)


def cmd_failure(args: argparse.Namespace) -> int:
    from oodbench.benchmark.cells import run_name
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.report.failure import render_failure
    from oodbench.report.plots import risk_coverage_figure
    from oodbench.tasks.failure import experiment_failure

    experiment = CachedExperiment.open(args.config, **overrides(args))
    frame, curves = experiment_failure(experiment, args.postprocessors, args.models)
    if args.format == "csv":
        print(frame.to_csv(index=False).rstrip("\n"))
    elif args.format == "json":
        print(frame.to_json(orient="records", double_precision=15))
    else:
        print(render_failure(frame, args.format, args.sort))
    title = f"{experiment.benchmark.name}: selective classification on ID test per postprocessor"
    save_figure_and_table(risk_coverage_figure(curves, title), frame, figure_folder(args, experiment.config.results),
                          f"failure_{run_name(experiment.benchmark.name, experiment.config.limit)}")
    return 0
