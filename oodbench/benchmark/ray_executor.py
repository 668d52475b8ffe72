"""Runs the runner's jobs as Ray tasks, on a local Ray instance or an existing cluster.

Install with ``pip install 'oodbench[ray]'``. Each job (an output extraction per model and
dataset split, a scoring cell per model and postprocessor) becomes one Ray task asking
for the job's ``resources``: a GPU when its model runs on CUDA, one CPU otherwise, so
output-based scoring fans out over CPUs while extraction and input-gradient methods take
the GPUs. Results come back to the driver, which alone writes the results store; tasks
share the output cache through the filesystem (on a cluster it must be a shared folder)
and write it with an atomic rename, so no task reads a half-written entry. Tasks read
entries memory-mapped (`oodbench.storage.entries`): the tasks of one node that read the
same split (every cell fitted on the ImageNet train split) share its pages in the page
cache instead of each holding a copy, and a cell whose fit state is cached does not read
the fit split at all.

A task whose worker process dies (killed, out of memory, node lost) is retried by Ray up
to ``max_retries`` times; an exception raised by the job itself is a real failure, not
retried, and comes back to the runner like the local executor's.

Starting or joining Ray is bounded: Ray itself retries an unreachable cluster for many
minutes and waits long for a local instance that does not come up. An address nothing
listens at fails at once, and a start or join that takes longer than
``OODBENCH_RAY_TIMEOUT`` seconds (default 25) is given up; each is one line. The SIGTERM
handlers ``ray.init`` installs are replaced by the caller's own after the start, so the
CLI's (roll back the open transaction, shut the local instance down, exit 143) applies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from oodbench.errors import OodbenchError, debugging

INSTALL_HINT = "the ray executor needs Ray, an optional extra: pip install 'oodbench[ray]'"
# Read by Ray at import: a local instance then keeps every service on 127.0.0.1.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEFAULT_START_TIMEOUT = 25.0
PROBE_TIMEOUT = 5.0  # seconds to wait for a TCP connection to a cluster's address


class WorkerLost(Exception):
    """A task's worker died on every attempt Ray was allowed."""


class StartTimedOut(BaseException):
    """Raised inside ``ray.init`` by the alarm that bounds it; a BaseException because Ray's
    connection loops retry on any Exception."""


def start_timeout() -> float:
    """Seconds to wait for Ray to start or a cluster to answer: OODBENCH_RAY_TIMEOUT, default 25."""
    value = os.environ.get("OODBENCH_RAY_TIMEOUT", str(DEFAULT_START_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise OodbenchError(f"OODBENCH_RAY_TIMEOUT must be a number of seconds > 0, got {value!r}")
    return seconds


def check_reachable(address: str) -> None:
    """One line when nothing accepts connections at a cluster's host:port (Ray would retry it
    for many minutes). ``auto`` is resolved by Ray itself and not checked here."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise OodbenchError(f"--ray-address {address!r} must be host:port (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OodbenchError(f"cannot reach the Ray cluster at {address}: {reason} (is its head node "
                            "running, and is this its address?)") from None


@contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Raise `StartTimedOut` in the block after `seconds`, and every second after that until it
    ends (SIGALRM: in the main thread only; elsewhere the block is not bounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        if frame is not None and frame.f_code.co_filename.endswith(("logging/__init__.py", "threading.py")):
            return  # never inside a lock's release (Python reports that as "Exception ignored"); the next tick raises
        raise StartTimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def without_native_logs(enabled: bool) -> Iterator[None]:
    """Send file descriptor 2 to a scratch file for the block: Ray's C++ core writes each failed
    attempt to reach a cluster there (a dozen log lines before its own timeout), and the join's
    outcome is reported in one line instead. Off with --debug, and for a local start (whose
    daemons inherit the descriptor for their lifetime)."""
    if not enabled or debugging():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def keeping_sigterm_handler() -> Iterator[None]:
    """``ray.init`` installs its own SIGTERM handlers (clean up and exit at once); put back the
    caller's own Python handler, if it has one (the CLI's). Without one, Ray's stay."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def import_ray(local: bool):
    """Ray, or one line on how to install it; `local` keeps a new local instance on loopback."""
    if local:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise OodbenchError(INSTALL_HINT) from None
    return ray


def run_job(job) -> Any:
    """The task body: the job's result, or the exception it raised (returned, not retried)."""
    try:
        return job.run()
    except Exception as exc:
        return exc


class RayExecutor:
    """Submits every job as a Ray task and yields results as tasks finish.

    ``address``: join this cluster (``"auto"``: the one this node belongs to); none starts
    a local instance with ``num_cpus`` CPUs (default: all), loopback only, shut down by
    ``close``. When Ray is already initialised in this process, that instance is used.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 3):
        self.ray = import_ray(local=address is None)
        self.max_retries = max_retries
        self.owns_instance = not self.ray.is_initialized()
        if self.owns_instance:
            self._start(address, num_cpus)
        self.task = self.ray.remote(run_job)

    def _start(self, address: str | None, num_cpus: int | None) -> None:
        """Start a local instance or join `address`, within `start_timeout`, or fail in one line."""
        timeout = start_timeout()
        what = "the local Ray instance did not start" if address is None else f"cannot join the Ray cluster at {address}"
        if address is not None:
            check_reachable(address)
        try:
            # ERROR: Ray's start-up notices (token authentication...) would add lines to every run
            with keeping_sigterm_handler(), bounded(timeout), without_native_logs(address is not None):
                if address is None:
                    self.ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.ERROR)
                else:
                    self.ray.init(address=address, logging_level=logging.ERROR)
        except StartTimedOut:
            self._abandon()
            raise OodbenchError(f"{what} within {timeout:g} s (set OODBENCH_RAY_TIMEOUT to wait longer)") from None
        except Exception as exc:  # Ray's own failure to start or connect, often many lines
            self._abandon()
            raise OodbenchError(f"{what}: {_first_line(exc)}") from None

    def _abandon(self) -> None:
        """Stop what a failed start left running (a local instance's processes)."""
        try:
            self.ray.shutdown()
        except Exception:  # best effort: Ray's exit hook kills a local instance's processes too
            pass

    def map(self, jobs: Iterable[Any], desc: str) -> Iterator[tuple[Any, Any]]:
        pending = {}
        for job in jobs:
            resources = getattr(job, "resources", {"num_cpus": 1})
            options = {"num_cpus": 1, **resources, "max_retries": self.max_retries, "name": job.label}
            pending[self.task.options(**options).remote(job)] = job
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), self._result(ref)

    def _result(self, ref) -> Any:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:  # the job's exception could not travel back as a value
            return exc.cause if isinstance(exc.cause, Exception) else RuntimeError(_first_line(exc))
        except exceptions.RayError as exc:
            return WorkerLost(f"{type(exc).__name__} on each of {self.max_retries + 1} attempts: {_first_line(exc)}")

    def close(self) -> None:
        if self.owns_instance and self.ray.is_initialized():
            self.ray.shutdown()


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
