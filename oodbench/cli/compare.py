"""`oodbench compare`: robust vs standard models (by config tags), from the results store."""

from __future__ import annotations

import argparse
import sys

from oodbench.cli.common import add_figure_folder, add_run_options, figure_folder, overrides


def add_parser(sub) -> None:
    parser = sub.add_parser("compare", help="robust vs standard models (by config tags): deltas, PRO gains, "
                                            "AUROC bar chart; from the results store")
    add_run_options(parser)
    parser.add_argument("--fpr", choices=["classic", "openood"], help="FPR@95 convention (default: the config's)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex (compiles as pasted) or csv / json (one tidy row per number)")
    parser.add_argument("--attack", action="store_true",
                        help="also robust vs standard under the config's attack: (as `oodbench attack`; attacked "
                             "scores already cached are read, not recomputed)")
    parser.add_argument("--wide", action="store_true",
                        help="markdown: every model in one table (default: tables split to fit 100 columns)")
    add_figure_folder(parser)
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from oodbench.benchmark.config import load_config
    from oodbench.report.compare import render_comparison
    from oodbench.benchmark.cells import run_name
    from oodbench.report.plots import auroc_bars, save_figure
    from oodbench.storage.store import ResultStore
    from oodbench.tasks.compare import comparison_results

    config = load_config(args.config, **overrides(args))
    long = comparison_results(ResultStore(config.results, readonly=True), config, args.fpr or config.fpr)
    print(render_comparison(long, args.format, args.wide).rstrip("\n"))
    if args.attack:
        from oodbench.benchmark.experiment import CachedExperiment
        from oodbench.report.attack_report import attack_comparison

        print("\n" + attack_comparison(CachedExperiment.open(args.config, **overrides(args)), args.format))
    paths = save_figure(auroc_bars(long), figure_folder(args, config.results), f"compare_{run_name(long.attrs['benchmark'], config.limit)}")
    print(f"bar chart: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0
