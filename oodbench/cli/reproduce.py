"""`oodbench reproduce`: regenerate a published table with its official checkpoints and print it
beside the published values."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oodbench.cli.common import name_filter
from oodbench.errors import OodbenchError


def add_parser(sub) -> None:
    parser = sub.add_parser("reproduce", help="regenerate a published table (OpenOOD v1.5's) with its official "
                                              "checkpoints and print it beside the published values")
    parser.add_argument("release", help="the publication: openood-v1.5")
    parser.add_argument("table", help="its table: cifar10, cifar100, imagenet200, imagenet, cifar10_fs, cifar100_fs, "
                                      "imagenet200_fs, imagenet_fs, osr_mnist6")
    parser.add_argument("--fetch", action="store_true",
                        help="download what is missing first (`oodbench data fetch <release>:<table>`); without it "
                             "nothing is downloaded, and what is missing is named with the command that gets it")
    parser.add_argument("--from", dest="source_dir", metavar="DIR",
                        help="with --fetch: import the archives from DIR instead of downloading them")
    parser.add_argument("--data-root", help="data root (default: OODBENCH_DATA, else ./data)")
    parser.add_argument("--results", help="results store (default: results/<release>.sqlite)")
    parser.add_argument("--cache-dir", help="output cache folder (default: OODBENCH_CACHE, else .oodbench_cache)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int, metavar="N", help="DataLoader worker processes decoding images")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads for the forward and backward passes")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="at most N images per split (a seeded stratified subset, named in the caption)")
    name_filter(parser, "postprocessors", "only these methods (default: the release's methods its tables report)")
    parser.add_argument("--no-search", dest="search", action="store_false", default=None,
                        help="default hyperparameters instead of the release's search on the validation splits")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json"], default="text",
                        help="the table's format, as leaderboard --format (default text)")
    parser.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from oodbench.tasks.reproduce import reproduce
    from oodbench.tasks.data import resolve_data_root
    from oodbench.report.leaderboard import reproduction_tables
    from oodbench.storage.store import ResultStore

    if args.source_dir and not args.fetch:
        raise OodbenchError("--from imports archives for --fetch; add --fetch")
    results = args.results or f"results/{args.release}.sqlite"
    release, ran, labels = reproduce(
        args.release, args.table, resolve_data_root(args.data_root), fetch=args.fetch,
        source_dir=Path(args.source_dir) if args.source_dir else None, postprocessors=args.postprocessors,
        echo=lambda line: print(line, file=sys.stderr),  # status lines: stdout carries only the table
        warn=lambda line: print(f"warning: {line}", file=sys.stderr), results=results, cache_dir=args.cache_dir,
        device=args.device, batch_size=args.batch_size, num_workers=args.num_workers, threads=args.threads,
        limit=args.limit, search=args.search)
    store = ResultStore(results, readonly=True)
    for table in reproduction_tables(store, release.name, release.conventions, ran, labels, args.format):
        print(table.rstrip("\n"))
    return 0
