"""Shared pytest helpers: the repo root, a subprocess runner, the command line in a subprocess and its one-line errors,
a module's image cache, free ports, ending launches."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_py():
    """Run `python -c code` (or a script with args) in a fresh interpreter; return the CompletedProcess."""
    def run(*args, timeout=300, env=None):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=full_env)
    return run


def fashion_mnist_available():
    """True when Fashion-MNIST can be found through DLCOURSE_DATA."""
    from dlcourse.core import find_data
    try:
        find_data("fashion-mnist")
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One image cache for a module's runs, away from the user's own."""
    return tmp_path_factory.mktemp("cache")


def run_cli(args, cwd, cache, code=None, timeout=300, env=None, umask=None):
    """`python -m dlcourse ARGS` (or `python -c code ARGS`) in `cwd`: one torch thread, a private cache, no tracebacks
    (DLCOURSE_DEBUG unset), and the umask `umask` when given."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DLCOURSE_CACHE": str(cache), "DLCOURSE_DEBUG": "", **(env or {})}
    start = ["-c", code] if code else ["-m", "dlcourse"]
    return subprocess.run([sys.executable, *start, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, preexec_fn=None if umask is None else lambda: os.umask(umask))


@pytest.fixture
def dlcourse(tmp_path, cache):
    """Run the command line in the test's own folder (see `run_cli`); return the CompletedProcess."""
    def run(*args, **kwargs):
        return run_cli(args, tmp_path, cache, **kwargs)
    return run


def assert_one_line_error(proc, status, *words) -> str:
    """The process failed with `status` and a single stderr line that contains `words`, and no traceback; the line."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a torchrun rendezvous or master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid:int) -> list[int]:
    """Every process below `pid`, read from /proc (children of children included)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the process ended meanwhile
                continue
            found += children
            todo += children
    return found


def kill_launch(proc:subprocess.Popen):
    """End a launch started with `start_new_session=True` and everything below it, stopped processes too: torchrun
    starts its workers in sessions of their own, so killing the launch's process group alone would orphan them."""
    below = descendants(proc.pid)  # before the launcher dies and its workers are handed to init
    for sig in (signal.SIGCONT, signal.SIGKILL):
        for kill, pid in [(os.killpg, proc.pid), *((os.kill, p) for p in below)]:
            try:
                kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
