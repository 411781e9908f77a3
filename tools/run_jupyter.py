#!/usr/bin/env python
"""Run notebooks in a real Jupyter kernel (`make test-jupyter`), as a reader running them in JupyterLab would.

`nbdev_test` runs notebooks in execnb's in-process shell; this runs them with nbclient in a separate `python3`
ipykernel, so it also catches what only breaks there (the kernel's own `sys.argv`, display hooks, widgets).
The cells `nbdev_test` skips are dropped first: `#| eval: false`, cells calling `nbdev_export(`, and cells
flagged with any of settings.ini's `tst_flags` (`#| slow`, `#| cuda`, `#| notest`) unless `--flags` names them.

Prints one line per notebook and ends with `N passed, N failed`; exits 1 when a notebook fails.

    python tools/run_jupyter.py                      # every notebook in nbs/
    python tools/run_jupyter.py 00_core 09_xresnet   # some of them (names or paths)
    python tools/run_jupyter.py --flags slow         # also run the `#| slow` cells
"""
import argparse
import configparser
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_directive_re = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")


def settings_flags(root:Path=ROOT) -> set:
    """The test flags settings.ini names (`tst_flags`): cells carrying one are skipped by default."""
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(root / "settings.ini", encoding="utf-8")
    return set(cfg["DEFAULT"].get("tst_flags", "notest").split())


def directives(source:str) -> dict:
    """The `#| key value` lines at the top of a cell, as {key: value}; `#| eval: false` gives {'eval': 'false'}."""
    found = {}
    for line in source.splitlines():
        if not line.strip():
            continue
        match = _directive_re.match(line)
        if match is None:
            break
        text = match.group(1)
        evaluate = re.match(r"eval\s*:\s*(.*)", text)
        if evaluate:
            found["eval"] = evaluate.group(1)
        else:
            key, _, value = text.partition(" ")
            found[key] = value.strip()
    return found


def cell_source(cell:dict) -> str:
    """A cell's source as one string (a notebook file may hold it as a list of lines)."""
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def skip_reason(source:str, skip_flags:set) -> str|None:
    """Why `nbdev_test` would not run a code cell of `source`: 'eval: false', 'nbdev_export', or the first of
    `skip_flags` among its directives; None when it would run it."""
    found = directives(source)
    if found.get("eval", "").lower() == "false":
        return "eval: false"
    if "nbdev_export" + "(" in source:
        return "nbdev_export"
    flags = sorted(skip_flags & found.keys())
    return flags[0] if flags else None


def skip_cell(cell:dict, skip_flags:set) -> bool:
    """True for a code cell that `nbdev_test` would not run."""
    return cell["cell_type"] == "code" and skip_reason(cell_source(cell), skip_flags) is not None


def skip_notebook(nb:dict) -> bool:
    """True when the notebook's front matter says `skip_exec: true` (nbdev_test skips it whole); `nb` as nbformat
    reads it or as the JSON of the file."""
    first = nb["cells"][0] if nb["cells"] else None
    return bool(first and first["cell_type"] == "raw"
                and re.search(r"^skip_exec:\s*true\s*$", cell_source(first), re.M | re.I))


def check_kernel(kernel_name:str):
    """Fail early unless `kernel_name` starts a python of this environment (the venv, with dlcourse installed)."""
    from jupyter_client.kernelspec import KernelSpecManager
    argv0 = KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
    # jupyter_client replaces a bare `python`/`python3` with the interpreter that launches the kernel.
    if argv0 in {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}:
        return
    proc = subprocess.run([argv0, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    if proc.returncode != 0 or proc.stdout.strip() != sys.prefix:
        sys.exit(f"kernel {kernel_name!r} runs {argv0}, not this environment's python ({sys.prefix}): run "
                 f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}` "
                 "(a kernelspec in your user folder shadows it: see `jupyter kernelspec list`)")


def error_summary(nb, cell_numbers:list) -> str:
    """`cell N (id ...): Name: value` for the first cell whose outputs hold an error (N: its index in the notebook file)."""
    for cell, number in zip(nb.cells, cell_numbers):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                value = out.get("evalue", "").strip().splitlines()
                message = f"cell {number} (id {cell.get('id', '?')}): {out.get('ename', 'Error')}"
                message += f": {value[0]}" if value else ""
                return message + failing_line(out.get("traceback", []))
    return ""


def failing_line(traceback:list) -> str:
    """` (line N: code)` for the last line IPython's traceback marks with an arrow, or ''."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(traceback))
    marked = re.findall(r"^-+>\s*(\d+)\s+(.*?)\s*$", text, re.M)
    return f" (line {marked[-1][0]}: {marked[-1][1]})" if marked else ""


def run_notebook(path:Path, skip_flags:set, timeout:int=600, kernel_name:str="python3"):
    """Execute `path` in a fresh kernel (cwd: its folder); return (ok, seconds, message)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    nb = nbformat.read(path, as_version=4)
    if skip_notebook(nb):
        return True, 0.0, "skipped (skip_exec)"
    cell_numbers = [i for i, cell in enumerate(nb.cells) if not skip_cell(cell, skip_flags)]
    n_skipped = len(nb.cells) - len(cell_numbers)
    nb.cells = [nb.cells[i] for i in cell_numbers]
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    # The kernel process's own stderr (its start-up banner, C-level messages) goes to a file, shown if it dies.
    with tempfile.TemporaryFile("w+") as kernel_stderr:
        try:
            client.execute(stderr=kernel_stderr)
        except CellTimeoutError as e:
            return False, time.time() - start, f"a cell ran past {timeout}s: {str(e).splitlines()[0]}"
        except DeadKernelError as e:
            kernel_stderr.seek(0)
            return False, time.time() - start, f"the kernel died: {e}\n{kernel_stderr.read()[-2000:]}"
        except CellExecutionError as e:
            return False, time.time() - start, error_summary(nb, cell_numbers) or f"{e.ename}: {e.evalue}"
    return True, time.time() - start, f"{n_skipped} cell{'' if n_skipped == 1 else 's'} skipped"


def find_notebooks(names, nbs_path:Path=ROOT / "nbs") -> list:
    """The notebooks named (a path, a file name, or a stem like `00_core`), or every one nbdev_test runs."""
    if not names:
        return sorted(p for p in nbs_path.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    found = []
    for name in names:
        path = Path(name)
        if not path.exists():
            path = nbs_path / (name if name.endswith(".ipynb") else f"{name}.ipynb")
        if not path.exists():
            sys.exit(f"no notebook {name!r} (looked in {nbs_path})")
        found.append(path.resolve())
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="names or paths (default: every notebook in nbs/)")
    parser.add_argument("--flags", default="", help="space-separated test flags to run anyway, e.g. 'slow'")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    parser.add_argument("--kernel", default="python3", help="kernelspec name (default python3)")
    args = parser.parse_args(argv)
    skip_flags = settings_flags() - set(args.flags.split())
    check_kernel(args.kernel)
    passed = failed = 0
    for path in find_notebooks(args.notebooks):
        ok, seconds, message = run_notebook(path, skip_flags, timeout=args.timeout, kernel_name=args.kernel)
        print(f"{'ok' if ok else 'FAILED':<6} {path.name:<32} {seconds:6.1f}s  {message}", flush=True)
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
