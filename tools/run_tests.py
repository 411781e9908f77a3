#!/usr/bin/env python
"""The project's test run (`make test`): clean/export check, every notebook, then pytest.

Ends with one line, `N passed, N failed`, counting notebooks and pytest tests.
"""
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(cmd, **kwargs):
    """Run `cmd` in the repo root, echoing its output; return (returncode, output)."""
    print(f"$ {' '.join(map(str, cmd))}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    print(proc.stdout, end="", flush=True)
    return proc.returncode, proc.stdout


def tree_state():
    """A fingerprint of uncommitted changes under nbs/ and dlcourse/ (None outside a git checkout)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--", "nbs", "dlcourse"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    diff = subprocess.run(["git", "diff", "--", "nbs", "dlcourse"], cwd=ROOT, capture_output=True, text=True).stdout
    untracked = sorted(line for line in proc.stdout.splitlines() if line.startswith("??"))
    return hashlib.md5((diff + "\n".join(untracked)).encode()).hexdigest(), proc.stdout


def check_clean_and_exported():
    """True when nbdev_clean and nbdev_export change no file."""
    before = tree_state()
    if before is None:
        print("not a git checkout: skipping the clean/export check")
        return True
    for tool in ("nbdev_clean", "nbdev_export"):
        code, _ = run([BIN / tool])
        if code != 0:
            return False
    after = tree_state()
    if after[0] != before[0]:
        print("FAILED: nbdev_clean / nbdev_export changed files; run `make export` and commit the result:")
        print(after[1])
        return False
    print("clean/export check: no file changed")
    return True


def notebooks():
    """The notebooks nbdev_test runs (it skips names starting with '_' or '.')."""
    return sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith(("_", ".")))


def local_mirror_present():
    """True when this project's imagenette2-128 mirror is in a DLCOURSE_DATA folder (the `local_data` cells need it)."""
    folders = [Path(p) for p in os.environ.get("DLCOURSE_DATA", "").split(os.pathsep) if p.strip()]
    return any((f / "imagenette2-128.tgz").is_file() or (f / "imagenette2-128").is_dir() for f in folders)


def run_notebooks():
    """Run nbdev_test on every notebook; return (passed, failed) counts."""
    nbs = notebooks()
    start = time.time()
    # Notebooks run two at a time; one torch thread each keeps them from fighting over the cores
    # (on a 2-core machine, 2 x 2 threads made some notebooks 10x slower).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    flags = ["--flags", "local_data"] if local_mirror_present() else []
    print("cells flagged local_data:", "run (the imagenette2-128 mirror was found)" if flags else "skipped (no mirror)")
    code, out = run([BIN / "nbdev_test", "--n_workers", str(min(2, os.cpu_count() or 1)), "--timing", *flags], env=env)
    print(f"nbdev_test: {len(nbs)} notebooks in {time.time() - start:.1f}s")
    failed = set(re.findall(r"^\t(\S+\.ipynb)\s*$", out, flags=re.M))
    if code != 0 and not failed:  # nbdev_test failed before naming a notebook: count them all as failed
        failed = {p.name for p in nbs}
    failed_names = {Path(f).name for f in failed}
    return len(nbs) - len(failed_names), len(failed_names)


def run_pytest():
    """Run pytest on tests/; return (passed, failed) counts from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        code, _ = run([sys.executable, "-m", "pytest", "tests", "-q", f"--junitxml={report}"])
        if not report.exists():
            return 0, 1
        suites = ET.parse(report).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        total = sum(int(s.get("tests", 0)) for s in suites)
        bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
        skipped = sum(int(s.get("skipped", 0)) for s in suites)
        if code not in (0, 5) and bad == 0:  # pytest itself failed (5 = no tests collected)
            bad = 1
        return total - bad - skipped, bad


def main():
    clean_ok = check_clean_and_exported()
    nb_pass, nb_fail = run_notebooks()
    py_pass, py_fail = run_pytest()
    print(f"notebooks: {nb_pass} passed, {nb_fail} failed; pytest: {py_pass} passed, {py_fail} failed; "
          f"clean/export check: {'ok' if clean_ok else 'FAILED'}")
    passed, failed = nb_pass + py_pass, nb_fail + py_fail + (0 if clean_ok else 1)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
