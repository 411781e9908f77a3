"""Shared pytest helpers: the repo root and a subprocess runner with the project's environment."""
import os
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
