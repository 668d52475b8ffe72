"""The `oodbench` console script: one subcommand per user task, each a small function.

Errors a user can cause (`OodbenchError`) end in one line on stderr and exit code 2;
``--debug`` (or ``OODBENCH_DEBUG=1``) prints the whole traceback above that line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Callable

from oodbench.errors import OodbenchError, debugging, did_you_mean, os_error_line

DEFAULT_STORE = "results/oodbench.sqlite"


def _add_common_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE",
                        help="a .py file registering extra postprocessors (repeatable)")
    parser.add_argument("--results", help=f"results store (default: the config's, else {DEFAULT_STORE})")
    parser.add_argument("--data-root", help="data root (overrides the config and OODBENCH_DATA)")
    parser.add_argument("--cache-dir", help="output cache folder (overrides the config and OODBENCH_CACHE)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int, metavar="N",
                        help="DataLoader worker processes decoding images (default: the config's, else 0: in the "
                             "main process); pinned memory on a CUDA device")
    parser.add_argument("--trust-checkpoint", action="store_true", default=None,
                        help="allow checkpoints that need full unpickling (can run code: trusted files only)")
    parser.add_argument("--verify-data", action="store_true", default=None,
                        help="fingerprint image files by their full contents, not path, size and modification "
                             "time (slower; single-file formats are always hashed)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="at most N images per dataset split (a seeded stratified subset, the same on every "
                             "machine; named in the table caption); the commands that read a run (compare, attack, "
                             "calibration, report, plot) read the run made with the same --limit")


def _overrides(args: argparse.Namespace) -> dict:
    return {"plugins": args.plugin, "results": args.results, "data_root": args.data_root,
            "cache_dir": args.cache_dir, "device": args.device, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "limit": args.limit,
            "trust_checkpoint": args.trust_checkpoint, "verify_data": args.verify_data}


# ------------------------------------------------------------------------ run


def add_run(sub) -> None:
    parser = sub.add_parser("run", help="run (or resume) an experiment and print its leaderboard")
    _add_common_run_args(parser)
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
    parser.add_argument("--postprocessors", type=_names, metavar="A,B",
                        help="run these postprocessors instead of the config's list")
    parser.add_argument("--models", type=_names, metavar="X,Y", help="run only these models of the config")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads for this run's forward and backward passes (default: the config's, "
                             "else one per physical core; see the README)")
    parser.add_argument("--conventions", metavar="PROFILE",
                        help="convention profile (configs/conventions/): paper (the default: each method as its "
                             "paper defines it), openood (OpenOOD v1.5's numbers) or pro (the PRO code's); "
                             "default: the config's")
    _add_table_args(parser)
    parser.add_argument("--tables", metavar="DIR", help="write the full tables (Markdown, LaTeX, tidy CSV) to "
                        "DIR/<benchmark>/ (default: tables/ next to the results store)")
    parser.set_defaults(func=cmd_run)


def _add_table_args(parser: argparse.ArgumentParser, page: bool = False) -> None:
    page_help = ("; html: one self-contained page (sortable tables, the comparison, figures) written to --output, "
                 "by default tables/<benchmark>/leaderboard.html beside the store")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json", *(["html"] if page else [])],
                        default="text", help="text (default: the compact table, 100 columns), markdown, latex "
                        "(compiles as pasted; booktabs), csv or json (one tidy row per number)" + (page_help if page else ""))
    parser.add_argument("--wide", action="store_true",
                        help="one column per OOD set (FPR / AUROC) instead of the compact near/far table")
    parser.add_argument("--show-params", action="store_true",
                        help="show the chosen hyperparameters (CSV and JSON always carry them: column params)")
    parser.add_argument("--ci", action="store_true",
                        help="95%% bootstrap intervals for AUROC and FPR@95 (resampling the test images, paired "
                             "across methods) and ~ on values not significantly worse than the column's best")
    parser.add_argument("--resamples", type=at_least(1), default=1000, metavar="N",
                        help="bootstrap resamples for --ci (default 1000)")
    parser.add_argument("--ci-seed", type=int, default=0, metavar="SEED", help="seed of the --ci resamples (default 0)")
    parser.add_argument("--reference", metavar="NAME",
                        help="beside each row, a published ledger's value for the same benchmark and method "
                             "(oodbench list references; e.g. openood-v1.5), the difference and whether it lies in "
                             "the row's interval; compared only for rows run under the source's conventions")


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


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
                           threads=args.threads, **_overrides(args))
    store = ResultStore(frame.attrs["store"], readonly=True)
    resamples = args.resamples if args.ci else None
    print(render_leaderboard(frame, args.format, args.wide, args.show_params, store, resamples, args.ci_seed,
                             args.reference))
    if not frame.empty:
        folder = args.tables or store.path.parent / "tables"
        say_where(write_tables(frame, folder, store, resamples, args.ci_seed))
    return 0


# ------------------------------------------------------------------------ leaderboard


def add_leaderboard(sub) -> None:
    parser = sub.add_parser("leaderboard", help="rebuild leaderboard tables from the results store alone")
    parser.add_argument("--results", default=DEFAULT_STORE, help=f"results store (default {DEFAULT_STORE})")
    parser.add_argument("--benchmark", help="only this benchmark (default: every benchmark in the store); a seed "
                                            "family's name (osr_mnist6) averages its <name>_seed<N> benchmarks")
    parser.add_argument("--average-seeds", action="store_true",
                        help="one table per seed family (<name>_seed<N> benchmarks): mean ± std over the seeds")
    parser.add_argument("--model", action="append", help="only these models (repeatable)")
    parser.add_argument("--postprocessor", action="append", help="only these postprocessors (repeatable)")
    parser.add_argument("--fpr", choices=["classic", "openood"],
                        help="show every row's FPR@95 in this convention: classic (ID positive) or openood (OOD "
                             "positive); default: each cell's in the convention it was run under, as `run` printed "
                             "it (cells run under different ones: one table per convention)")
    parser.add_argument("--conventions", metavar="PROFILE",
                        help="only cells computed under this convention profile (paper, openood, pro), named in "
                             "the caption; default: every profile's cells")
    _add_table_args(parser, page=True)
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
    from oodbench.report.render import render_leaderboard, say_where, write_tables
    from oodbench.report.seeds import average_frames, averaged_tidy, mixed_fpr, seed_families
    from oodbench.storage.store import ResultStore
    from oodbench.benchmark.leaderboard import leaderboard_frames
    from oodbench.report.tidy import CLEAN_ATTACK, leaderboard_tidy, render_tidy

    store = ResultStore(args.results, readonly=True)
    stored = sorted(set(store.frame("cells").benchmark))
    benchmarks = [args.benchmark] if args.benchmark else stored
    family = seed_families(stored).get(args.benchmark) if args.benchmark not in stored else None
    if family:
        benchmarks = family
    average = args.average_seeds or bool(family)
    if not benchmarks:
        raise OodbenchError(f"results store {args.results} holds no results yet")
    if average and (args.ci or args.tables):
        raise OodbenchError("--ci and --tables show one benchmark's cells; with seeds averaged, ask for one seed "
                            "(--benchmark <family>_seed<N>)")
    resamples = args.resamples if args.ci else None
    if args.reference:
        from oodbench.report.ledger import load_ledger

        ledger = load_ledger(args.reference)  # an unknown or broken ledger fails before any table is built
    if args.attack:
        if args.format == "html":
            raise OodbenchError("--attack has no html page; use --format markdown, latex, csv or json")
        from oodbench.cli.attack import attack_leaderboard

        text = attack_leaderboard(store, benchmarks, args)
        print(text.rstrip("\n"))
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    frames = []
    for benchmark in benchmarks:
        found = leaderboard_frames(store, benchmark, args.model, args.postprocessor, fpr=args.fpr,
                                   fingerprint=args.fingerprint, every=args.every, conventions=args.conventions)
        if found[0].empty:
            raise OodbenchError(_no_results(store, benchmark, args))
        frames += found
    mixed = mixed_fpr(frames) if average else []
    if mixed:
        raise OodbenchError(f"the seeds of {', '.join(mixed)} were run under different FPR@95 conventions; "
                            "average them in one with --fpr classic or --fpr openood")
    if args.format in ("csv", "json"):  # one tidy table, whatever the number of benchmarks
        import pandas as pd

        tidies = [leaderboard_tidy(f, store, resamples, args.ci_seed) for f in frames]
        if args.reference:
            from oodbench.report.reference import tidy_reference

            tidies = [tidy_reference(t, f, ledger) for t, f in zip(tidies, frames)]
        tidy = pd.concat(tidies)
        if average:
            seeded = tidy.benchmark.isin([n for names in seed_families(benchmarks).values() for n in names])
            tidy = pd.concat([tidy[~seeded].assign(std=float("nan"), seeds=""),
                              averaged_tidy(tidy[seeded]).assign(**CLEAN_ATTACK)])
        text = render_tidy(tidy, args.format)
    elif args.format == "html":  # the page goes to a file; stdout names it
        from oodbench.report.html import write_page

        frames = average_frames(frames) if average else frames
        text = f"report page: {write_page(frames, store, args.output, resamples, args.ci_seed, args.reference)}"
    else:
        frames = average_frames(frames) if average else frames
        text = "\n\n".join(render_leaderboard(f, args.format, args.wide, args.show_params, store, resamples,
                                               args.ci_seed, args.reference) for f in frames)
    print(text.rstrip("\n"))
    for frame in frames if args.tables else []:
        say_where(write_tables(frame, args.tables, store, resamples, args.ci_seed))
    if args.output and args.format != "html":
        write_output(args.output, text + "\n")
    return 0


def _no_results(store, benchmark: str, args: argparse.Namespace) -> str:
    """Why a leaderboard is empty: the model or postprocessor asked for has no results (and which
    have), else the fingerprint or convention filter matched nothing."""
    cells = store.frame("cells")
    cells = cells[cells.benchmark == benchmark]
    for option, column in (("model", "model"), ("postprocessor", "postprocessor")):
        asked = [name for name in getattr(args, option) or [] if name not in set(cells[column])]
        if asked:
            have = sorted(set(cells[column]))
            return (f"no results for {option} '{asked[0]}'{did_you_mean(asked[0], have)} in benchmark '{benchmark}' "
                    f"of {args.results}; it has results for: {', '.join(have)}")
    which = f" with fingerprint {args.fingerprint}" if args.fingerprint else ""
    which += f" under conventions '{args.conventions}'" if args.conventions else ""
    return f"no results for benchmark '{benchmark}'{which} in {args.results}"


def write_output(path: str, text: str) -> None:
    """Write an --output file, or one line saying why not (a missing folder is named as such)."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise OodbenchError(f"cannot write {target}: its folder {target.parent} does not exist (create it first)")
    try:
        target.write_text(text)
    except OSError as exc:
        raise OodbenchError(f"cannot write {target}: {os_error_line(exc)}") from None


# ------------------------------------------------------------------------ list


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
    known = sorted(set(store.frame("cells").benchmark))
    for name in args.benchmark or []:
        if name not in known:
            raise OodbenchError(f"no benchmark '{name}' in {args.store}{did_you_mean(name, known)}; "
                                f"it holds: {', '.join(known) or 'nothing yet'}")
    benchmarks = args.benchmark or known
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


def add_list(sub) -> None:
    parser = sub.add_parser("list", help="list registered postprocessors, models, datasets, benchmarks or the "
                                         "published references (ledgers) tables can be compared with")
    parser.add_argument("kind", choices=["postprocessors", "models", "datasets", "benchmarks", "references"])
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help="also load this plugin file")
    parser.add_argument("--model-dir", default="models",
                        help="models: RobustBench's model_dir to look in (default: models)")
    parser.add_argument("--openood-dir", default="results",
                        help="models: OpenOOD v1.5's checkpoint folder to look in (default: results)")
    parser.add_argument("--data-root", help="models: the data root OpenOOD's official checkpoints are fetched into "
                                            "(default: OODBENCH_DATA, else ./data)")
    parser.add_argument("--hf-cache", metavar="DIR",
                        help="models: the Hugging Face hub cache to look in (default: the hub's, HF_HUB_CACHE)")
    _add_wide_arg(parser)
    parser.set_defaults(func=cmd_list)


def _add_wide_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wide", action="store_true",
                        help="every cell on one line (default: long cells wrapped to fit 100 columns)")


def cmd_list(args: argparse.Namespace) -> int:
    from oodbench import registry
    from oodbench.report.render import WIDTH, fit_table

    def tabulate(rows: list, headers: list[str]) -> str:
        return fit_table(rows, headers, args.wide)

    def say(paragraph: str) -> None:  # a blank line, then prose within WIDTH unless --wide
        print("\n" + (paragraph if args.wide else textwrap.fill(paragraph, WIDTH, subsequent_indent="  ")))

    if args.kind == "postprocessors":
        for line in registry.load_plugins(args.plugin, strict=False):
            print(f"warning: {line}", file=sys.stderr)
        rows = []
        for entry in registry.POSTPROCESSORS.entries():
            cls = entry.obj
            aliases = [n for n in registry.POSTPROCESSORS.names() if registry.POSTPROCESSORS.get(n) is cls and n != entry.name]
            needs = [need for need, flag in (("features", cls.needs_features), ("model gradients", cls.needs_model),
                                             ("fit", cls.needs_fit)) if flag]
            needs += [f"extras {'/'.join(cls.needs_extras)}"] if cls.needs_extras else []
            needs += ["intermediate layers"] if cls.needs_layers else []
            needs += ["every checkpoint"] if cls.needs_checkpoints else []
            needs += ["model weights"] if cls.needs_weights else []
            rows.append([cls.name or entry.name, ", ".join(aliases), entry.origin, ", ".join(needs) or "logits"])
        print(tabulate(rows, headers=["name", "aliases", "origin", "needs"]))
        from oodbench.postprocessors.compose import PERTURBATION
        from oodbench.postprocessors.shapers import SHAPERS

        print(f"\ncomposites: <shaper>+<scorer> (e.g. react+ebo, ash_s+gen), shapers {', '.join(SHAPERS)}; "
              f"{PERTURBATION}+<scorer> (ODIN's input perturbation first, e.g. odin+knn)")
    elif args.kind == "models":
        from oodbench.models.digits import BUILTIN_MODELS

        # a docstring's first paragraph, whole (its first line alone cut the openood entry at "or an")
        rows = [[entry.name, entry.origin, " ".join((entry.obj.__doc__ or "").strip().split("\n\n")[0].split())]
                for entry in registry.MODELS.entries()]
        print(tabulate(rows, headers=["source", "origin", "description"]))
        say("built-in models: " + ", ".join(BUILTIN_MODELS))
        from oodbench.models.catalog import offline_rows
        from oodbench.models.robustbench_source import zoo_listing

        print("\n" + zoo_listing())
        say("ImageNet backbones available offline here (weights found, or the path where they are expected):")
        print(tabulate(offline_rows(args.model_dir, args.openood_dir, args.hf_cache),
                       headers=["model", "options", "weights", "path"]))
        from oodbench.tasks.data import resolve_data_root
        from oodbench.models.catalog import release_rows

        say("OpenOOD v1.5's official checkpoints, by name (each seed one model; under the data root, where "
            "`oodbench data fetch` puts them):")
        print(tabulate(release_rows(resolve_data_root(args.data_root)),
                       headers=["model", "seeds", "checkpoints", "path", "get it with"]))
    elif args.kind == "datasets":
        rows = [[entry.name, ((entry.obj.__doc__ or "").strip().splitlines() or [""])[0]] for entry in registry.DATASETS.entries()]
        print(tabulate(rows, headers=["dataset source", "description"]))
    elif args.kind == "references":
        from oodbench.report.ledger import available, load_ledger

        rows = []
        for name in available():
            ledger = load_ledger(name)
            rows.append([name, len(ledger), ", ".join(dict.fromkeys(ledger.benchmark)),
                         ", ".join(sorted(set(ledger.date))), ", ".join(dict.fromkeys(ledger.table))])
        print(tabulate(rows, headers=["reference", "values", "benchmarks", "dates", "tables"]))
    else:
        from oodbench.datasets.benchmarks import load_benchmark

        rows = []
        for name in registry.BENCHMARKS.names():
            bench = load_benchmark(name)
            rows.append([name, bench.version, ", ".join(bench.near), ", ".join(bench.far), ", ".join(bench.csid)])
        print(tabulate(rows, headers=["benchmark", "version", "near-OOD", "far-OOD", "shifted ID (FS-OOD)"]))
    return 0


# ------------------------------------------------------------------------ validate


def add_validate(sub) -> None:
    parser = sub.add_parser("validate", help="check an experiment config without running it (names, values, "
                                             "model sources, checkpoint files)")
    parser.add_argument("config")
    parser.add_argument("--data-root", help="data root (overrides the config and OODBENCH_DATA)")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE")
    parser.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    from oodbench.benchmark.config import load_config
    from oodbench.benchmark.runner import check_config
    from oodbench.datasets.benchmarks import load_benchmark

    from oodbench.models.adapter import check_model, missing_checkpoint

    config = load_config(args.config, plugins=args.plugin, data_root=args.data_root)
    names = check_config(config)
    if config.attack is not None:
        from oodbench.tasks.attacks.spec import parse_attack

        parse_attack(config.attack, f"{config.source}: attack")
    for spec in config.models:  # what `run` would refuse when it loads the model
        check_model(spec)
    benchmark = load_benchmark(config.benchmark)
    missing = [line for spec in config.models if (line := missing_checkpoint(spec, Path(config.data_root)))]
    if missing:
        for line in missing[:-1]:
            print(line, file=sys.stderr)
        raise OodbenchError(missing[-1] + (f" ({len(missing)} checkpoints missing, listed above)" if len(missing) > 1 else ""))
    print(f"ok: {benchmark.name} v{benchmark.version}, {len(config.models)} model(s), "
          f"{len(names)} postprocessor(s), {len(benchmark.near)} near + {len(benchmark.far)} far OOD sets")
    return 0


# ------------------------------------------------------------------------ data


def add_data(sub) -> None:
    parser = sub.add_parser("data", help="which datasets a benchmark needs and whether they are there; downloads")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="list every dataset a benchmark needs: present/missing, sample counts")
    status.add_argument("benchmark", nargs="?", help="benchmark name or YAML (default: every registered benchmark)")
    status.add_argument("--data-root", help="data root (default: OODBENCH_DATA, else ./data)")
    _add_wide_arg(status)
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
    from oodbench.datasets.benchmarks import load_benchmark
    from oodbench.tasks.data import benchmark_status, resolve_data_root
    from oodbench.registry import BENCHMARKS
    from oodbench.report.render import WIDTH, fit_table

    root = resolve_data_root(args.data_root)
    print(f"data root: {root.resolve()}")
    for name in [args.benchmark] if args.benchmark else BENCHMARKS.names():
        benchmark = load_benchmark(name)
        rows = benchmark_status(benchmark, root)
        print(f"\n{benchmark.name} (version {benchmark.version})")
        print(fit_table([[r.split, r.dataset, r.status, "-" if r.samples is None else f"{r.samples:,}", r.detail]
                         for r in rows], ["split", "source", "status", "samples", "from / why not"], args.wide))
        absent = [r.split for r in rows if r.status != "present"]
        summary = f"{len(rows) - len(absent)} of {len(rows)} present" + (f"; not present: {', '.join(absent)}"
                                                                        if absent else "")
        print(summary if args.wide else textwrap.fill(summary, WIDTH, subsequent_indent="  "))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from oodbench.tasks.data import fetch, resolve_data_root

    root = resolve_data_root(args.data_root)
    for name in args.name:
        fetch(name, root, source_dir=Path(args.source_dir) if args.source_dir else None)
    return 0


# ------------------------------------------------------------------------ reproduce


def add_reproduce(sub) -> None:
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
    parser.add_argument("--postprocessors", type=_names, metavar="A,B",
                        help="only these methods (default: the release's methods its tables report)")
    parser.add_argument("--no-search", dest="search", action="store_false", default=None,
                        help="default hyperparameters instead of the release's search on the validation splits")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json"], default="text")
    parser.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from oodbench.tasks.reproduce import reproduce
    from oodbench.tasks.data import resolve_data_root
    from oodbench.report.seeds import seed_families

    if args.source_dir and not args.fetch:
        raise OodbenchError("--from imports archives for --fetch; add --fetch")
    results = args.results or f"results/{args.release}.sqlite"
    release, ran, labels = reproduce(
        args.release, args.table, resolve_data_root(args.data_root), fetch=args.fetch,
        source_dir=Path(args.source_dir) if args.source_dir else None, postprocessors=args.postprocessors,
        echo=lambda line: print(line, file=sys.stderr),  # status lines: stdout carries only the table
        warn=lambda line: print(f"warning: {line}", file=sys.stderr), results=results, cache_dir=args.cache_dir, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, threads=args.threads, limit=args.limit, search=args.search)
    # the table: `oodbench leaderboard` on the store, its cells of this release's models and profile, with the
    # release's published values beside them when a ledger holds them (configs/reference/<release>.csv)
    from oodbench.report.ledger import available

    reference = ["--reference", release.name] if release.name in available() else []
    tables = sorted(seed_families(ran)) if len(ran) > 1 else ran
    for benchmark in tables:
        argv = ["leaderboard", "--results", results, "--benchmark", benchmark, "--conventions", release.conventions,
                "--format", args.format, *reference, *[arg for label in labels for arg in ("--model", label)]]
        leaderboard = build_parser().parse_args(argv)
        leaderboard.func(leaderboard)
    return 0


# ------------------------------------------------------------------------ compare, calibration, report, plot

DEFAULT_PLOTS = "results/plots"


def _add_output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=DEFAULT_PLOTS, help=f"folder for the figures (default {DEFAULT_PLOTS})")


def add_compare(sub) -> None:
    parser = sub.add_parser("compare", help="robust vs standard models (by config tags): deltas, PRO gains, "
                                            "AUROC bar chart; from the results store")
    _add_common_run_args(parser)
    parser.add_argument("--fpr", choices=["classic", "openood"], help="FPR@95 convention (default: the config's)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex (compiles as pasted) or csv / json (one tidy row per number)")
    parser.add_argument("--attack", action="store_true",
                        help="also robust vs standard under the config's attack: (as `oodbench attack`; attacked "
                             "scores already cached are read, not recomputed)")
    parser.add_argument("--wide", action="store_true",
                        help="markdown: every model in one table (default: tables split to fit 100 columns)")
    _add_output_arg(parser)
    parser.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from oodbench.benchmark.config import load_config
    from oodbench.tasks.compare import comparison_results
    from oodbench.report.compare import render_comparison
    from oodbench.report.plots import auroc_bars, save_figure
    from oodbench.storage.store import ResultStore

    config = load_config(args.config, **_overrides(args))
    long = comparison_results(ResultStore(config.results, readonly=True), config, args.fpr or config.fpr)
    print(render_comparison(long, args.format, args.wide).rstrip("\n"))
    if args.attack:
        from oodbench.cli.attack import attack_comparison

        print("\n" + attack_comparison(args.config, _overrides(args), args.format))
    paths = save_figure(auroc_bars(long), args.output, f"compare_{long.attrs['benchmark']}")
    print(f"bar chart: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def add_calibration(sub) -> None:
    parser = sub.add_parser("calibration", help="accuracy, ECE, NLL and MSP AUROC under Gaussian logit noise, "
                                                "per model; from the output cache")
    _add_common_run_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--levels", type=int, default=10, help="number of noise levels s (default 10)")
    parser.add_argument("--max-level", type=float, default=2.0, help="largest s, in units of std(logits) (default 2)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex (compiles as pasted) or csv / json (one tidy row per number)")
    _add_output_arg(parser)
    parser.set_defaults(func=cmd_calibration)


def cmd_calibration(args: argparse.Namespace) -> int:
    from oodbench.tasks.calibration import experiment_calibration, noise_levels
    from oodbench.report.calibration import render_calibration
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.report.plots import calibration_figure, save_figure

    if args.levels < 1:
        raise OodbenchError("--levels must be at least 1")
    experiment = CachedExperiment.open(args.config, **_overrides(args))
    frame = experiment_calibration(experiment, noise_levels(args.levels, args.max_level), args.seed)
    if args.format in ("csv", "json"):
        from oodbench.report.tidy import calibration_tidy, render_tidy

        models = {m.display: (m.model_label, m.member or "") for m in experiment.config.models}
        print(render_tidy(calibration_tidy(frame, experiment.benchmark.name, experiment.plan.fingerprint, models),
                          args.format).rstrip("\n"))
    else:
        print(render_calibration(frame, args.format))
    stem = f"calibration_{experiment.benchmark.name}"
    paths = save_figure(calibration_figure(frame), args.output, stem)
    frame.to_csv(Path(args.output) / f"{stem}.csv", index=False)
    print(f"plot and table: {', '.join(map(str, paths))}, {Path(args.output) / f'{stem}.csv'}", file=sys.stderr)
    return 0


def add_report(sub) -> None:
    parser = sub.add_parser("report", help="operating-point report of one postprocessor: threshold keeping 95%% "
                                           "of ID validation (or --tau), then rates on test; with several models "
                                           "(e.g. one entry per head of a model, each with its 'output' option) or "
                                           "holdout_classes on the benchmark's test split, a summary row per head "
                                           "with seen/unseen accuracy")
    _add_common_run_args(parser)
    parser.add_argument("--operating-point", action="store_true", required=True, help="the operating-point report")
    parser.add_argument("--postprocessor", required=True, help="a postprocessor of the config's run")
    parser.add_argument("--tau", type=float, help="use this score threshold instead of the 95%% ID-val one")
    parser.add_argument("--model", action="append", help="only these models (repeatable; default all)")
    parser.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.tasks.operating_point import (model_operating_point, render_operating_point, render_summary, summary_frame)
    from oodbench.registry import POSTPROCESSORS

    experiment = CachedExperiment.open(args.config, **_overrides(args))
    specs = [m for m in experiment.config.models if not args.model or m.display in args.model]
    if not specs:
        raise OodbenchError(f"no model named {', '.join(args.model)} in {args.config}")
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
    _add_common_run_args(parser)
    parser.add_argument("--postprocessor", action="append", help="only these postprocessors (repeatable; default all)")
    parser.add_argument("--model", action="append", help="only these models (repeatable; default all)")
    parser.add_argument("--sort", choices=["aurc", "eaurc", "augrc", "auroc", "fpr95"], default="aurc",
                        help="rank each model's rows by this metric, best first (default aurc)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv", "json"], default="markdown",
                        help="markdown (default), latex, or csv / json (one row per cell, fractions)")
    _add_output_arg(parser)
    parser.set_defaults(func=cmd_failure)


def cmd_failure(args: argparse.Namespace) -> int:
    from oodbench.benchmark.experiment import CachedExperiment
    from oodbench.tasks.failure import experiment_failure
    from oodbench.report.failure import render_failure
    from oodbench.report.plots import risk_coverage_figure, save_figure

    experiment = CachedExperiment.open(args.config, **_overrides(args))
    frame, curves = experiment_failure(experiment, args.postprocessor, args.model)
    if args.format == "csv":
        print(frame.to_csv(index=False).rstrip("\n"))
    elif args.format == "json":
        print(frame.to_json(orient="records", double_precision=15))
    else:
        print(render_failure(frame, args.format, args.sort))
    stem = f"failure_{experiment.benchmark.name}"
    title = f"{experiment.benchmark.name}: selective classification on ID test per postprocessor"
    paths = save_figure(risk_coverage_figure(curves, title), args.output, stem)
    frame.to_csv(Path(args.output) / f"{stem}.csv", index=False)
    print(f"plot and table: {', '.join(map(str, paths))}, {Path(args.output) / f'{stem}.csv'}", file=sys.stderr)
    return 0


PLOT_KINDS = ("hist", "pro-shift", "landscape", "features", "tradeoff")  # the kinds of report.plots.build_plot


def add_plot(sub) -> None:
    parser = sub.add_parser("plot", help="figures (PNG + PDF) from the store and the output cache: "
                                         + ", ".join(PLOT_KINDS))
    parser.add_argument("kind", choices=PLOT_KINDS, help="hist: score histograms ID vs OOD; pro-shift: MSP change "
                        "after one PRO step; landscape: score on two random input directions; features: 2-D "
                        "projection of penultimate features; tradeoff: near-OOD FPR@95 against AUROC per method, "
                        "marker by method family (from the store)")
    _add_common_run_args(parser)
    _add_output_arg(parser)
    parser.add_argument("--postprocessor", default="msp", help="score for hist and landscape (default msp)")
    parser.add_argument("--eps", type=float, default=1e-3, help="pro-shift step size in [0,1] pixels (default 1e-3)")
    parser.add_argument("--samples", type=at_least(1), default=500, help="images per set for pro-shift and features")
    parser.add_argument("--seed", type=int, default=0)
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

    experiment = CachedExperiment.open(args.config, **_overrides(args))
    figure, stem = build_plot(args.kind, experiment, postprocessor=args.postprocessor, eps=args.eps,
                              samples=args.samples, seed=args.seed, index=args.index, radius=args.radius,
                              steps=args.steps, projection=args.projection, fpr=args.fpr)
    print("\n".join(map(str, save_figure(figure, args.output, stem))))
    return 0


# ------------------------------------------------------------------------ main

def add_attack(sub) -> None:
    from oodbench.cli.attack import add_attack as add

    add(sub, _add_common_run_args, _overrides, _names)


COMMANDS: list[Callable] = [add_run, add_leaderboard, add_reproduce, add_results, add_list, add_validate, add_data,
                            add_compare, add_calibration, add_report, add_failure, add_plot, add_attack]


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (argparse reports a bad one as a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error, with where to find the usage."""

    def error(self, message: str):
        self.exit(2, f"oodbench: error: {message} (`{self.prog} --help` shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    import oodbench

    parser = _Parser(prog="oodbench", description="OOD detection benchmarks for image classifiers.")
    parser.add_argument("--version", action="version", version=f"oodbench {oodbench.__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the whole traceback of any error, and of each failed cell (also: OODBENCH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr if file is None else file)  # on its own line, above bars


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so the same
    clean-up runs on the way out: an open store transaction rolls back, a local Ray
    instance shuts down."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends it at once
    raise Terminated


STOPPED = {KeyboardInterrupt: ("interrupted", 130), Terminated: ("terminated", 143)}  # 128 + signal number


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _warning_line
    # oodbench's own warnings are for the user; libraries' deprecation notices are not
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"oodbench(\.|$)")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["OODBENCH_DEBUG"] = "1"  # also read by the jobs (a failed cell's traceback), in any process
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except OodbenchError as exc:
        return _error(str(exc), exc)
    except (KeyboardInterrupt, Terminated) as exc:
        _close_progress_bars()
        word, code = STOPPED[type(exc)]
        print(f"oodbench: {word}; rerun the same command to resume", file=sys.stderr)
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine's, not the user's input: disk full, permission denied...
        return _error(os_error_line(exc), exc)
    finally:
        if previous is not None:  # main() called from Python leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, previous)


def _close_progress_bars() -> None:
    """End the progress bars a failed command left drawn, so nothing is printed after its error line."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _error(message: str, exc: BaseException) -> int:
    _close_progress_bars()
    if debugging():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"oodbench: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
