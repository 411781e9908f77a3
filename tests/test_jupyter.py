"""Notebooks in a real Jupyter kernel (tools/run_jupyter.py, what `make test-jupyter` runs): which cells and notebooks
it skips (those nbdev_test skips, held to nbdev's own reading of the directives and front matter; tools/run_cells.py
skips by the same functions), that it really uses an ipykernel in the notebook's folder, how it reports a failure, and
the fastest notebooks."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT, fashion_mnist_available

TOOL = ROOT / "tools" / "run_jupyter.py"
spec = importlib.util.spec_from_file_location("run_jupyter", TOOL)
run_jupyter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_jupyter)
FLAGS = {"notest", "slow", "cuda"}


def code(source:str) -> dict:
    return {"cell_type": "code", "source": source}


def test_directives_are_the_leading_lines():
    source = "#| slow\n#|eval: false\n\n# | export\nx = 1\n#| cuda\n"
    assert run_jupyter.directives(source) == {"slow": "", "eval": "false", "export": ""}


def test_skipped_cells_are_the_ones_nbdev_test_skips():
    for source in ["#| slow\nfit()", "#| cuda\nfit()", "#| notest\nfit()", "#| eval: false\nfit()",
                   "#| hide\nimport nbdev; nbdev.nbdev_export()"]:
        assert run_jupyter.skip_cell(code(source), FLAGS), source
    for source in ["#| export\ndef f(): pass", "fit()  #| slow is not a directive here", "x = 1\n#| slow"]:
        assert not run_jupyter.skip_cell(code(source), FLAGS), source
    assert not run_jupyter.skip_cell(code("#| slow\nfit()"), FLAGS - {"slow"})  # --flags slow runs them
    assert not run_jupyter.skip_cell({"cell_type": "markdown", "source": "#| slow"}, FLAGS)


EDGE_CELLS = ["#| slow\nx = 1", "# | slow\nx = 1", "#|slow\nx = 1", "\n#| cuda\nx = 1", "#| eval: False\nx = 1",
              "#|eval:false\nx = 1", "#| export\n#| notest\nx = 1", "x = 1\n#| slow", "#| hide\nnbdev_export()",
              "#| cuda local_data\nx = 1", "#| local_data\nx = 1", "#| eval: true\nx = 1"]


def test_selection_matches_nbdev(tmp_path):
    """Each code cell of every notebook, and of a notebook of edge cases, is skipped exactly when nbdev_test skips it,
    for several sets of flags (nbdev parsing the directives); a notebook whose front matter says `skip_exec: true` is
    skipped whole by both."""
    pytest.importorskip("nbdev")
    from fastcore.basics import str2bool
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    flags = run_jupyter.settings_flags()
    edge = write_nb(tmp_path / "edge.ipynb", *EDGE_CELLS)
    skipped = nbformat.read(write_nb(tmp_path / "skipped.ipynb", "x = 1"), as_version=4)
    skipped.cells.insert(0, nbformat.v4.new_raw_cell("---\ntitle: skipped\nskip_exec: true\n---"))
    nbformat.write(skipped, tmp_path / "skipped.ipynb")
    paths = [*sorted((ROOT / "nbs").glob("*.ipynb")), edge, tmp_path / "skipped.ipynb"]
    for path in paths:
        theirs_nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
        ours_nb = nbformat.read(path, as_version=4)
        nbdev_skips = str2bool(getattr(theirs_nb, "frontmatter_", {}).get("skip_exec", False))
        assert run_jupyter.skip_notebook(ours_nb) == nbdev_skips == (path.name == "skipped.ipynb"), path.name
        for run_flags in (set(), {"cuda"}, {"cuda", "local_data"}, {"slow"}):
            theirs = []
            for cell in (c for c in theirs_nb.cells if c.cell_type == "code"):
                found = getattr(cell, "directives_", {}) or {}
                theirs.append("nbdev_export(" in cell.source or found.get("eval:", [""])[0].lower() == "false"
                              or bool((flags - run_flags) & found.keys()))
            ours = [run_jupyter.skip_cell(c, flags - run_flags) for c in ours_nb.cells if c.cell_type == "code"]
            assert ours == theirs, (path.name, run_flags)


def test_flags_come_from_settings():
    import configparser
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    assert run_jupyter.settings_flags() == set(cfg["DEFAULT"]["tst_flags"].split())
    assert {"slow", "cuda", "notest"} <= run_jupyter.settings_flags()


def write_nb(path:Path, *sources) -> Path:
    """A notebook of code cells with `sources`."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, path)
    return path


def run_tool(*args, timeout=300):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_runs_in_a_real_kernel_and_skips_flagged_cells(tmp_path):
    nb = write_nb(tmp_path / "real.ipynb",
                  "import sys\nassert type(get_ipython()).__name__ == 'ZMQInteractiveShell'\nassert 'ipykernel' in sys.modules",
                  "#| slow\nraise RuntimeError('a slow cell ran')",
                  "#| cuda\nraise RuntimeError('a cuda cell ran')",
                  "#| eval: false\nraise RuntimeError('an eval: false cell ran')",
                  f"import os\nassert os.getcwd() == {str(tmp_path)!r}, os.getcwd()",
                  f"assert sys.prefix == {sys.prefix!r}, sys.prefix")  # the kernel runs this environment's python
    proc = run_tool(str(nb))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["ok", "real.ipynb"] and lines[0].endswith("3 cells skipped")
    assert lines[-1] == "1 passed, 0 failed"


def test_a_failure_names_its_cell_and_is_counted(tmp_path):
    good = write_nb(tmp_path / "good.ipynb", "x = 1")
    bad = write_nb(tmp_path / "bad.ipynb", "x = 1", "#| slow\nraise ValueError('slow ran')", "raise ValueError('boom')")
    proc = run_tool(str(good), str(bad))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["ok", "good.ipynb"]
    assert lines[1].split()[:2] == ["FAILED", "bad.ipynb"]
    assert "cell 2 (id " in lines[1]  # numbered as in the file, skipped cells included
    assert lines[1].endswith("ValueError: boom (line 1: raise ValueError('boom'))")
    assert lines[-1] == "1 passed, 1 failed"
    proc = run_tool("--flags", "slow", str(bad))  # --flags slow runs the slow cell, which fails first
    assert proc.returncode == 1 and "cell 1 (id " in proc.stdout and "ValueError: slow ran" in proc.stdout


needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not in DLCOURSE_DATA")


@pytest.mark.parametrize("notebook", [pytest.param("00_core", marks=needs_fmnist),
                                      pytest.param("02_schedule", marks=needs_fmnist), "09_xresnet"])
def test_notebook_runs_in_jupyter(notebook):
    """The fastest notebooks run in a real kernel (the whole set: `make test-jupyter`)."""
    proc = run_tool(notebook, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "1 passed, 0 failed"
