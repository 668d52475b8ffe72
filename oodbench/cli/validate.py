"""`oodbench validate`: check an experiment config without running it."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("validate", help="check an experiment config without running it (names, values, "
                                             "model sources, checkpoint files)")
    parser.add_argument("config", help="experiment YAML (configs/experiments/*.yaml or your own)")
    parser.add_argument("--data-root", help="data root (overrides the config and OODBENCH_DATA)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a postprocessor plugin file to load first (repeatable), as run --plugin")
    parser.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from oodbench.tasks.attacks.spec import threat_model
    from oodbench.benchmark.config import load_config
    from oodbench.benchmark.validate import validate_config

    config = load_config(args.config, plugins=args.plugin, data_root=args.data_root)
    summary = validate_config(config)
    if config.attack is not None:  # the threat model `oodbench attack` would read
        threat_model(config)
    print(summary)
    return 0
