#!/usr/bin/env python
"""Run nbdev's docs processing (what `nbdev_docs` and `nbdev_readme` do before Quarto) on every notebook, one at a time.

nbdev executes, for the docs, the exported cells and every cell holding an import. A cell that mixes an import with
code using an earlier cell's variables fails there, although it passes `nbdev_test`. Prints one line per notebook and
ends with `N passed, N failed`. Quarto itself is not needed."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """import os, sys, tempfile
from pathlib import Path
from nbdev.serve import _proc_file
import nbdev.serve_drv
os.chdir(sys.argv[1])
with tempfile.TemporaryDirectory() as out:
    nbdev.serve_drv.main(_proc_file(Path(sys.argv[2]), Path(out), Path('.')))
"""


def main(names):
    nbs = names or sorted(p.name for p in (ROOT / "nbs").glob("*.ipynb"))
    failed = 0
    for name in nbs:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "nbs"), name], capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
        ok = proc.returncode == 0 and "Exception: Error" not in proc.stderr
        failed += not ok
        print(f"{'ok    ' if ok else 'FAILED'} {name}", flush=True)
        if not ok:
            print(proc.stderr[-2000:])
    print(f"{len(nbs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
