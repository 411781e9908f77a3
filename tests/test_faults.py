"""Runs that go wrong, from the command line: a diverging loss, a folder that holds a run, settings that cannot work,
bad images, a rank that stops answering. Each test runs `dlcourse` on small folders and checks its exit status, its
one-line message and what it leaves on disk.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, free_port, kill_launch
SMALL = ["--size", "16", "--epochs", "1", "--bs", "32", "--lr", "1e-2", "--width", "0.25", "--no-progress"]


def strict_loads(text):
    """`text` parsed as strict JSON: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def strict_json(path):
    return strict_loads(Path(path).read_text())


def snapshot(folder):
    """{relative path: (sha256, mtime)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def tiny_copy(where, classes=None):
    from dlcourse.datasets import tiny_imagenette
    for part in ("train", "val"):
        for folder in sorted((tiny_imagenette() / part).iterdir()):
            if classes is None or folder.name in classes:
                shutil.copytree(folder, Path(where) / part / folder.name)
    return Path(where)


def test_a_diverging_run_stops_and_replaces_nothing(dlcourse, tmp_path):
    good = tmp_path / "runs" / "good"
    assert dlcourse("train", *SMALL, "--out", good).returncode == 0
    before = snapshot(good)
    proc = dlcourse("train", *SMALL, "--epochs", "2", "--lr", "1e6", "--out", tmp_path / "runs" / "bad")
    line = assert_one_line_error(proc, 1, "the training loss is nan at epoch 0, batch", "diverged")
    assert "records the run as diverged" in line
    record = strict_json(tmp_path / "runs" / "bad" / "results.json")
    assert record["status"] == "diverged" and "at epoch 0, batch" in record["error"] and record["epochs"] == []
    assert not (tmp_path / "runs" / "bad" / "model.safetensors").exists()
    assert snapshot(good) == before  # the earlier run is untouched
    proc = dlcourse("train", *SMALL, "--lr", "1e6", "--out", good)  # into the good run's folder: refused up front
    assert_one_line_error(proc, 2, f"--out {good} already holds files")
    assert snapshot(good) == before


def test_nan_losses_can_be_trained_on_and_stay_strict_json(dlcourse, tmp_path):
    proc = dlcourse("train", *SMALL, "--lr", "1e6", "--no-stop-on-nan", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    results = strict_json(tmp_path / "run" / "results.json")
    assert results["status"] == "finished" and results["train_loss"] is None and results["epochs"][0]["train_loss"] is None
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [strict_loads(line)["train_loss"] for line in lines] == [None]


def test_outputs_get_the_users_umask(dlcourse, tmp_path):
    assert dlcourse("train", *SMALL, "--out", tmp_path / "run", umask=0o022).returncode == 0
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert dlcourse("train", *SMALL, "--out", tmp_path / "private", umask=0o077).returncode == 0
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").rglob("*") if p.is_file()} == {0o600}


def test_an_interrupted_run_is_recorded_and_resumable(dlcourse, tmp_path):
    """Ctrl-C in the first epoch (no checkpoint yet): status 130, the record says so, and --resume says why it cannot."""
    code = ("import sys\nfrom dlcourse.learner import Learner\n"
            "def interrupted(self):\n    raise KeyboardInterrupt\nLearner.opt_step = interrupted\n"
            "from dlcourse.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = dlcourse("train", *SMALL, "--out", tmp_path / "run", code=code)
    assert_one_line_error(proc, 130, "interrupted after 0 of 1 epochs")
    assert strict_json(tmp_path / "run" / "results.json")["status"] == "interrupted"
    assert_one_line_error(dlcourse("train", "--resume", tmp_path / "run"), 1, "has no checkpoint", "start it again")


@pytest.mark.parametrize("flag", ["--lr", "--wd", "--label-smoothing", "--width", "--mixup"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_usage_errors(dlcourse, tmp_path, flag, value):
    proc = dlcourse("train", flag, value, "--out", tmp_path / "out")
    assert_one_line_error(proc, 2, f"argument {flag}", f"must be a finite number; got {value}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "0", "-5", "inf"])
def test_timeout_must_be_a_positive_number(dlcourse, value):
    assert_one_line_error(dlcourse("train", "--timeout", value), 2, "argument --timeout", "must be a finite number > 0")


def test_a_size_that_cannot_fit_is_refused_before_any_work(dlcourse, tmp_path, cache):
    start = time.perf_counter()
    proc = dlcourse("train", "--size", "100000", "--no-progress", "--out", tmp_path / "out")
    line = assert_one_line_error(proc, 1, "size 100000: a training and a validation batch (96 x 3 x 100000 x 100000 "
                                 "float32) would take", "TB, more than the", "use a smaller size")
    assert time.perf_counter() - start < 60, line
    assert not (tmp_path / "out").exists()
    assert not list(Path(cache).rglob("*100000px*"))  # nothing of the cache was written
    proc = dlcourse("train", "--size", "100000", "--loader", "items", "--no-progress")
    assert_one_line_error(proc, 1, "a training and a validation batch (96 x 3 x 100000 x 100000 float32) would take")


def test_a_single_class_is_refused(dlcourse, tmp_path):
    data = tiny_copy(tmp_path / "one", classes={"n01440764"})
    proc = dlcourse("train", *SMALL, "--data", data, "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "only one class (n01440764)", "a classifier needs two or more class folders")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loader", ["cached", "items"])
def test_bad_images_can_be_skipped_and_are_listed(dlcourse, tmp_path, loader):
    data = tiny_copy(tmp_path / "data")
    victims = sorted((data / "train" / "n01440764").iterdir())[:2]
    victims[0].write_bytes(victims[0].read_bytes()[:200])
    victims[1].write_bytes(b"")
    proc = dlcourse("train", *SMALL, "--loader", loader, "--data", data, "--out", tmp_path / "out")
    line = assert_one_line_error(proc, 1, "2 unreadable images of 360", "add --skip-bad-images")  # no flag: it stops
    assert all(str(v) in line for v in victims)
    proc = dlcourse("train", *SMALL, "--loader", loader, "--data", data, "--skip-bad-images", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 2 unreadable images, listed in" in proc.stdout and proc.stderr == ""
    listed = [line.split("\t")[0] for line in (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(str(v) for v in victims)
    results = strict_json(tmp_path / "run" / "results.json")
    assert sorted(results["skipped_images"]) == sorted(str(v) for v in victims) and results["n_train"] == 238


STALL_RANK_1 = """
import sys, time
from dlcourse.distributed import get_rank
from dlcourse.learner import Learner
run_epoch = Learner._run_epoch
def stalled(self):
    if get_rank() == 1:
        time.sleep(300)  # a rank that stops answering (a hung GPU, a lost machine)
    run_epoch(self)
Learner._run_epoch = stalled
from dlcourse.cli import main
sys.exit(main(sys.argv[1:]))
"""



def test_timeout_ends_a_run_whose_rank_stalls(tmp_path, cache):
    """Under torchrun, --timeout reaches the process group: rank 1 stalls, rank 0 gives up after 5 s instead of 30 min."""
    script = tmp_path / "stall.py"
    script.write_text(STALL_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLCOURSE_CACHE": str(cache), "DLCOURSE_DEBUG": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), "train", *SMALL, "--device", "cpu", "--timeout", "5",
           "--out", str(tmp_path / "run")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:
        kill_launch(proc)  # the stalled rank sleeps on otherwise
        proc.wait()
    assert proc.returncode != 0
    assert time.perf_counter() - start < 200
    record = strict_json(tmp_path / "run" / "results.json")
    assert record["status"] == "failed" and record["options"]["timeout"] == 5
    assert any(word in record["error"].lower() for word in ("timed out", "timeout")), record["error"]
    assert "dlcourse train: error:" in stderr
