"""Options and helpers shared by the command modules: the options of every command that reads a
config (store, cache, data root, device, `--limit`...), the table options, argparse types, and
writing an output file or a figure with one readable line when it cannot be written.

Only argparse and the standard library are imported here: building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from oodbench.errors import OodbenchError, os_error_line

DEFAULT_STORE = "results/oodbench.sqlite"
DEFAULT_PLOTS = "results/plots"


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The config and the options `overrides` passes on to `load_config` / `CachedExperiment.open`."""
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
                             "calibration, failure, report, plot) read the run made with the same --limit")


def overrides(args: argparse.Namespace) -> dict:
    """The options of `add_run_options` as keyword arguments over the config's values."""
    return {"plugins": args.plugin, "results": args.results, "data_root": args.data_root,
            "cache_dir": args.cache_dir, "device": args.device, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "limit": args.limit,
            "trust_checkpoint": args.trust_checkpoint, "verify_data": args.verify_data}


def add_table_options(parser: argparse.ArgumentParser, page: bool = False) -> None:
    """How `run` and `leaderboard` print the leaderboard (`page`: also ``--format html``)."""
    page_help = ("; html: one self-contained page (sortable tables, the comparison, figures) written to --output, "
                 "by default tables/<benchmark>/leaderboard.html beside the store")
    parser.add_argument("--format", choices=["text", "markdown", "latex", "csv", "json", *(["html"] if page else [])],
                        default="text", help="text (default: the compact table, 100 columns), markdown, latex "
                        "(compiles as pasted; booktabs), csv or json (one tidy row per number)"
                        + (page_help if page else ""))
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


def add_wide_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wide", action="store_true",
                        help="every cell on one line (default: long cells wrapped to fit 100 columns)")


def add_figure_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="folder for the figures (default: plots/ beside the results store, "
                                         f"{DEFAULT_PLOTS} for the default store; the HTML page shows them from there)")


def figure_folder(args: argparse.Namespace, results: str | Path) -> Path:
    """Where a command's figures go: --output, else ``plots/`` beside the results store, where
    `leaderboard --format html` looks for them."""
    return Path(args.output) if args.output else Path(results).expanduser().parent / "plots"


def names(text: str) -> list[str]:
    """An argparse type: a comma-separated list of names (``a,b``), at least one."""
    found = [name.strip() for name in text.split(",") if name.strip()]
    if not found:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return found


def name_filter(parser: argparse.ArgumentParser, plural: str, help: str) -> None:
    """A filter by name with one spelling on every command: ``--postprocessors a,b``, or the
    option repeated, singular or plural (``--postprocessor a --postprocessor b``); the names
    land in ``args.<plural>`` (None when not given)."""
    parser.add_argument(f"--{plural}", f"--{plural[:-1]}", dest=plural, type=names, action="extend",
                        metavar="A,B", help=f"{help} (comma-separated, or the option repeated)")


class Once(argparse.Action):
    """An option that names one thing (``--postprocessor`` of report and plot): given twice it
    is an error, not the last one silently kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} names one {self.dest}; given twice (a filter of several is "
                         f"--{self.dest}s a,b on leaderboard, failure, run, attack and reproduce)")
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


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


def write_output(path: str, text: str) -> None:
    """Write an --output file, or one line saying why not (a missing folder is named as such)."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise OodbenchError(f"cannot write {target}: its folder {target.parent} does not exist (create it first)")
    try:
        target.write_text(text)
    except OSError as exc:
        raise OodbenchError(f"cannot write {target}: {os_error_line(exc)}") from None


def save_figure_and_table(figure, frame, folder: str, stem: str) -> None:
    """`figure` (PNG + PDF) and `frame` (CSV) as ``folder/stem.*``, and where they went on stderr."""
    from oodbench.report.plots import save_figure

    paths = save_figure(figure, folder, stem)
    table = Path(folder) / f"{stem}.csv"
    frame.to_csv(table, index=False)
    print(f"plot and table: {', '.join(map(str, paths))}, {table}", file=sys.stderr)
