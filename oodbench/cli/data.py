"""`oodbench data status` (which datasets a benchmark needs, and whether they are there) and
`oodbench data fetch` (the one command that downloads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from oodbench.cli.common import add_wide_option


def add_parser(sub) -> None:
    parser = sub.add_parser("data", help="which datasets a benchmark needs and whether they are there; downloads")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="list every dataset a benchmark needs: present/missing, sample counts")
    status.add_argument("benchmark", nargs="?", help="benchmark name or YAML (default: every registered benchmark)")
    status.add_argument("--data-root", help="data root (default: OODBENCH_DATA, else ./data)")
    add_wide_option(status)
    status.set_defaults(func=cmd_data_status)
    fetch = actions.add_parser("fetch", help="the one command that downloads: a published release's lists, images "
                                             "and checkpoints (verified, resumable), or what torchvision can download")
    fetch.add_argument("name", nargs="+",
                       help="openood-v1.5:<table> (everything OpenOOD v1.5's table needs: cifar10, cifar100, "
                            "imagenet200, imagenet, cifar10_fs, cifar100_fs, imagenet200_fs, imagenet_fs, osr_mnist6), "
                            "openood-v1.5/<asset> (one archive: tin, texture, cifar10_res18_v1.5, ...); torchvision: "
                            "cifar10, cifar100, svhn, mnist, fashion_mnist, kmnist, emnist, qmnist; instructions only: "
                            "tin, textures, places365, openood, odin")
    fetch.add_argument("--data-root", help="data root (default: OODBENCH_DATA, else ./data)")
    fetch.add_argument("--from", dest="source_dir", metavar="DIR",
                       help="import the release's archives from DIR (downloaded elsewhere, e.g. for an offline "
                            "cluster) instead of downloading them; verified the same way")
    fetch.set_defaults(func=cmd_data_fetch)


def cmd_data_status(args: argparse.Namespace) -> int:
    from oodbench.tasks.data import resolve_data_root
    from oodbench.report.listing import data_status

    root = resolve_data_root(args.data_root)
    for block in data_status(root, [args.benchmark] if args.benchmark else None, args.wide):
        print(block)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from oodbench.tasks.data import fetch, resolve_data_root

    root = resolve_data_root(args.data_root)
    for name in args.name:
        fetch(name, root, source_dir=Path(args.source_dir) if args.source_dir else None)
    return 0
