"""The `oodbench` console script: one subcommand per user task, each in the module of its
command group (`oodbench.cli.run`, `.leaderboard`, ...: its `add_parser` and a handler that
reads the arguments and calls the library); the options several commands share are in
`oodbench.cli.common`. Building the parser imports nothing heavy: each handler imports what
it uses.

Errors a user can cause (`OodbenchError`) end in one line on stderr and exit code 2;
``--debug`` (or ``OODBENCH_DEBUG=1``) prints the whole traceback above that line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from typing import Callable

from oodbench.cli import attack, compare, data, leaderboard, listing, plot, reproduce, run, tasks, validate
from oodbench.errors import OodbenchError, debugging, os_error_line

# in the order `oodbench --help` lists them
COMMANDS: list[Callable] = [run.add_parser, leaderboard.add_parser, reproduce.add_parser, leaderboard.add_results,
                            listing.add_parser, validate.add_parser, data.add_parser, compare.add_parser,
                            tasks.add_parser, plot.add_parser, attack.add_parser]


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
