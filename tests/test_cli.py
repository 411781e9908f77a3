"""The `dlcourse` command line, run as a user runs it: in a separate process, on the bundled tiny sample.

The workflow: lr-find -> train (checkpoints, --save-best) -> train --resume -> finetune -> predict; --help without
PyTorch; one-line errors. The faults (divergence, run folders, refused settings) are in test_faults.py.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli


# Tiny settings: 32px, 1 epoch of 240 images; seconds on one CPU thread.
TINY = ["--size", "32", "--epochs", "1", "--bs", "32", "--lr", "1e-2", "--no-progress"]

# A Ctrl-C right after the checkpoint of epoch 0 is written: what a user pressing Ctrl-C then would do. The hook lives
# here, in the test, not in the package.
INTERRUPT_AFTER_FIRST_EPOCH = """
import sys
from dlcourse.transfer import SaveCheckpoint
after_epoch = SaveCheckpoint.after_epoch
def interrupt_after_first_epoch(self, learn):
    after_epoch(self, learn)
    if learn.epoch == 0:
        raise KeyboardInterrupt
SaveCheckpoint.after_epoch = interrupt_after_first_epoch
from dlcourse.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """One 3-epoch run (--save-best) shared by the tests of resume, finetune and predict: (folder, results)."""
    where = tmp_path_factory.mktemp("trained")
    proc = run_cli(["train", *TINY, "--epochs", "3", "--save-best", "--out", where / "full"], where, cache)
    assert proc.returncode == 0, proc.stderr
    return where / "full", json.loads((where / "full" / "results.json").read_text())


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def test_train_tiny_writes_every_output(dlcourse, tmp_path):
    out = tmp_path / "run"
    proc = dlcourse("train", *TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"run folder: {out}" in proc.stdout
    assert "train_loss" in proc.stdout and "accuracy" in proc.stdout  # the epoch table, even without bars
    assert "throughput" in proc.stdout  # the summary table
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl", "model.safetensors",
                                                     "results.json", "training.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["subcommand"] == "train"
    assert len(results["epochs"]) == 1
    assert 0 <= results["accuracy"] <= 1
    assert results["epochs"][-1]["accuracy"] == results["accuracy"]
    assert results["settings"]["size"] == 32 and results["settings"]["epochs"] == 1
    assert (results["n_train"], results["n_valid"]) == (240, 120)
    assert results["images_per_second"] > 0 and results["fit_seconds"] > 0
    assert results["device"]["type"] == "cpu" and results["resolved"]["precision"] == "fp32"
    assert set(results["versions"]) >= {"python", "torch", "dlcourse"}
    prep = results["preprocessing"]
    assert (prep["size"], prep["resize"], len(prep["mean"]), prep["classes"]) == (32, "crop", 3, results["classes"])
    assert results["model"]["arch"] == "xresnet18" and results["model"]["head"] == "xresnet"
    assert [m["accuracy"] for m in metrics(out)] == [r["accuracy"] for r in results["epochs"]]
    assert [m["epoch"] for m in metrics(out)] == [0]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert checkpoint_files(out / "checkpoint")["epoch"] == 1
    check_weights(out / "model.safetensors", results)


def checkpoint_files(folder, name="last"):
    from dlcourse.transfer import checkpoint_files
    return checkpoint_files(folder, name)


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
    assert json.loads(meta["preprocessing"]) == results["preprocessing"]
    assert {k: v for k, v in meta.items() if k in results["settings"]} == {k: str(v) for k, v in results["settings"].items()}
    model = make_model(TrainConfig(width=results["settings"]["width"]), len(results["classes"]))
    load_weights(model, path)
    cfg = TrainConfig(size=32, bs=32, progress=False)
    dls = make_dls(cfg, resolve_data("tiny"), torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in dls.valid)
    assert correct / 120 == pytest.approx(results["accuracy"], abs=1e-6)


def test_runs_get_numbered_folders(dlcourse, tmp_path):
    """Without --out each run takes the next runs/train-NNN: a second run never lands in the first one's folder."""
    for _ in range(2):
        proc = dlcourse("train", *TINY, "--size", "16")
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["train-001", "train-002"]
    assert "run folder: runs/train-002" in proc.stdout


def test_lr_find_suggests_a_rate_that_trains(dlcourse, tmp_path):
    """lr-find prints its suggestion and the exact train command; the command runs and trains at that rate."""
    proc = dlcourse("lr-find", "--size", "32", "--bs", "32", "--no-progress", "--num-it", "30", "--out", tmp_path / "lr")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    suggestion = float(next(l for l in lines if l.startswith("suggested learning rate:")).split()[3])
    command = next(l for l in lines if l.startswith("dlcourse train"))
    assert command == f"dlcourse train --size 32 --bs 32 --no-progress --lr {suggestion:.1e}"
    assert (tmp_path / "lr" / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((tmp_path / "lr" / "results.json").read_text())
    assert found["suggestion"] == suggestion and len(found["lrs"]) == len(found["losses"]) <= 30
    words = shlex.split(command)[1:] + ["--epochs", "1", "--out", str(tmp_path / "run")]
    proc = dlcourse(*words)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"]["lr"] == suggestion


def test_checkpoints_every_epoch_and_the_best(trained):
    folder, results = trained
    rows = metrics(folder)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert checkpoint_files(folder / "checkpoint")["epoch"] == 3
    accuracies = [r["accuracy"] for r in rows]
    best = accuracies.index(max(accuracies))
    assert checkpoint_files(folder / "checkpoint", "best")["epoch"] == best + 1
    assert results["outputs"]["checkpoint"] == str(folder / "checkpoint")


def test_resume_gives_the_same_losses(trained, tmp_path, cache):
    """Interrupted after epoch 0 of 3 (Ctrl-C), then resumed: every epoch's losses equal the uninterrupted run's."""
    full, _ = trained
    args = ["train", *TINY, "--epochs", "3", "--save-best", "--out", tmp_path / "cut"]
    proc = run_cli(args, tmp_path, cache, code=INTERRUPT_AFTER_FIRST_EPOCH)
    assert_one_line_error(proc, 130, "interrupted after 1 of 3 epochs", f"dlcourse train --resume {tmp_path / 'cut'}")
    record = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert record["status"] == "interrupted" and len(record["epochs"]) == 1
    proc = run_cli(["train", "--resume", tmp_path / "cut"], tmp_path, cache)
    assert proc.returncode == 0, proc.stderr
    keys = ["epoch", "train_loss", "valid_loss", "accuracy"]
    assert [{k: r[k] for k in keys} for r in metrics(tmp_path / "cut")] == [{k: r[k] for k in keys} for r in metrics(full)]
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["status"] == "finished" and "error" not in resumed
    assert resumed["resumed_by"] == [f"dlcourse train --resume {tmp_path / 'cut'}"]
    assert [r["epoch"] for r in resumed["epochs"]] == [0, 1, 2]


def test_resume_refuses_what_it_cannot_do(trained, dlcourse, tmp_path):
    full, _ = trained
    assert_one_line_error(dlcourse("train", "--resume", full), 2, "finished all its 3 epochs: nothing to resume")
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    record = json.loads((interrupted / "results.json").read_text())
    (interrupted / "results.json").write_text(json.dumps({**record, "status": "interrupted"}))
    assert_one_line_error(dlcourse("train", "--resume", interrupted, "--lr", "0.5"), 2,
                          "--lr 0.5 conflicts with the run's lr = 0.01", "keeps the settings it started with")
    assert_one_line_error(dlcourse("train", "--resume", interrupted, "--out", tmp_path / "x"), 2, "--out does not go")
    assert_one_line_error(dlcourse("train", "--resume", tmp_path), 2, "is not a run folder")


def test_finetune_to_new_classes(trained, dlcourse, tmp_path):
    """finetune puts a new head for 3 classes on the trained body: frozen epochs, then unfrozen, as one numbering."""
    from dlcourse.datasets import tiny_imagenette
    full, _ = trained
    data = tmp_path / "three"
    for part in ("train", "val"):
        for wnid in ("n01440764", "n02102040", "n03000684"):
            shutil.copytree(tiny_imagenette() / part / wnid, data / part / wnid)
    proc = dlcourse("finetune", "--from", full, "--data", data, "--freeze-epochs", "1", "--epochs", "2", "--size", "32",
                    "--bs", "16", "--no-progress", "--out", tmp_path / "ft")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["subcommand"] == "finetune" and results["status"] == "finished"
    assert results["classes"] == ["n01440764", "n02102040", "n03000684"]
    assert results["model"] == {"arch": "xresnet18", "act": "relu", "width": results["settings"]["width"],
                                "n_classes": 3, "head": "transfer"}
    rows = metrics(tmp_path / "ft")
    assert [(r["epoch"], r["phase"]) for r in rows] == [(0, "frozen"), (1, "unfrozen"), (2, "unfrozen")]
    assert sorted(p.name for p in (tmp_path / "ft").iterdir()) == ["checkpoint", "metrics.jsonl", "model.safetensors",
                                                                  "results.json", "training.png"]
    proc = dlcourse("predict", "--model", tmp_path / "ft", "--json", data / "val")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    assert len(predictions) == 36 and {p["predictions"][0]["class"] for p in predictions} <= set(results["classes"])
    top1 = sum(Path(p["image"]).parent.name == p["predictions"][0]["class"] for p in predictions) / 36
    assert top1 == pytest.approx(results["accuracy"], abs=1e-6)
    assert_one_line_error(dlcourse("finetune", "--from", full, "--data", data, "--arch", "xresnet34"), 2,
                          "--arch xresnet34 conflicts with the model of", "keeps the trained architecture")


def test_predict_uses_the_training_preprocessing(trained, dlcourse):
    """predict on the validation folder gives the run's own validation accuracy: same resize, normalisation, classes."""
    from dlcourse.datasets import tiny_imagenette
    full, results = trained
    proc = dlcourse("predict", "--model", full, "--json", "--top-k", "2", tiny_imagenette() / "val")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    assert len(predictions) == 120 and all(len(p["predictions"]) == 2 for p in predictions)
    for p in predictions:
        probs = [c["probability"] for c in p["predictions"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    top1 = sum(Path(p["image"]).parent.name == p["predictions"][0]["class"] for p in predictions) / 120
    assert top1 == pytest.approx(results["accuracy"], abs=1e-6)
    image = sorted((tiny_imagenette() / "val" / "n01440764").iterdir())[0]
    proc = dlcourse("predict", "--model", full, image)
    assert proc.returncode == 0, proc.stderr
    header, line = proc.stdout.strip().splitlines()
    assert header.split() == ["image", "predictions"] and line.startswith(str(image)) and line.count("%") == 3
    assert_one_line_error(dlcourse("predict", "--model", full, "nowhere.jpg"), 1, "nowhere.jpg: no such file")
    assert_one_line_error(dlcourse("predict", "--model", full.parent, image), 1, "no trained model there")


def test_load_model_from_a_run(trained):
    """Every way of naming a run's weights loads them; each slot predicts the validation accuracy of its epoch."""
    import torch
    from dlcourse.cli import image_batch, image_files, load_model
    from dlcourse.datasets import tiny_imagenette
    full, results = trained
    files = image_files([tiny_imagenette() / "val"])
    labels = torch.tensor([results["classes"].index(f.parent.name) for f in files])
    batch = image_batch(files, results["preprocessing"])
    logits = {}
    for where, slot in [(full, None), (full, "best"), (full / "checkpoint", None), (full / "model.safetensors", None)]:
        model, prep = load_model(where, slot=slot)
        assert prep == results["preprocessing"] and not model.training
        with torch.no_grad():
            logits[where.name, slot] = model(batch)
    final = logits[full.name, None]
    assert final.shape == (120, 10)
    # the run's weights, its last checkpoint and the weights file are the same model
    assert torch.equal(logits["checkpoint", None], final) and torch.equal(logits["model.safetensors", None], final)
    accuracy = lambda out: (out.argmax(1) == labels).float().mean().item()
    assert accuracy(final) == pytest.approx(results["accuracy"], abs=1e-6)
    best = checkpoint_files(full / "checkpoint", "best")["epoch"]  # the epochs done when it was saved
    assert results["epochs"][best - 1]["accuracy"] == max(row["accuracy"] for row in results["epochs"])
    assert accuracy(logits[full.name, "best"]) == pytest.approx(results["epochs"][best - 1]["accuracy"], abs=1e-6)
    if best == len(results["epochs"]):  # the last epoch was the best: the best slot holds the final weights
        assert torch.equal(logits[full.name, "best"], final)


def test_help_explains_every_flag(dlcourse):
    """Every TrainConfig field is a flag, with the field's help and default; plus the commands' own options."""
    from dataclasses import fields
    from dlcourse.config import TrainConfig
    proc = dlcourse("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in proc.stdout, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    for flag in ["--out", "--no-progress", "--no-compile", "--channels-last {auto,on,off}", "--num-workers",
                 "--save-best", "--resume", "--timeout", "--skip-bad-images", "--no-stop-on-nan", "--width"]:
        assert flag in proc.stdout, flag
    assert "auto" in proc.stdout and "bf16" in proc.stdout  # the precision choices
    assert f"image size in pixels (train and validation) (default: {TrainConfig().size})" in text  # defaults shown
    for command, flags in [("lr-find", ["--num-it", "--start-lr", "--end-lr"]), ("finetune", ["--from", "--freeze-epochs"]),
                           ("predict", ["--model", "--top-k", "--json", "--checkpoint {last,best}", "IMAGE_OR_FOLDER"])]:
        proc = dlcourse(command, "--help")
        assert proc.returncode == 0 and all(flag in proc.stdout for flag in flags), (command, proc.stdout)


def test_help_and_usage_errors_need_no_torch(tmp_path):
    """A fresh interpreter answers --help and usage errors without importing PyTorch (it takes seconds to load)."""
    code = ("import sys, contextlib, io\nfrom dlcourse.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    codes = [main(a) for a in (['--help'], ['train', '--help'], ['lr-find', '--help'], ['finetune', '--help'],"
            " ['predict', '--help'], ['train', '--epochs', '0'], ['train', '--lr', 'nan'], ['predict'], [])]\n"
            "print(codes, sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[0, 0, 0, 0, 0, 2, 2, 2, 2] []", proc.stdout + proc.stderr


def test_predict_checks_the_images_first(tmp_path):
    """A missing image is the error, before the model is looked for and before PyTorch is loaded."""
    code = ("import sys, contextlib, io\nfrom dlcourse.cli import main\nerr = io.StringIO()\n"
            "with contextlib.redirect_stderr(err):\n"
            "    status = main(['predict', '--model', 'nowhere', 'missing.jpg'])\n"
            "print(status, 'torch' in sys.modules, err.getvalue().strip())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    expected = "1 False dlcourse predict: error: missing.jpg: no such file or folder"
    assert proc.stdout.strip() == expected, proc.stdout + proc.stderr


def test_flags_make_the_config():
    """Parsing the flags gives the TrainConfig they name; no flag gives the defaults."""
    from dlcourse.cli import config_from_args, given_flags, make_parser
    from dlcourse.config import TrainConfig
    parser = make_parser()
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()
    args = parser.parse_args(["train", "--num-workers", "2", "--channels-last", "off", "--compile", "--no-progress",
                              "--label-smoothing", "0", "--opt", "ranger"])
    assert config_from_args(args) == TrainConfig(num_workers=2, channels_last=False, compile=True, progress=False,
                                                 label_smoothing=0., opt="ranger")
    assert given_flags(["train", "--opt", "adam", "--no-progress"]) == {"opt", "progress"}


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
    proc = dlcourse("train", *args, "--out", tmp_path / "out")
    assert_one_line_error(proc, 2, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, status, words", [
    (["lr-find", "--num-it", "0"], 2, ["dlcourse lr-find: error: argument --num-it", "must be a finite number >= 2"]),
    (["lr-find", "--size", "32", "--data", "nowhere"], 1, ["data 'nowhere'", "no such file or folder"]),
    (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], 2, ["--start-lr 1 must be below --end-lr 0.1"]),
    (["finetune", "--freeze-epochs", "-1"], 2, ["dlcourse finetune: error: argument --freeze-epochs", ">= 0"]),
    (["finetune", "--size", "32", "--from", "nowhere"], 1, ["nowhere: no trained model there"]),
    (["predict", "--top-k", "0", "--model", "nowhere", "x.jpg"], 2, ["dlcourse predict: error: argument --top-k"]),
    (["predict", "--model", "nowhere", "x.jpg"], 1, ["nowhere: no trained model there"]),
    (["train", "--resume", "nowhere"], 2, ["nowhere is not a run folder of dlcourse"]),
])
def test_every_command_refuses_bad_arguments_and_missing_files(dlcourse, tmp_path, args, status, words):
    """Each command: a bad argument is a usage error (2), a missing file a failure (1); one line, nothing written."""
    (tmp_path / "x.jpg").write_bytes(b"")  # an image that exists: predict's missing model is what is wrong
    assert_one_line_error(dlcourse(*args), status, *words)
    if args[0] != "predict" and "--resume" not in args:  # the commands that make a new run folder
        assert not (tmp_path / "runs").exists()


def test_missing_data(dlcourse, tmp_path):
    proc = dlcourse("train", *TINY, "--data", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "nowhere", "no such file or folder")
    assert not (tmp_path / "out").exists()  # the run folder is made once the data are ready


def test_folder_without_dataset_layout(dlcourse, tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    proc = dlcourse("train", *TINY, "--data", tmp_path / "data", "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "not an image dataset folder", "train/<class>")


def test_empty_training_folder(dlcourse, tmp_path):
    for part in ("train", "val"):
        (tmp_path / "data" / part / "n01440764").mkdir(parents=True)
    proc = dlcourse("train", *TINY, "--data", tmp_path / "data", "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "no training images")


@pytest.mark.parametrize("loader", ["cached", "items"])
def test_corrupt_image(dlcourse, tmp_path, loader):
    """A truncated JPEG in a copy of the tiny sample: one line naming the file, on both data paths."""
    from dlcourse.datasets import tiny_imagenette
    data = tmp_path / "data"
    shutil.copytree(tiny_imagenette(), data)
    victim = sorted((data / "train" / "n01440764").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    proc = dlcourse("train", *TINY, "--loader", loader, "--data", data, "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, victim.name)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_gpu(dlcourse, tmp_path):
    proc = dlcourse("train", *TINY, "--device", "cuda", "--out", tmp_path / "out")
    assert_one_line_error(proc, 1, "no CUDA GPU")


def test_no_command_prints_help(dlcourse):
    proc = dlcourse()
    assert proc.returncode == 2
    assert "train" in proc.stdout and "predict" in proc.stdout and "lr-find" in proc.stdout


def test_no_bar_spam_in_logs(dlcourse, tmp_path):
    """With stderr not a terminal (a pipe, a log file), progress bars stay off: no carriage returns in the log."""
    proc = dlcourse("train", "--size", "16", "--epochs", "1", "--out", tmp_path / "out")  # progress left on
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
    assert "train_loss" in proc.stdout


def test_cli_leaves_matplotlib_backend_alone(tmp_path, cache):
    """Running a command in-process (in a notebook, say) does not switch the caller's matplotlib backend."""
    code = ("import sys, matplotlib\nmatplotlib.use('svg')\nfrom dlcourse.cli import main\n"
            "status = main(sys.argv[1:])\nprint(status, matplotlib.get_backend())")
    proc = run_cli(["train", *TINY, "--size", "16", "--out", tmp_path / "out"], tmp_path, cache, code=code)
    assert proc.stdout.strip().splitlines()[-1] == "0 svg", proc.stdout + proc.stderr
    assert (tmp_path / "out" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script(tmp_path):
    """The installed `dlcourse` script (settings.ini console_scripts), when the package is installed with it."""
    script = Path(sys.executable).parent / "dlcourse"
    if not script.exists():
        pytest.skip("the dlcourse console script is not installed (pip install -e . after settings.ini's console_scripts)")
    proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--label-smoothing" in proc.stdout


def test_archives_with_same_name_and_size_extract_apart(tmp_path, monkeypatch):
    """Two different archives named alike, of the same size and whole-second mtime, must not share an extraction."""
    import io
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
