"""DDP as a notebook cannot hold it: 2 processes launched by torchrun, gloo on the CPU, the bundled tiny Imagenette.

Run as a test: `pytest tests/test_distributed.py`. The same file is the worker script torchrun starts:
`torchrun --nproc_per_node=2 tests/test_distributed.py train OUT_DIR CACHE_DIR` (or `fail`, `timeout`).
"""
import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from conftest import ROOT, free_port
SEED = 0
BS = 16  # per rank; the single-process reference uses the same global batch, 2 * BS
N_VALID = 115  # an odd validation set for the DataLoader path: shards of 58 and 57 items (padding would count one twice)
EPOCHS = 2  # two, so that a missing set_epoch (the same order twice) would show


# ---------------------------------------------------------------- shared by the workers and the reference runs

def make_model(batchnorm:bool=False) -> nn.Module:
    """A small CNN for 32px images (with BatchNorm when asked)."""
    norm = [nn.BatchNorm2d(16)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), *norm, nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def device_dls(cache, bs:int):
    """The tiny sample at 32px as DeviceLoaders on the CPU, without augmentation (none is asked for: runs are comparable).

    drop_last=True: the training shards are trimmed to a multiple of the world size and the last partial batch is
    dropped, on each rank and in the single-process reference alike."""
    from dlcourse.datasets import tiny_imagenette
    from dlcourse.fastdata import cached_dataloaders
    return cached_dataloaders(tiny_imagenette(), size=32, bs=bs, valid_name="val", device="cpu", cache=cache,
                              drop_last=True, progress=False)


def tensors(cache):
    """The same images as float tensors: (x_train, y_train, x_valid, y_valid), the validation set cut to N_VALID."""
    from dlcourse.datablock import compose
    dls = device_dls(cache, BS)
    x_train = compose(dls.train.images, dls.valid.batch_tfms)  # (240, 3, 32, 32)
    x_valid = compose(dls.valid.images, dls.valid.batch_tfms)[:N_VALID]  # (115, 3, 32, 32)
    return x_train, dls.train.labels, x_valid, dls.valid.labels[:N_VALID]


def learner(model, dls, cbs=(), progress=True):
    from dlcourse.learner import Learner, accuracy
    return Learner(model, dls, lr=0.1, opt_func=partial(torch.optim.SGD, momentum=0.9), metrics=[accuracy],
                   device="cpu", cbs=cbs, progress=progress)


# ---------------------------------------------------------------- the worker torchrun starts

def _callbacks():
    """Test callbacks: one that writes a file per epoch (rank 0 only), one that fails on demand."""
    import torch.distributed as dist
    from dlcourse.distributed import get_rank
    from dlcourse.learner import Callback

    class SaveCB(Callback):
        """Writes a file after each epoch, named after the rank that wrote it."""
        main_process_only = True

        def __init__(self, folder, tag):
            self.folder, self.tag = Path(folder), tag

        def _write(self, name):
            self.folder.mkdir(exist_ok=True)
            (self.folder / f"{self.tag}-rank{get_rank()}-{name}.json").write_text("{}")

        def before_fit(self, learn):
            self._write("before_fit")  # on rank 0 only: elsewhere the callback is removed before its before_fit

        def after_epoch(self, learn):
            self._write(f"epoch{learn.epoch}")

    class FailCB(Callback):
        """Raises on `rank`'s third training batch."""
        def __init__(self, rank):
            self.rank = rank

        def after_batch(self, learn):
            if learn.training and learn.iter == 2 and get_rank() == self.rank:
                raise RuntimeError(f"rank {self.rank} fails on purpose")

    class ProbeCB(Callback):
        """After DistributedTraining's clean-up (its order is lower): is the group gone and the model plain again?"""

        def __init__(self, out):
            self.out = Path(out)

        def after_fit(self, learn):
            state = {"group_initialized": dist.is_initialized(), "model": type(learn.model).__name__}
            (self.out / f"after_fit-rank{os.environ['RANK']}.json").write_text(json.dumps(state))

    return SaveCB, FailCB, ProbeCB


def _fit(name, model, dls, out, epochs=EPOCHS):
    """Fit under DistributedTraining; return what the parent checks (weights, history, printed text, state after fit)."""
    import torch.distributed as dist
    from dlcourse.distributed import DistributedTraining
    SaveCB, _, _ = _callbacks()
    learn = learner(model, dls, cbs=[DistributedTraining(seed=SEED), SaveCB(Path(out) / "files", name)])
    printed = io.StringIO()
    with redirect_stdout(printed):
        learn.fit(epochs)
    return {"state": {k: v.clone() for k, v in learn.model.state_dict().items()}, "history": learn.recorder.history,
            "printed": printed.getvalue(), "model": type(learn.model).__name__,
            "group_initialized": dist.is_initialized(), "has_progress": any(type(cb).__name__ == "ProgressBar"
                                                                             for cb in learn.cbs)}


def worker_train(out, cache):
    """Three fits on each rank: DeviceLoader path, DataLoader path, a BatchNorm model; results saved per rank."""
    from dlcourse.core import set_seed
    from dlcourse.learner import DataLoaders
    rank = int(os.environ["RANK"])
    results = {}
    set_seed(SEED + rank)  # different on each rank: DDP must broadcast rank 0's initial weights
    results["device"] = _fit("device", make_model(), device_dls(cache, BS), out)
    x_train, y_train, x_valid, y_valid = tensors(cache)
    dls = DataLoaders.from_datasets(TensorDataset(x_train, y_train), TensorDataset(x_valid, y_valid), bs=BS)
    set_seed(SEED + rank)
    results["torch"] = _fit("torch", make_model(), dls, out)
    set_seed(SEED + rank)
    results["bn"] = _fit("bn", make_model(batchnorm=True), device_dls(cache, BS), out, epochs=1)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def worker_fail(out, cache):
    """Rank 1 raises in its third batch while rank 0 waits in the gradient all-reduce."""
    from dlcourse.distributed import DistributedTraining
    _, FailCB, ProbeCB = _callbacks()
    learn = learner(make_model(), device_dls(cache, BS), cbs=[DistributedTraining(), FailCB(rank=1), ProbeCB(out)],
                    progress=False)
    learn.fit(EPOCHS)


def worker_timeout(out, cache):
    """Rank 1 does not come: rank 0 waits 2 s in an all-reduce, then in a barrier; what gloo raises, and is_timeout's word."""
    import torch.distributed as dist
    from dlcourse.distributed import init_distributed, is_timeout
    init_distributed("cpu", timeout_s=2)
    done = Path(out) / "timeouts.json"
    if dist.get_rank() == 1:
        for _ in range(300):  # until rank 0 is done, 30 s at most
            if done.exists():
                break
            time.sleep(0.1)
        os._exit(0)  # no clean-up: the group is broken
    errors = []
    for collective in (lambda: dist.all_reduce(torch.ones(3)), dist.barrier):
        try:
            collective()
        except RuntimeError as err:
            errors.append({"type": type(err).__name__, "text": str(err), "is_timeout": is_timeout(err)})
    done.write_text(json.dumps(errors))
    os._exit(0)


# ---------------------------------------------------------------- the tests (the parent process)


def torchrun(mode, out, cache, timeout=90):
    """Launch this file on 2 CPU processes with a free port; return (CompletedProcess, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, mode, str(out), str(cache)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: on a timeout we stop the workers too
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.perf_counter() - start


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An image cache of the tiny sample, built once here so the two ranks only read it."""
    folder = tmp_path_factory.mktemp("cache")
    device_dls(folder, BS)
    return folder


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """One 2-process launch of `worker_train`; yields its output folder and both ranks' results."""
    out = tmp_path_factory.mktemp("ddp")
    proc, seconds = torchrun("train", out, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"2-process launch: {seconds:.1f}s")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


class EpochPermutation(Sampler):
    """Epoch e visits the items in torch.randperm(n) drawn from a generator seeded seed + e (DistributedSampler's rule)."""
    def __init__(self, n, seed):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        return iter(order.tolist())


def reference_device(cache):
    """One process, batch 2 * BS, the same per-epoch shuffles (DeviceLoader draws from the global RNG, seeded per epoch)."""
    from dlcourse.core import set_seed
    from dlcourse.learner import Callback

    class SeedEachEpoch(Callback):
        def before_epoch(self, learn):
            torch.manual_seed(SEED + learn.epoch)

    set_seed(SEED)
    learn = learner(make_model(), device_dls(cache, 2 * BS), cbs=[SeedEachEpoch()], progress=False)
    learn.fit(EPOCHS)
    return learn


def reference_torch(cache):
    """One process, batch 2 * BS, over the same tensors and the same per-epoch shuffles."""
    from dlcourse.core import set_seed
    from dlcourse.learner import DataLoaders
    x_train, y_train, x_valid, y_valid = tensors(cache)
    train = DataLoader(TensorDataset(x_train, y_train), 2 * BS, sampler=EpochPermutation(len(y_train), SEED))
    valid = DataLoader(TensorDataset(x_valid, y_valid), 4 * BS)
    set_seed(SEED)
    learn = learner(make_model(), DataLoaders(train, valid), progress=False)
    learn.fit(EPOCHS)
    return learn


@pytest.mark.parametrize("case", ["device", "torch", "bn"])
def test_ranks_hold_identical_weights(run, case):
    _, (rank0, rank1) = run
    state0, state1 = rank0[case]["state"], rank1[case]["state"]
    assert state0.keys() == state1.keys()
    for k in state0:  # parameters and BatchNorm buffers, bit for bit
        assert torch.equal(state0[k], state1[k]), k


@pytest.mark.parametrize("case, reference", [("device", reference_device), ("torch", reference_torch)])
def test_equals_single_process_with_same_global_batch(run, cache, case, reference):
    _, (rank0, _) = run
    learn = reference(cache)
    expected = learn.model.state_dict()
    initial = make_model().state_dict()
    for k, v in rank0[case]["state"].items():
        assert (expected[k] - initial[k]).abs().max() > 1e-3, "training must have moved the weights"
        torch.testing.assert_close(v, expected[k], atol=2e-5, rtol=1e-4)
    for row, ref_row in zip(rank0[case]["history"], learn.recorder.history, strict=True):
        assert abs(row["accuracy"] - ref_row["accuracy"]) < 1e-9  # all-reduced over ranks = the single-process value
        assert abs(row["valid_loss"] - ref_row["valid_loss"]) < 1e-4
        assert abs(row["train_loss"] - ref_row["train_loss"]) < 1e-4


def test_valid_accuracy_counts_every_item_once(run):
    """Accuracy x items is a whole number of correct items, the same on both ranks (no padding counted twice)."""
    _, (rank0, rank1) = run
    for case, n in [("device", 120), ("torch", N_VALID)]:
        for row0, row1 in zip(rank0[case]["history"], rank1[case]["history"]):
            assert row0["accuracy"] == row1["accuracy"]
            correct = row0["accuracy"] * n
            assert abs(correct - round(correct)) < 1e-6, (case, correct)


def test_bn_accuracy_is_rank0_models(run, cache):
    """With BatchNorm, every rank validates with rank 0's statistics: the reported accuracy is that model's."""
    _, (rank0, _) = run
    model = make_model(batchnorm=True)
    model.load_state_dict(rank0["bn"]["state"])
    learn = learner(model, device_dls(cache, BS), progress=False)
    preds, targets = learn.get_preds()
    expected = (preds.argmax(1) == targets).float().mean().item()
    assert abs(rank0["bn"]["history"][-1]["accuracy"] - expected) < 1e-9


def test_only_rank0_prints_and_writes(run):
    out, (rank0, rank1) = run
    written = sorted(p.name for p in (out / "files").iterdir())
    expected = sorted(f"{case}-rank0-{name}.json" for case, n in [("device", 2), ("torch", 2), ("bn", 1)]
                      for name in ["before_fit", *(f"epoch{e}" for e in range(n))])
    assert written == expected
    assert "valid_loss" in rank0["device"]["printed"] and "accuracy" in rank0["device"]["printed"]
    assert rank1["device"]["printed"] == ""


def test_learner_restored_after_fit(run):
    """The model is the plain module again (predict and save work), ProgressBar is back on rank 1, and the process group
    stays up for the next fit (it is destroyed at exit: re-creating it in the same torchrun process races)."""
    _, ranks = run
    for results in ranks:
        for case in results.values():
            assert case["model"] == "Sequential"
            assert case["group_initialized"]
            assert case["has_progress"]


def test_failing_rank_ends_the_launch(cache, tmp_path):
    """Rank 1 raises mid-epoch while rank 0 waits in an all-reduce: torchrun must stop both and exit non-zero."""
    proc, seconds = torchrun("fail", tmp_path, cache, timeout=90)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
    assert seconds < 60
    state = json.loads((tmp_path / "after_fit-rank1.json").read_text())  # the failing rank cleaned up
    assert state == {"group_initialized": False, "model": "Sequential"}


def test_gloo_timeouts_are_timeouts(cache, tmp_path):
    """The errors gloo raises when a rank does not come, in the collective that waited and in the next one, are
    timeouts (`is_timeout`): the wordings of PyTorch 2.14's gloo, from a real run."""
    proc, _ = torchrun("timeout", tmp_path, cache, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads((tmp_path / "timeouts.json").read_text())
    assert len(errors) == 2, errors
    assert "Timed out waiting 2000ms for recv operation to complete" in errors[0]["text"], errors
    assert errors[1]["text"] == "Application timeout caused pair closure", errors
    assert [e["is_timeout"] for e in errors] == [True, True]


def test_dataloader_timeout_is_not_a_collective_timeout():
    """A DataLoader worker slower than the loader's `timeout` raises a RuntimeError that says "timed out": a slow
    rank, not a silent one, so `is_timeout` is False (after_fit would otherwise kill ranks that are fine)."""
    from dlcourse.distributed import is_timeout

    class Slow(TensorDataset):
        def __getitem__(self, i):
            time.sleep(2)
            return super().__getitem__(i)

    loader = DataLoader(Slow(torch.zeros(1)), num_workers=1, timeout=0.2)
    with pytest.raises(RuntimeError, match="DataLoader timed out after") as info:
        next(iter(loader))
    assert not is_timeout(info.value)


def test_no_op_without_launcher(cache, monkeypatch):
    """In a plain process DistributedTraining changes nothing: same model object, same loaders, same results."""
    from dlcourse.distributed import LAUNCH_VARS, DistributedTraining
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    dls = device_dls(cache, BS)
    model = make_model()
    learn = learner(model, dls, cbs=[DistributedTraining()], progress=False)
    learn.fit(1)
    assert learn.model is model and learn.dls is dls


if __name__ == "__main__":
    {"train": worker_train, "fail": worker_fail, "timeout": worker_timeout}[sys.argv[1]](sys.argv[2], sys.argv[3])


def test_cli_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m dlcourse train` works unchanged: rank 0 alone prints the tables and writes the
    outputs, which record the world size; the validation accuracy counts every one of the 120 valid items once."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "DLCOURSE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dlcourse", "train", "--data", "tiny", "--device", "cpu",
           "--size", "32", "--epochs", "1", "--bs", "16", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert round(results["accuracy"] * 120, 6) == round(results["accuracy"] * 120)  # a whole number of items
    outputs = {"metrics.jsonl", "model.safetensors", "results.json", "training.png"}  # and the CLI's checkpoint folder
    assert {p.name for p in out.iterdir()} == outputs | {"checkpoint"}, sorted(p.name for p in out.iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, written once (by rank 0)
    assert proc.stdout.count("train_loss") == 1  # one epoch table header: rank 1 printed nothing
