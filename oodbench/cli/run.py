"""`oodbench run`: run (or resume) an experiment, print its leaderboard and write its tables."""

from __future__ import annotations

import argparse

from oodbench.cli.common import add_run_options, add_table_options, name_filter, overrides
from oodbench.errors import OodbenchError


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run (or resume) an experiment and print its leaderboard")
    add_run_options(parser)
    search = parser.add_mutually_exclusive_group()
    search.add_argument("--search", dest="search", action="store_true", default=None,
                        help="search hyperparameters on the validation split (the config's default)")
    search.add_argument("--no-search", dest="search", action="store_false", help="use the default hyperparameters")
    parser.add_argument("--executor", default="local",
                        help="local (default: jobs in this process) or ray (jobs as Ray tasks; "
                             "needs pip install 'oodbench[ray]')")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --executor ray: join this Ray cluster (host:port, or auto for the one this node "
                             "belongs to) instead of starting a local Ray instance")
    name_filter(parser, "postprocessors", "run these postprocessors instead of the config's list")
    name_filter(parser, "models", "run only these models of the config")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads for this run's forward and backward passes (default: the config's, "
                             "else one per physical core; see the README)")
    parser.add_argument("--conventions", metavar="PROFILE",
                        help="convention profile (configs/conventions/): paper (the default: each method as its "
                             "paper defines it), openood (OpenOOD v1.5's numbers) or pro (the PRO code's); "
                             "default: the config's")
    add_table_options(parser)
    parser.add_argument("--tables", metavar="DIR", help="write the full tables (Markdown, LaTeX, tidy CSV) to "
                        "DIR/<benchmark>/ (default: tables/ next to the results store)")
    parser.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from oodbench.benchmark.runner import run_experiment
    from oodbench.report.render import render_leaderboard, say_where, write_tables
    from oodbench.storage.store import ResultStore

    options = {}
    if args.ray_address:
        if args.executor != "ray":
            raise OodbenchError("--ray-address needs --executor ray")
        options["address"] = args.ray_address
    frame = run_experiment(args.config, executor=args.executor, executor_options=options, search=args.search,
                           postprocessors=args.postprocessors, models=args.models,
                           conventions=args.conventions,
                           threads=args.threads, **overrides(args))
    store = ResultStore(frame.attrs["store"], readonly=True)
    resamples = args.resamples if args.ci else None
    print(render_leaderboard(frame, args.format, args.wide, args.show_params, store, resamples, args.ci_seed,
                             args.reference))
    if not frame.empty:
        folder = args.tables or store.path.parent / "tables"
        if args.postprocessors or args.models:  # the tables stay the config's whole grid, as stored
            frame = whole_grid(args, frame)
        say_where(write_tables(frame, folder, store, resamples, args.ci_seed))
    return 0


def whole_grid(args: argparse.Namespace, frame):
    """After a run of part of a config (--postprocessors / --models): the leaderboard of every
    model and postprocessor of the config that the store holds, as `leaderboard` would show
    them, so the tables the run writes are never cut down to the part it ran."""
    from oodbench.benchmark.config import load_config
    from oodbench.benchmark.leaderboard import leaderboard_frame
    from oodbench.benchmark.plan import resolve_postprocessors
    from oodbench.storage.store import ResultStore

    config = load_config(args.config, conventions=args.conventions, **overrides(args))
    store = ResultStore(frame.attrs["store"], readonly=True)
    try:
        whole = leaderboard_frame(store, frame.attrs["benchmark"], models=[m.model_label for m in config.models],
                                  postprocessors=resolve_postprocessors(config.postprocessors, config.plugins),
                                  fpr=config.fpr, conventions=config.conventions, limit=config.limit)
    finally:
        store.close()
    whole.attrs = {**frame.attrs, **whole.attrs}
    return whole
