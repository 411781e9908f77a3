"""The `dlcourse train` command line, run as a user runs it: in a separate process, on the bundled tiny sample."""
import json
import shutil
import sys
from pathlib import Path

import pytest

# Tiny settings: 32px, 1 epoch of 240 images; seconds on one CPU thread.
TINY = ["--size", "32", "--epochs", "1", "--bs", "32", "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One image cache for the module's runs, away from the user's own."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def dlcourse(run_py, cache):
    """Run `python -m dlcourse ARGS` with one torch thread and a private cache; return the CompletedProcess."""
    def run(*args, timeout=300):
        return run_py("-m", "dlcourse", *args, timeout=timeout,
                      env={"OMP_NUM_THREADS": "1", "DLCOURSE_CACHE": str(cache), "DLCOURSE_DEBUG": ""})
    return run


def assert_one_line_error(proc, status, *words):
    """The process failed with `status` and a single stderr line that contains `words`, and no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_train_tiny_writes_every_output(dlcourse, tmp_path):
    out = tmp_path / "run"
    proc = dlcourse("train", *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "train_loss" in proc.stdout and "accuracy" in proc.stdout  # the epoch table, even without bars
    assert "throughput" in proc.stdout  # the summary table
    results = json.loads((out / "results.json").read_text())
    assert len(results["epochs"]) == 1
    assert 0 <= results["accuracy"] <= 1
    assert results["epochs"][-1]["accuracy"] == results["accuracy"]
    assert results["settings"]["size"] == 32 and results["settings"]["epochs"] == 1
    assert (results["n_train"], results["n_valid"]) == (240, 120)
    assert results["images_per_second"] > 0 and results["fit_seconds"] > 0
    assert results["device"]["type"] == "cpu" and results["resolved"]["precision"] == "fp32"
    assert set(results["versions"]) >= {"python", "torch", "dlcourse"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["accuracy"] for m in metrics] == [r["accuracy"] for r in results["epochs"]]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_weights(out / "model.safetensors", results)


def check_weights(path, results):
    """The weights file loads into a fresh model of the run's architecture, and predicts what the run measured."""
    import torch
    from dlcourse.datasets import resolve_data
    from dlcourse.train import TrainConfig, make_dls, make_model
    from dlcourse.transfer import load_weights
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "xresnet18" and json.loads(meta["classes"]) == results["classes"]
    assert {k: v for k, v in meta.items() if k in results["settings"]} == {k: str(v) for k, v in results["settings"].items()}
    model = make_model(TrainConfig(), len(results["classes"]))
    load_weights(model, path)
    cfg = TrainConfig(size=32, bs=32, progress=False)
    dls = make_dls(cfg, resolve_data("tiny"), torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in dls.valid)
    assert correct / 120 == pytest.approx(results["accuracy"], abs=1e-6)


def test_help_explains_every_flag(dlcourse):
    """Every TrainConfig field is a flag, with the field's help and default; plus --out and the --no-x switches."""
    from dataclasses import fields
    from dlcourse.train import TrainConfig
    proc = dlcourse("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in proc.stdout, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    for flag in ["--out", "--no-progress", "--no-compile", "--channels-last {auto,on,off}", "--num-workers"]:
        assert flag in proc.stdout, flag
    assert "auto" in proc.stdout and "bf16" in proc.stdout  # the precision choices
    assert "image size in pixels (train and validation) (default: 64)" in text  # defaults shown


def test_flags_make_the_config():
    """Parsing the flags gives the TrainConfig they name; no flag gives the defaults."""
    from dlcourse.cli import config_from_args, make_parser
    from dlcourse.train import TrainConfig
    parser = make_parser()
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    args = parser.parse_args(["train", "--num-workers", "2", "--channels-last", "off", "--compile", "--no-progress",
                              "--label-smoothing", "0", "--opt", "ranger"])
    assert config_from_args(args) == TrainConfig(num_workers=2, channels_last=False, compile=True, progress=False,
                                                 label_smoothing=0., opt="ranger")


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["--epochs", "must be >= 1"]),
    (["--bs", "1"], ["--bs", "must be >= 2"]),
    (["--lr", "fast"], ["--lr", "'fast' is not a number"]),
    (["--arch", "resnet9"], ["--arch", "must be one of xresnet18", "'resnet9'"]),
    (["--precision", "fp8"], ["--precision", "must be one of auto, fp32, bf16, fp16"]),
    (["--device", "gpu"], ["--device", "'gpu'"]),
    (["--label-smoothing", "1.5"], ["--label-smoothing", "<= 0.99"]),
    (["--num-workers", "-1"], ["--num-workers", "must be >= 0"]),
    (["--channels-last", "yes"], ["--channels-last", "'yes' is not one of auto, on, off"]),
    (["--workers", "2"], ["unrecognized arguments: --workers"]),
    (["--no-such-flag"], ["unrecognized arguments"]),
])
def test_bad_arguments(dlcourse, tmp_path, args, words):
    proc = dlcourse("train", *args, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, *words)
    assert not (tmp_path / "out").exists()


def test_missing_data(dlcourse, tmp_path):
    proc = dlcourse("train", *TINY, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 1, "nowhere", "no such file or folder")


def test_folder_without_dataset_layout(dlcourse, tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    proc = dlcourse("train", *TINY, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 1, "not an image dataset folder", "train/<class>")


def test_empty_training_folder(dlcourse, tmp_path):
    for part in ("train", "val"):
        (tmp_path / "data" / part / "n01440764").mkdir(parents=True)
    proc = dlcourse("train", *TINY, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 1, "no training images")


@pytest.mark.parametrize("loader", ["cached", "items"])
def test_corrupt_image(dlcourse, tmp_path, loader):
    """A truncated JPEG in a copy of the tiny sample: one line naming the file, on both data paths."""
    from dlcourse.datasets import tiny_imagenette
    data = tmp_path / "data"
    shutil.copytree(tiny_imagenette(), data)
    victim = sorted((data / "train" / "n01440764").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    proc = dlcourse("train", *TINY, "--loader", loader, "--data", str(data), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 1, victim.name)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_gpu(dlcourse, tmp_path):
    proc = dlcourse("train", *TINY, "--device", "cuda", "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 1, "no CUDA GPU")


def test_no_command_prints_help(dlcourse):
    proc = dlcourse()
    assert proc.returncode == 2
    assert "train" in proc.stdout


def test_console_script(tmp_path):
    """The installed `dlcourse` script (settings.ini console_scripts), when the package is installed with it."""
    import subprocess
    script = Path(sys.executable).parent / "dlcourse"
    if not script.exists():
        pytest.skip("the dlcourse console script is not installed (pip install -e . after settings.ini's console_scripts)")
    proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--label-smoothing" in proc.stdout


def test_archives_with_same_name_and_size_extract_apart(tmp_path, monkeypatch):
    """Two different archives named alike, of the same size and whole-second mtime, must not share an extraction."""
    import io
    import os
    import tarfile
    monkeypatch.setenv("DLCOURSE_CACHE", str(tmp_path / "cache"))
    from dlcourse.datasets import extract_once
    archives = []
    for folder, content in (("a", b"first"), ("b", b"other")):
        (tmp_path / folder).mkdir()
        archive = tmp_path / folder / "ds.tar"
        with tarfile.open(archive, "w") as tar:
            info = tarfile.TarInfo("ds/x.txt")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        os.utime(archive, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
        archives.append(archive)
    assert archives[0].stat().st_size == archives[1].stat().st_size
    out_a, out_b = (extract_once(a) for a in archives)
    assert (out_a / "ds" / "x.txt").read_bytes() == b"first"
    assert (out_b / "ds" / "x.txt").read_bytes() == b"other"
    assert extract_once(archives[0]) == out_a  # extracted once, then reused
    assert not list(out_a.parent.glob("*.part"))
