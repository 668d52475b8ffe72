"""`oodbench list`: registered postprocessors, models, datasets, benchmarks, published references."""

from __future__ import annotations

import argparse
import sys

from oodbench.cli.common import add_wide_option

KINDS = ["postprocessors", "models", "datasets", "benchmarks", "references"]  # what oodbench.report.listing lists


def add_parser(sub) -> None:
    parser = sub.add_parser("list", help="list registered postprocessors, models, datasets, benchmarks or the "
                                         "published references (ledgers) tables can be compared with")
    parser.add_argument("kind", choices=KINDS, help="what to list")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help="also load this plugin file")
    parser.add_argument("--model-dir", default="models",
                        help="models: RobustBench's model_dir to look in (default: models)")
    parser.add_argument("--openood-dir", default="results",
                        help="models: OpenOOD v1.5's checkpoint folder to look in (default: results)")
    parser.add_argument("--data-root", help="models: the data root OpenOOD's official checkpoints are fetched into "
                                            "(default: OODBENCH_DATA, else ./data)")
    parser.add_argument("--hf-cache", metavar="DIR",
                        help="models: the Hugging Face hub cache to look in (default: the hub's, HF_HUB_CACHE)")
    add_wide_option(parser)
    parser.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    from oodbench.registry import load_plugins
    from oodbench.report.listing import listing

    if args.kind == "postprocessors":
        for line in load_plugins(args.plugin, strict=False):
            print(f"warning: {line}", file=sys.stderr)
    for block in listing(args.kind, args.wide, args.model_dir, args.openood_dir, args.hf_cache, args.data_root):
        print(block)
    return 0
