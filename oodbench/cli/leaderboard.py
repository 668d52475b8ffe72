"""`oodbench leaderboard` (tables rebuilt from the results store alone) and `oodbench results`
(what a store holds, its failed cells, its tidy export)."""

from __future__ import annotations

import argparse
import sys

from oodbench.cli.common import DEFAULT_STORE, add_table_options, name_filter, write_output
from oodbench.errors import OodbenchError


def add_parser(sub) -> None:
    parser = sub.add_parser("leaderboard", help="rebuild leaderboard tables from the results store alone")
    parser.add_argument("--results", default=DEFAULT_STORE, help=f"results store (default {DEFAULT_STORE})")
    parser.add_argument("--benchmark", help="only this benchmark (default: every benchmark in the store); a seed "
                                            "family's name (osr_mnist6) averages its <name>_seed<N> benchmarks")
    parser.add_argument("--average-seeds", action="store_true",
                        help="one table per seed family (<name>_seed<N> benchmarks): mean ± std over the seeds")
    name_filter(parser, "models", "only these models")
    name_filter(parser, "postprocessors", "only these postprocessors")
    parser.add_argument("--fpr", choices=["classic", "openood"],
                        help="show every row's FPR@95 in this convention: classic (ID positive) or openood (OOD "
                             "positive); default: each cell's in the convention it was run under, as `run` printed "
                             "it (cells run under different ones: one table per convention)")
    parser.add_argument("--conventions", metavar="PROFILE",
                        help="only cells computed under this convention profile (paper, openood, pro), named in "
                             "the caption; default: every profile's cells")
    add_table_options(parser, page=True)
    parser.add_argument("--attack", action="store_true",
                        help="clean vs attacked AUROC / FPR@95 per method and eps, from the runs of `oodbench "
                             "attack` (tidy CSV / JSON: its rows, with attack, eps and gradient columns)")
    parser.add_argument("--output", help="also write the table to this file")
    parser.add_argument("--tables", metavar="DIR",
                        help="also write the full tables (Markdown, LaTeX, tidy CSV) to DIR/<benchmark>/")
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument("--fingerprint", metavar="PREFIX",
                          help="only cells of this data fingerprint (or cell fingerprint), by prefix; default: the "
                               "latest cell of each model, postprocessor and setting")
    versions.add_argument("--all", dest="every", action="store_true",
                          help="every stored version of each cell (older data, weights or code), labelled by fingerprint")
    parser.set_defaults(func=cmd_leaderboard)


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from oodbench.report.leaderboard import leaderboard_text, stored_benchmarks
    from oodbench.report.render import say_where, write_tables
    from oodbench.storage.store import ResultStore

    store = ResultStore(args.results, readonly=True)
    benchmarks, average = stored_benchmarks(store, args.benchmark, args.average_seeds)
    if average and (args.ci or args.tables):
        raise OodbenchError("--ci and --tables show one benchmark's cells; with seeds averaged, ask for one seed "
                            "(--benchmark <family>_seed<N>)")
    resamples = args.resamples if args.ci else None
    if args.attack:
        from oodbench.report.attack_report import stored_attack_report

        if args.format == "html":
            raise OodbenchError("--attack has no html page; use --format markdown, latex, csv or json")
        if args.ci or args.reference or args.tables or args.average_seeds or args.wide:
            raise OodbenchError("--attack shows the stored attack runs alone; leave out --ci, --reference, "
                                "--tables, --average-seeds and --wide")
        text, frames = stored_attack_report(store, benchmarks, args.models, args.postprocessors, args.format,
                                            args.fpr), []
    else:
        text, frames = leaderboard_text(store, benchmarks, average, models=args.models,
                                        postprocessors=args.postprocessors, fpr=args.fpr, conventions=args.conventions,
                                        fingerprint=args.fingerprint, every=args.every, fmt=args.format,
                                        wide=args.wide, show_params=args.show_params, resamples=resamples,
                                        ci_seed=args.ci_seed, reference=args.reference, page=args.output)
    print(text.rstrip("\n"))
    for frame in frames if args.tables else []:
        say_where(write_tables(frame, args.tables, store, resamples, args.ci_seed))
    if args.output and args.format != "html":  # the page went to --output itself
        write_output(args.output, text + "\n")
    return 0


def add_results(sub) -> None:
    parser = sub.add_parser("results", help="what a results store holds: benchmarks, data fingerprints, models, "
                                            "checkpoints, settings, cell counts, failed cells and why; export")
    parser.add_argument("store", help="the results store (.sqlite)")
    parser.add_argument("action", nargs="?", choices=["list", "export"], default="list",
                        help="list (default) or export (the tidy table of every number)")
    parser.add_argument("--benchmark", action="append", help="only this benchmark (repeatable)")
    parser.add_argument("--failed", action="store_true", help="list: only the cells that did not finish, and why")
    parser.add_argument("--all", dest="every", action="store_true",
                        help="export: every stored version of each cell (default: the latest of each)")
    parser.add_argument("--format", choices=["csv", "json"], default="csv", help="export: csv (default) or json")
    parser.add_argument("--fpr", choices=["classic", "openood", "both"],
                        help="export: FPR@95 rows in this convention, or both (every stored number); default: each "
                             "cell's in the convention it was run under, as `run` and `leaderboard` show it")
    parser.add_argument("--output", metavar="FILE", help="export: write to FILE (default: print)")
    parser.set_defaults(func=cmd_results)


def cmd_results(args: argparse.Namespace) -> int:
    from oodbench.report import inventory
    from oodbench.storage.store import ResultStore

    store = ResultStore(args.store, readonly=True)
    benchmarks = inventory.benchmarks_in(store, args.benchmark)
    if args.action == "export":
        text = inventory.export(store, benchmarks, args.every, args.format, args.fpr)
        if args.output:
            write_output(args.output, text)
            print(f"{args.output}: {text.count(chr(10)) - 1 if args.format == 'csv' else 'all'} rows", file=sys.stderr)
        else:
            print(text.rstrip("\n"))
    elif args.failed:
        print(inventory.failures(store, benchmarks) or f"every cell in {args.store} finished")
    else:
        print(inventory.summary(store, benchmarks))
    return 0
