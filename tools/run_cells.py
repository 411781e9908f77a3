#!/usr/bin/env python
"""Run a notebook's code cells in order, in one namespace, without Jupyter, IPython, nbdev or fastcore.

A small stand-in for `nbdev_test` on a machine that has only PyTorch and its usual companions (a GPU machine, say):

- the cells run in order in one fresh namespace, in the notebook's folder (as `nbdev_test` runs them), with the
  repository root on `sys.path` and `IN_TEST=1` in the environment;
- the cells and notebooks `make test-jupyter` skips are skipped, by the same functions (tools/run_jupyter.py): a cell
  whose leading `#|` directives include a test flag (`tst_flags` of settings.ini) unless that flag is given with
  `--flags`, `#| eval: false` cells and cells calling `nbdev_export(`, and a notebook whose front matter says
  `skip_exec: true`;
- IPython-only lines: `%time`/`%timeit` run their statement, other line magics are left out, `!cmd` runs in a shell,
  `%%time`/`%%capture` cells run their body (any other cell magic is an error);
- when IPython is not installed, a stub `IPython.display` (Image, Markdown, HTML, ... as plain holders, `display`
  a no-op) is provided; when fastcore is not installed, a stand-in `fastcore.test` with the semantics of
  `test_eq`, `test_ne`, `test_close`, `test_is`, `test_eq_type` and `test_fail` (`--standins` uses both stand-ins
  even where the real packages exist, to check them);
- matplotlib draws on the Agg backend unless MPLBACKEND says otherwise.

The cells' own output goes to stderr; stdout gets one JSON line per notebook:
{"notebook": ..., "status": "ok" or "failed", "ran": n, "skipped": {flag: n}, "flagged_run": {flag: n}, "seconds": ...,
 and on failure "failed_cell", "error" and "traceback_tail"; for a `skip_exec` notebook "skip_exec": true}. The exit
status is 0 when every notebook passed.

    python tools/run_cells.py nbs/08_fp16.ipynb [more notebooks] [--flags cuda local_data] [--standins]
    python tools/run_cells.py nbs/*.ipynb --having cuda     # which notebooks have a `#| cuda` code cell

Several notebooks run one after the other, each in a process of its own (as `nbdev_test` runs them).
"""
import argparse
import builtins
import contextlib
import json
import linecache
import math
import os
import re
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Iterable
from itertools import zip_longest
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
if str(TOOLS) not in sys.path:  # run as a script it is sys.path[0]; loaded from its file by a test, it may not be
    sys.path.insert(0, str(TOOLS))
# which cells and notebooks nbdev_test skips: the rule of `make test-jupyter`, standard library only
from run_jupyter import cell_source, directives, settings_flags, skip_notebook, skip_reason  # noqa: E402

DIRECTIVE = re.compile(r"^\s*#\s*\|")  # a `#|` line at the top of a cell


# IPython syntax
LINE_MAGIC = re.compile(r"^(\s*)%(\w+)\s*(.*)$")
SHELL_LINE = re.compile(r"^(\s*)!(?!=)(.*)$")  # not a continuation line starting with !=
RUN_BODY_CELL_MAGICS = ("time", "capture")


def run_shell(command:str):
    "What a `!command` line does in IPython: run it in a shell, its output shown (here: on stderr), failure ignored."
    subprocess.run(command, shell=True, stdout=sys.stderr, stderr=sys.stderr)


def to_python(source:str) -> str:
    "A cell's source with IPython-only syntax made plain Python (see the module docstring); valid Python as it is."
    try:
        compile(source, "<cell>", "exec")
        return source
    except SyntaxError:
        pass  # magics or shell lines (or a real syntax error, which compiling the result reports)
    lines = source.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not DIRECTIVE.match(line)), None)
    if first is not None and lines[first].lstrip().startswith("%%"):
        magic = lines[first].lstrip()[2:].split()[0] if lines[first].lstrip()[2:].split() else ""
        if magic not in RUN_BODY_CELL_MAGICS:
            raise SyntaxError(f"cell magic %%{magic} is not supported outside IPython")
        lines[first] = ""
    out = []
    for line in lines:
        magic, shell = LINE_MAGIC.match(line), SHELL_LINE.match(line)
        if magic:
            indent, name, rest = magic.groups()
            out.append(indent + (rest if name in ("time", "timeit", "prun") and rest else "pass") + f"  # %{name}")
        elif shell:
            indent, command = shell.groups()
            out.append(f"{indent}__run_shell__({command!r})")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# stand-ins for packages that may be missing
class _Holder:
    "What IPython.display's rich objects are here: the data they were given, and a short repr."
    def __init__(self, data=None, *args, **kwargs):
        self.data, self.args, self.kwargs = data, args, kwargs

    def __repr__(self):
        size = len(self.data) if isinstance(self.data, (bytes, str)) else None
        return f"<{type(self).__name__} object{f' ({size} characters/bytes)' if size is not None else ''}>"


def ipython_stub() -> dict:
    "Modules IPython, IPython.display and IPython.core.display: rich-display classes as holders, display a no-op."
    display_mod = types.ModuleType("IPython.display")
    for name in ("Image", "Markdown", "HTML", "SVG", "Latex", "JSON", "Javascript", "Video", "Audio", "Code",
                 "DisplayObject"):
        setattr(display_mod, name, type(name, (_Holder,), {}))
    display_mod.display = lambda *objs, **kwargs: None
    display_mod.clear_output = lambda wait=False: None
    ipython = types.ModuleType("IPython")
    ipython.__path__, ipython.display, ipython.get_ipython = [], display_mod, lambda: None
    ipython.version_info = (8, 24, 0, "stand-in")  # matplotlib skips its IPython integration from 8.24 on
    core = types.ModuleType("IPython.core")
    core.__path__, core.display = [], display_mod
    ipython.core = core
    return {"IPython": ipython, "IPython.display": display_mod, "IPython.core": core, "IPython.core.display": display_mod}


def _is_iter(x) -> bool:
    "Usable in a for loop, and not a 0-d array (fastcore's `is_iter`)."
    return isinstance(x, Iterable) and getattr(x, "ndim", 1) != 0


def _as_array(x):
    "A tensor (on any device, any dtype) or array-like as a NumPy array; anything else as it is."
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.dtype.is_floating_point and x.element_size() < 4 else x  # NumPy has no bfloat16
    if hasattr(x, "__array__"):
        import numpy as np
        return np.asarray(x)
    return x


def _all_equal(a, b) -> bool:
    "Item by item, the lengths included (`equals` on each pair); against a non-iterable `b`, `a == b`."
    if not _is_iter(b):
        return bool(a == b)  # an array of several truth values raises here, as it fails in fastcore
    return all(equals(x, y) for x, y in zip_longest(a, b))


def _array_equal(a, b) -> bool:
    "Two arrays: `(a == b).all()` (False when their shapes do not broadcast); an array and a sequence: item by item."
    a, b = _as_array(a), _as_array(b)
    if type(a).__name__ == "ndarray" and type(b).__name__ == "ndarray":
        try:
            return bool((a == b).all())
        except ValueError:
            return False
    return _all_equal(a, b)


def _is_kind(x, name:str) -> bool:
    return any(t.__name__ == name for t in type(x).__mro__)


def equals(a, b) -> bool:
    "Equality as fastcore's `test_eq` sees it: arrays element-wise, str/dict/set with ==, other iterables item by item."
    if (a is None) != (b is None):
        return False
    if isinstance(a, type) or isinstance(b, type):
        return a == b
    if any(_is_kind(x, kind) for x in (a, b) for kind in ("ndarray", "Tensor")):
        return _array_equal(a, b)
    if isinstance(a, (str, dict, set)) or isinstance(b, (str, dict, set)):
        return a == b
    if _is_iter(a) or _is_iter(b):
        return _all_equal(a, b)
    return a == b


def is_close(a, b, eps:float=1e-5) -> bool:
    "Within `eps` as fastcore's `test_close` sees it: arrays element-wise, sequences pairwise (zip), numbers |a-b|."
    if hasattr(a, "__array__") or hasattr(b, "__array__"):
        return bool((abs(a - b) < eps).all())
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if isinstance(a, Iterable) or isinstance(b, Iterable):
        return all(is_close(x, y, eps) for x, y in zip(a, b))
    try:
        return abs(a - b) < eps
    except TypeError:
        return a == b


def _check(a, b, ok:bool, name:str):
    assert ok, f"{name}:\n{a}\n{b}"


def test_eq(a, b):
    "Assert `a` equals `b` (see `equals`)."
    _check(a, b, equals(a, b), "==")


def test_ne(a, b):
    "Assert `a` does not equal `b`."
    _check(a, b, not equals(a, b), "!=")


def test_is(a, b):
    "Assert `a is b`."
    _check(a, b, a is b, "is")


def test_eq_type(a, b):
    "Assert `a` equals `b` and both have the same type (item by item for lists and tuples)."
    test_eq(a, b)
    test_eq(type(a), type(b))
    if isinstance(a, (list, tuple)):
        test_eq(list(map(type, a)), list(map(type, b)))


def test_close(a, b, eps:float=1e-5):
    "Assert `a` is within `eps` of `b` (see `is_close`)."
    _check(a, b, is_close(a, b, eps), "close")


def test_fail(f, msg:str="", contains:str="", exc=Exception, args=None, kwargs=None):
    "Assert that `f(*args, **kwargs)` raises `exc`, with `contains` in its message if given."
    try:
        f(*(args or []), **(kwargs or {}))
    except exc as e:
        assert not contains or contains in str(e), f"{contains!r} not in {str(e)!r}. {msg}"
        return
    except Exception as e:
        raise AssertionError(f"Expected {exc.__name__} but got {type(e).__name__}: {e}. {msg}") from e
    raise AssertionError(f"Expected {exc.__name__} but none raised. {msg}")


def fastcore_stub() -> dict:
    "Modules fastcore and fastcore.test with the stand-ins above."
    test_mod = types.ModuleType("fastcore.test")
    for fn in (test_eq, test_ne, test_is, test_eq_type, test_close, test_fail, equals, is_close):
        setattr(test_mod, fn.__name__, fn)
    test_mod.nequals = lambda a, b: not equals(a, b)
    package = types.ModuleType("fastcore")
    package.__path__, package.test = [], test_mod
    return {"fastcore": package, "fastcore.test": test_mod}


class StubFinder:
    "An import hook that serves premade modules, so that a stand-in exists only once a notebook imports it."
    def __init__(self, modules:dict):
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        import importlib.util
        if name not in self.modules:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=hasattr(self.modules[name], "__path__"))

    def create_module(self, spec):
        return self.modules[spec.name]

    def exec_module(self, module):
        pass


def _missing(name:str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install_standins(force:bool=False) -> list[str]:
    "Serve the stand-in modules where the real package is missing (or always, with `force`); return their names."
    used, modules = [], {}
    for name, make in (("IPython", ipython_stub), ("fastcore", fastcore_stub)):
        if force or _missing(name):
            modules.update(make())
            used.append(name)
    if modules:
        sys.meta_path.insert(0, StubFinder(modules))
    return used


# running a notebook
def code_cells(nb:dict) -> list[tuple[int, str]]:
    "(index in the notebook, source) of each code cell of `nb` (a notebook file's JSON)."
    return [(i, cell_source(c)) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]


def _prepare_process():
    "The environment of a notebook run: the repository importable (also by subprocesses, from any folder), IN_TEST."
    sys.path.insert(0, str(ROOT))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(str(Path(p).resolve()) for p in parts)])
    os.environ.setdefault("MPLBACKEND", "Agg")


def _cuda_name() -> str|None:
    "The GPU the notebook ran on, if it imported torch and one is there."
    torch = sys.modules.get("torch")
    try:
        return torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None
    except Exception:
        return None


def run_notebook(path:Path, run_flags:set, force_standins:bool=False, in_test:bool=True) -> dict:
    "Run the code cells of `path` (see the module docstring); return the summary."
    path = path.resolve()
    _prepare_process()
    if in_test:
        os.environ["IN_TEST"] = "1"
    standins = install_standins(force_standins)
    flags = settings_flags()
    nb = json.loads(path.read_text())
    summary = {"notebook": os.path.relpath(path, ROOT), "status": "ok", "flags": sorted(run_flags), "ran": 0,
               "skipped": {}, "flagged_run": {}, "standins": standins}
    if skip_notebook(nb):
        return {**summary, "skip_exec": True, "seconds": 0., "cuda_device": None}
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__run_shell__": run_shell,
                 "display": lambda *objs, **kwargs: None}
    start = time.perf_counter()
    os.chdir(path.parent)
    with contextlib.redirect_stdout(sys.stderr):
        for index, source in code_cells(nb):
            reason = skip_reason(source, flags - run_flags)
            if reason is not None:
                summary["skipped"][reason] = summary["skipped"].get(reason, 0) + 1
                continue
            for flag in sorted(set(directives(source)) & flags):
                summary["flagged_run"][flag] = summary["flagged_run"].get(flag, 0) + 1
            filename = f"<{path.name} cell {index}>"
            try:
                code = to_python(source)
                linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
                exec(compile(code, filename, "exec"), namespace)
            except BaseException as err:  # noqa: B036  (KeyboardInterrupt and SystemExit are failures of the cell too)
                lines = traceback.format_exc().splitlines()
                print("\n".join(lines), file=sys.stderr)
                summary.update(status="failed", failed_cell=index, error=f"{type(err).__name__}: {err}"[:2000],
                               traceback_tail=lines[-12:])
                break
            summary["ran"] += 1
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["cuda_device"] = _cuda_name()
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path, help="notebooks to run, each in a process of its own")
    p.add_argument("--flags", nargs="*", default=[], help="test flags whose cells run (e.g. cuda local_data)")
    p.add_argument("--standins", action="store_true", help="use the IPython and fastcore stand-ins even if installed")
    p.add_argument("--no-in-test", action="store_true", help="do not set IN_TEST=1 (nbdev_test sets it)")
    p.add_argument("--having", metavar="FLAG", help="only list the notebooks with a code cell flagged FLAG, run nothing")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run a single notebook in this process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.having:
        for nb in args.notebooks:
            if any(args.having in directives(source) for _, source in code_cells(json.loads(nb.read_text()))):
                print(nb)
        return 0
    if args.one or len(args.notebooks) == 1:
        summary = run_notebook(args.notebooks[0], set(args.flags), args.standins, not args.no_in_test)
        summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        print(json.dumps(summary), flush=True)
        return 0 if summary["status"] == "ok" else 1
    extra = ["--flags", *args.flags] + (["--standins"] if args.standins else []) + (["--no-in-test"] if args.no_in_test else [])
    failed = 0
    for nb in args.notebooks:
        failed += subprocess.run([sys.executable, __file__, "--one", str(nb), *extra]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
