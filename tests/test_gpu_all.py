"""tools/run_cells.py (the notebook runner for machines without nbdev), bench/gpu_all.sh (every GPU check in one run) and
bench/imagenette_gpu.sh (its training steps for one recipe), checked on the CPU: the runner's stand-ins agree with
fastcore and it skips what nbdev_test skips (the rule itself, tools/run_jupyter.py's, is held to nbdev's in
test_jupyter.py), and the scripts' training steps run in a small form, writing one JSON line per result and one status
line per step, with the optimizer and schedule the trained learner used."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("run_cells", ROOT / "tools" / "run_cells.py")
run_cells = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_cells)

EQ_CASES = [(1, 1), (1, 2), (1.0, 1), ("a", "a"), ("a", "b"), ([1, 2], [1, 2]), ([1, 2], [1, 2, 3]), ((1, 2), [1, 2]),
            ({"a": 1}, {"a": 1}), ({"a": 1}, {"a": 2}), ({1, 2}, {2, 1}), (None, None), (None, 0), (int, int), (int, float),
            (torch.tensor([1, 2]), torch.tensor([1, 2])), (torch.tensor([1, 2]), torch.tensor([1, 3])),
            (torch.tensor([1, 2]), [1, 2]), ([1, 2], torch.tensor([1, 2])), (torch.tensor(3.), 3.), (torch.tensor(3.), 4.),
            (torch.zeros(2, 3), torch.zeros(2, 3)), (torch.Size([2, 3]), (2, 3)), (torch.float32, torch.float32),
            ({"x": {torch.float16}}, {"x": {torch.float16}}), ([[1, 2], [3]], [[1, 2], [3]]), ([[1, 2], [3]], [[1, 2], [4]]),
            (range(3), [0, 1, 2]), ("ab", ["a", "b"]), (torch.tensor([True, False]), [True, False]), (torch.tensor([1, 2]), 1)]
CLOSE_CASES = [(1., 1. + 1e-6), (1., 1.1), (torch.tensor([1., 2.]), torch.tensor([1., 2.00001])),
               (torch.tensor([1., 2.]), torch.tensor([1., 2.1])), ([1., 2.], [1., 2.0000001]), ([1., 2.], [1., 2.5]),
               (torch.tensor(0.5), 0.5), ("a", "a"), ([torch.tensor(1.)], [1.]), (torch.tensor([1., 2.]), [1., 2.])]


def passes(check, *args, **kwargs) -> bool:
    "Whether the test function `check` passes on `args` (an assertion or any other error counts as failing)."
    try:
        check(*args, **kwargs)
    except Exception:
        return False
    return True


def test_standins_agree_with_fastcore():
    "The fastcore.test stand-ins pass and fail on the same cases as fastcore itself."
    ft = pytest.importorskip("fastcore.test")
    for a, b in EQ_CASES:
        for name in ("test_eq", "test_ne"):
            assert passes(getattr(run_cells, name), a, b) == passes(getattr(ft, name), a, b), (name, a, b)
    for a, b in CLOSE_CASES:
        for eps in (1e-5, 0.2):
            assert passes(run_cells.test_close, a, b, eps) == passes(ft.test_close, a, b, eps), (a, b, eps)
    def boom():
        raise ValueError("boom here")
    for f, kwargs in [(lambda: None, {}), (boom, {}), (boom, {"contains": "boom"}), (boom, {"contains": "nope"}),
                      (boom, {"exc": TypeError}), (boom, {"exc": ValueError, "contains": "here"})]:
        assert passes(run_cells.test_fail, f, **kwargs) == passes(ft.test_fail, f, **kwargs), kwargs
    assert not passes(run_cells.test_eq, [1, 2], [1, 3]) and passes(run_cells.test_eq, [1, 2], (1, 2))


def notebook(tmp_path, *sources, front_matter=None):
    "A notebook of code cells with `sources` (after a raw cell of `front_matter` if given), written in tmp_path."
    cells = [{"cell_type": "code", "id": f"{i:08x}", "metadata": {}, "execution_count": None, "outputs": [],
              "source": src} for i, src in enumerate(sources)]
    if front_matter is not None:
        cells.insert(0, {"cell_type": "raw", "id": "0000front", "metadata": {}, "source": front_matter.splitlines(True)})
    path = tmp_path / "check.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def run_notebook(path, *args):
    "tools/run_cells.py on `path`: (exit status, its JSON summary, stderr)."
    proc = subprocess.run([sys.executable, "tools/run_cells.py", str(path), "--standins", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout  # the cells' own output goes to stderr
    return proc.returncode, json.loads(lines[0]), proc.stderr


def test_run_cells_flags_magics_and_standins(tmp_path):
    "Flagged cells run only when asked for; IPython lines work; the stand-ins import; the namespace is shared."
    path = notebook(tmp_path,
                    "from fastcore.test import test_eq, test_fail\nfrom IPython.display import Image\nimport os",
                    "%matplotlib inline\n%time x = 1\n!echo from-the-shell\nprint('cwd', os.getcwd())",
                    "#| slow\nraise RuntimeError('a slow cell ran')",
                    "#| cuda\ncuda_ran = True",
                    "#| hide\ntest_eq(x, 1)\ntest_fail(lambda: 1 / 0, contains='division')\nImage(b'png')",
                    "#| eval: false\nraise RuntimeError('an eval: false cell ran')",
                    "#|eval:false\nraise RuntimeError('an eval:false cell ran')",
                    "#| hide\nfrom nbdev import nbdev_export\nnbdev_export()")
    rc, summary, err = run_notebook(path)
    assert rc == 0, err
    assert (summary["status"], summary["ran"], summary["skipped"]) == ("ok", 3, {"slow": 1, "cuda": 1, "eval: false": 2,
                                                                                 "nbdev_export": 1})
    assert summary["standins"] == ["IPython", "fastcore"]
    assert "from-the-shell" in err and f"cwd {tmp_path}" in err  # the notebook's folder, as nbdev_test runs it
    rc, summary, _ = run_notebook(path, "--flags", "cuda")
    assert rc == 0 and summary["ran"] == 4 and summary["flagged_run"] == {"cuda": 1}


def test_run_cells_skips_a_skip_exec_notebook(tmp_path):
    "A notebook whose front matter says `skip_exec: true` is not run (nbdev_test passes it without running it)."
    path = notebook(tmp_path, "raise RuntimeError('a skip_exec notebook ran')",
                    front_matter="---\ntitle: check\nskip_exec: true\n---\n")
    rc, summary, err = run_notebook(path)
    assert rc == 0 and summary["status"] == "ok" and summary["skip_exec"] is True and summary["ran"] == 0, err


def test_run_cells_reports_the_failing_cell(tmp_path):
    "A failing cell stops the notebook: exit status 1, the cell's index, the error and the traceback's end."
    path = notebook(tmp_path, "from fastcore.test import test_eq\ny = 2", "test_eq(y, 3)", "never = True")
    rc, summary, err = run_notebook(path)
    assert rc == 1 and summary["status"] == "failed" and summary["failed_cell"] == 1 and summary["ran"] == 1
    assert summary["error"].startswith("AssertionError: ==") and "test_eq(y, 3)" in err


def check_ranger(run:dict, lr:float):
    "The optimizer and schedule of a Ranger flat-cos recipe at `lr`, as the trained learner used them."
    # Ranger's own hyper-parameters, weight decay 1e-2 on the weights only; lr flat, then down to lr / 1e5; momentum 0.95
    assert run["opt"] == {"name": "Ranger", "sqr_mom": 0.99, "eps": 1e-6, "lookahead_k": 6, "lookahead_alpha": 0.5,
                          "wd": [0.01, 0.0]}
    assert run["sched"]["lr"] == pytest.approx([lr, lr, lr / 1e5]) and run["sched"]["mom"] == [0.95, 0.95, 0.95]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script's CPU form is not what runs")
def test_gpu_all_training_steps(tmp_path):
    """gpu_all.sh's training steps on the tiny sample (one grid recipe, its pick, seeds 1 and 2 and 3-seed summary, the
    two course references): each succeeds and writes its result line and its status line; the other steps (env, data,
    cells, precision, augment) are left out with ONLY to keep this under a minute (five training processes)."""
    env = {**os.environ, "DEVICE": "cpu", "DATA": "tiny", "SIZE": "32", "EPOCHS": "1", "BS": "16", "WIDTH": "0.25",
           "GRID": "xresnet18-ranger-bs128", "ONLY": "grid pick seeds best ref", "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "DLCOURSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_all.sh"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu.jsonl").read_text().splitlines()]
    status = {l["step"]: l["step_status"] for l in lines if "step_status" in l}
    assert proc.returncode == 0, (proc.stderr[-3000:], status)
    assert list(status) == ["grid-xresnet18-ranger-bs128", "pick", "seeds-xresnet18-ranger-bs128-1",
                            "seeds-xresnet18-ranger-bs128-2", "best-summary", "ref-course-lesson11-cnn",
                            "ref-course-xresnet34"]
    assert set(status.values()) == {"ok"}
    results = {l["step"]: l for l in lines if "step_status" not in l}
    runs = [l for l in lines if "accuracy" in l and "seed" in l]
    assert [(r["recipe"], r["seed"]) for r in runs] == [("xresnet18-ranger-bs128", 0), ("xresnet18-ranger-bs128", 1),
                                                        ("xresnet18-ranger-bs128", 2), ("course-lesson11-cnn", 0),
                                                        ("course-xresnet34", 0)]
    for r in runs:
        saved = json.loads((tmp_path / "work" / "runs" / f"{r['step']}.json").read_text())
        assert r["accuracy"] == round(saved["accuracy"], 4) == r["epochs_accuracy"][-1]
        assert r["fit_seconds"] > 0 and r["n_train"] == 240 and r["bs"] == 16
        assert saved["recipe"]["opt"] == r["opt"] and r["sched"]["batches"] == 15  # 240 images, batches of 16, 1 epoch
    assert results["pick"]["picked"] == "xresnet18-ranger-bs128"
    assert results["best-summary"]["runs"] == 3 and results["best-summary"]["seeds"] == [0, 1, 2]
    check_ranger(runs[0], lr=8e-3)
    cnn, r34 = runs[3]["sched"], runs[4]["sched"]
    # the lesson-11 CNN: plain SGD (no momentum, no decay), lr 0.1 up to 0.3 over 30% of the batches, then down to 0.05
    assert runs[3]["model"] == "lesson11_cnn" and runs[3]["opt"] == {"name": "SGD", "wd": [0.0, 0.0]}
    assert cnn["lr"][0] == pytest.approx(0.1) and 0.29 < cnn["lr"][1] <= 0.3 and cnn["lr"][2] == pytest.approx(0.05)
    assert cnn["mom"] is None
    # lesson 12's xresnet34: Adam (eps 1e-6), lr 1e-3 up to 1e-2 over half the batches, then down to 1e-7, momentum
    # 0.95 down to 0.85 and back
    assert runs[4]["opt"] == {"name": "Adam", "sqr_mom": 0.99, "eps": 1e-6, "wd": [0.01, 0.0]}
    assert r34["lr"] == pytest.approx([1e-3, 1e-2, 1e-7]) and r34["mom"] == pytest.approx([0.95, 0.85, 0.95])
    assert lines[-1]["step"] == "done" and lines[-1]["steps_not_ok"] == []
    assert (tmp_path / "out" / "logs.tgz").exists()  # OUT apart from WORK: the logs are packed beside the lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script's CPU form is not what runs")
def test_imagenette_gpu_runs_one_recipe_with_its_seeds(tmp_path):
    """bench/imagenette_gpu.sh in its documented CPU form (two seeds here): gpu_all.sh's env, data, grid, pick, seeds
    and summary steps for its recipe, with ARCH and LR overriding the recipe's settings; OUT holds the whole run."""
    env = {**os.environ, "SEEDS": "0 1", "EPOCHS": "1", "SIZE": "32", "BS": "16", "WIDTH": "0.25", "ARCH": "xresnet18",
           "LR": "1e-3", "DEVICE": "cpu", "DATA": "tiny", "OUT": str(tmp_path / "out"),
           "DLCOURSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/imagenette_gpu.sh"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu.jsonl").read_text().splitlines()]
    status = {l["step"]: l["step_status"] for l in lines if "step_status" in l}
    assert proc.returncode == 0, (proc.stderr[-3000:], status)
    assert [json.loads(line) for line in proc.stdout.splitlines()] == lines  # every line also on stdout
    assert list(status) == ["env", "data", "grid-xresnet50-ranger-bs128", "pick", "seeds-xresnet50-ranger-bs128-1",
                            "best-summary"] and set(status.values()) == {"ok"}
    runs = [l for l in lines if "accuracy" in l and "seed" in l]
    assert [(r["seed"], r["model"], r["width"], r["lr"], r["bs"], r["size"]) for r in runs] == [
        (0, "xresnet18", 0.25, 1e-3, 16, 32), (1, "xresnet18", 0.25, 1e-3, 16, 32)]
    for r in runs:
        check_ranger(r, lr=1e-3)
        assert (tmp_path / "out" / "runs" / f"{r['step']}.json").exists()
    summary = next(l for l in lines if l["step"] == "best-summary" and "runs" in l)
    assert summary["seeds"] == [0, 1] and summary["accuracy_mean"] == round(sum(r["accuracy"] for r in runs) / 2, 4)


PARSE_ONLY = """import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    sys.exit(0)  # the command line parsed: stop before the benchmark itself
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_make_bench_scripts_need_no_arguments():
    "`make bench` runs every bench/*.py without arguments: each one's command line parses empty."
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert scripts
    for script in scripts:
        proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(script)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (script.name, proc.stderr[-2000:])
