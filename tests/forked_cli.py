"""`python -m oodbench ARGS` for the tests, without paying Python's and torch's start-up for
every command (about 3 CPU seconds each, most of the suite's time).

A helper process (a zygote) imports the heavy third-party modules once, never runs a torch
operation, and forks a child per command; idle zygotes are reused by later commands, from any
thread. The child is a fresh process of its own as far as a command can tell: its own
working directory, exactly the given environment (``PYTHONPATH`` entries added to
``sys.path``, as a new interpreter would), stdin from /dev/null, stdout and stderr to files,
its own process group, ``oodbench`` imported anew, atexit handlers run, and its exit status
passed back. A command that runs past its timeout
is killed with its process group, and `subprocess.TimeoutExpired` raised as
`subprocess.run` would. `start` gives a test that signals the command, or watches its
stderr, the child's pid while it runs. Tests that check what a fresh interpreter imports
keep starting real interpreters.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Modules oodbench imports on most commands; none reads the environment when imported in a
# way a command could observe, and none starts threads.
PRELOAD = ("torch", "numpy", "yaml", "PIL.Image", "tqdm", "pandas", "sqlite3", "scipy.special", "scipy.stats",
           "scipy.optimize", "sklearn.datasets", "sklearn.metrics", "skimage.io")

# A command's torch starts with one thread (a user's starts with one per core): the suite's
# commands run small networks, where a second thread costs CPU for no time, and the machine's
# other core is busy with the rest of the suite. `--threads` / `threads:` still set it (the
# thread count never changes a number: README, "--threads").
THREADS = 1

ZYGOTE = r"""
import json, os, signal, sys, time
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
requests, replies = sys.stdin, sys.stdout
start_path = list(sys.path)


def child(request):
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [start_path[0], *extra, *start_path[1:]]
    import torch
    torch.set_num_threads(request["threads"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(stdin, 0), os.dup2(out, 1), os.dup2(err, 2)
    code = 0
    try:
        sys.argv = ["oodbench", *request["args"]]
        if request["prelude"]:
            exec(compile(request["prelude"], "<prelude>", "exec"), {"__name__": "__prelude__"})
        import runpy
        runpy.run_module("oodbench", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    try:
        import atexit
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    if request["started"]:  # the caller signals the child: it needs the pid now
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
    deadline = time.monotonic() + request["timeout"]
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            status = 0
            break
        time.sleep(0.01)
    try:  # what the command left running in its group (workers) goes with it
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    code = os.waitstatus_to_exitcode(status) if not timed_out else None
    replies.write(json.dumps({"code": code, "timed_out": timed_out}) + "\n")
    replies.flush()
"""


class ForkedCli:
    """Runs oodbench commands in children of preloaded zygote processes. A zygote serves one
    command at a time; idle ones are reused by any thread, so tests that run several commands
    at once (from a thread pool) start only as many zygotes as they run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[subprocess.Popen] = []
        self._zygotes: list[subprocess.Popen] = []
        self._commands = itertools.count()
        self._scratch = Path(tempfile.mkdtemp(prefix="oodbench-cli-"))
        atexit.register(self.close)

    def _acquire(self) -> subprocess.Popen:
        with self._lock:
            while self._idle:
                zygote = self._idle.pop()
                if zygote.poll() is None:
                    return zygote
            zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, *PRELOAD], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=self._scratch)
            self._zygotes.append(zygote)
            return zygote

    def _release(self, zygote: subprocess.Popen) -> None:
        with self._lock:
            self._idle.append(zygote)

    def _send(self, args, cwd: Path, env: dict | None, timeout: float, prelude: str,
              started: bool) -> tuple[subprocess.Popen, Path, Path]:
        zygote = self._acquire()
        number = next(self._commands)
        out, err = (self._scratch / f"{number}.{stream}" for stream in ("stdout", "stderr"))
        request = {"args": [str(a) for a in args], "cwd": str(cwd), "env": dict(os.environ if env is None else env),
                   "out": str(out), "err": str(err), "timeout": timeout, "prelude": prelude, "started": started,
                   "threads": THREADS}
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        return zygote, out, err

    def start(self, args, cwd: Path, env: dict | None = None, timeout: float = 600,
              prelude: str = "") -> ForkedProcess:
        """Like ``subprocess.Popen([python, "-m", "oodbench", *args])``, for a test that signals the
        command or watches its stderr while it runs."""
        zygote, out, err = self._send(args, cwd, env, timeout, prelude, started=True)
        pid = json.loads(zygote.stdout.readline())["pid"]
        return ForkedProcess(self, zygote, pid, out, err, [sys.executable, "-m", "oodbench", *map(str, args)])

    def run(self, args, cwd: Path, env: dict | None = None, timeout: float = 600,
            prelude: str = "") -> subprocess.CompletedProcess:
        """Like ``subprocess.run([python, "-m", "oodbench", *args], capture_output=True, text=True)``."""
        zygote, out, err = self._send(args, cwd, env, timeout, prelude, started=False)
        reply = json.loads(zygote.stdout.readline())
        self._release(zygote)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink(), err.unlink()
        command = [sys.executable, "-m", "oodbench", *map(str, args)]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(command, reply["code"], stdout, stderr)

    def close(self) -> None:
        for zygote in self._zygotes:
            if zygote.poll() is None:
                zygote.stdin.close()
                zygote.wait(timeout=30)


class ForkedProcess:
    """A command started by `ForkedCli.start`: the part of `subprocess.Popen` the tests use
    (``pid``, ``args``, ``poll``, ``wait``, ``send_signal``, ``returncode``), with stdout and
    stderr in files (``stderr_text()`` reads what the command has written so far)."""

    def __init__(self, cli: ForkedCli, zygote: subprocess.Popen, pid: int, out: Path, err: Path,
                 args: list[str]) -> None:
        self.pid, self.args, self._out, self._err = pid, args, out, err
        self.returncode: int | None = None
        self._reply: dict = {}

        def finished() -> None:
            self._reply.update(json.loads(zygote.stdout.readline()))
            cli._release(zygote)

        self._waiter = threading.Thread(target=finished, daemon=True)
        self._waiter.start()

    def poll(self) -> int | None:
        if self.returncode is None and not self._waiter.is_alive():
            self.returncode = self._reply["code"] if not self._reply["timed_out"] else -9
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._waiter.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def stderr_text(self) -> str:
        return self._err.read_text(errors="replace") if self._err.exists() else ""

    def stdout_text(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""


FORKED = ForkedCli()
