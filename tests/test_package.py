"""What a notebook cannot hold well: fresh-interpreter imports, the terminal progress bar, the demo script."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, fashion_mnist_available

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not in DLCOURSE_DATA")


def _modules():
    """Every module of the package, from the files nbdev exported."""
    from conftest import ROOT
    return sorted(f"dlcourse.{p.stem}" for p in (ROOT / "dlcourse").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("module", _modules())
def test_import_is_light(run_py, module):
    """Importing any module must not pull in matplotlib, IPython or the dev-only fastcore/nbdev (heavy or optional
    imports belong inside the functions that need them), and must work with the runtime requirements alone."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('matplotlib', 'IPython', 'fastcore', 'nbdev') if m in sys.modules))")
    proc = run_py("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version_matches_settings():
    import configparser
    from conftest import ROOT
    import dlcourse
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    assert dlcourse.__version__ == cfg["DEFAULT"]["version"]


TINY_FIT = """
import torch
from torch import nn
from torch.utils.data import TensorDataset
from dlcourse.learner import DataLoaders, Learner, accuracy
torch.manual_seed(0)
x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
dls = DataLoaders.from_datasets(TensorDataset(x, y), TensorDataset(x, y), bs=16)
Learner(nn.Linear(3, 2), dls, metrics=[accuracy], progress={progress}).fit(2)
"""


def run_on_terminal(code:str, timeout:float=120) -> tuple[int, str, str]:
    """Run `python -c code` with stderr on a pseudo-terminal (as in an interactive shell); (returncode, stdout, stderr)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    main_fd, term_fd = pty.openpty()
    fcntl.ioctl(term_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=term_fd,
                            env={**os.environ, "TQDM_DISABLE": ""})
    os.close(term_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(main_fd, 4096)
                except OSError:  # the terminal closed: the process ended
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        stdout = proc.communicate(timeout=max(1, deadline - time.monotonic()))[0]
    finally:
        proc.kill()
        os.close(main_fd)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_terminal_progress_bar_and_table():
    """On a terminal the bars go to stderr and the epoch table to stdout, one header and one row per epoch."""
    returncode, stdout, stderr = run_on_terminal(TINY_FIT.format(progress=True))
    assert returncode == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "1"]
    assert "epoch 0 of 0-1 train" in stderr and "epoch 1 of 0-1 train" in stderr and "it/s" in stderr


def test_no_bars_when_stderr_is_not_a_terminal(run_py):
    """Redirected to a file or a pipe (a CI log), stderr gets no bars, only the table goes to stdout."""
    proc = run_py("-c", TINY_FIT.format(progress=True), env={"TQDM_DISABLE": ""})
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 3
    assert proc.stderr == ""


def test_progress_off_prints_nothing(run_py):
    proc = run_py("-c", TINY_FIT.format(progress=False))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


@needs_fmnist
def test_demo_script(run_py, tmp_path):
    """The demo (what `make demo` runs) trains on real data and saves a loss plot and results."""
    proc = run_py("examples/train_fashion_mnist.py", "--epochs", "1", "--n-train", "6000", "--no-progress",
                  "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    history = json.loads((tmp_path / "results.json").read_text())
    assert len(history) == 1 and history[0]["accuracy"] > 0.75
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _notebooks():
    from conftest import ROOT
    return sorted((ROOT / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_metadata(path):
    """Every notebook names its kernel (JupyterLab opens it without a "Select Kernel" dialog) and carries no saved widget
    state (progress-bar widgets are stale the moment the notebook is saved)."""
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb["metadata"]
    widget_outputs = [c["id"] for c in nb["cells"] for o in c.get("outputs", [])
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget_outputs == []


def test_notebooks_limit_threads_only_under_test():
    """A reader's kernel keeps all its cores: notebooks cut torch to one thread only when nbdev_test runs them."""
    import re
    for path in _notebooks():
        for cell in json.loads(path.read_text())["cells"]:
            src = "".join(cell["source"])
            for match in re.finditer(r"^( *)torch\.set_num_threads\(", src, flags=re.M):
                before = src[:match.start()]
                guarded = bool(match.group(1)) and ("IN_TEST" in before or "def " in before)
                assert guarded, f"{path.name} cell {cell['id']}: torch.set_num_threads outside an IN_TEST guard or function"
