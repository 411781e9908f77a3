"""Robustness of the data layer, the image cache, checkpoints, downloads and DDP against what goes wrong in practice:
files this code did not write, killed writers, corrupt or truncated files, full disks, odd file names, bad images,
HTML pages and stalls instead of downloads, a rank that stops answering.

Run as a test: `pytest tests/test_reliability.py`. The same file is the worker torchrun starts for the stalled-rank test.
"""
import errno
import functools
import hashlib
import http.server
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, free_port, kill_launch


# ---------------------------------------------------------------- helpers

def tiny():
    from dlcourse.datasets import tiny_imagenette
    return tiny_imagenette()


def image_folder(root:Path, classes=("n01440764", "n02102040"), n_train=6, n_valid=2) -> Path:
    """A small train/val image folder copied from the tiny sample: `n_train` and `n_valid` images per class."""
    for split, n in (("train", n_train), ("val", n_valid)):
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for f in sorted((tiny() / split / wnid).iterdir())[:n]:
                shutil.copy(f, root / split / wnid / f.name)
    return root


def tiny_files(n=40):
    from dlcourse.datablock import IMAGE_EXTENSIONS, get_files
    return get_files(tiny() / "train", IMAGE_EXTENSIONS)[:n]


def cache_files(cache:Path) -> list[str]:
    return sorted(p.name for p in (cache / "image-cache").iterdir() if not p.name.endswith(".lock"))


def tiny_learner():
    """A two-class learner on random 8x8 images, fitted one epoch (it has an optimizer state and a history)."""
    from dlcourse.datablock import ToFloatTensor
    from dlcourse.fastdata import DeviceLoader
    from dlcourse.learner import DataLoaders, Learner
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 2
    dls = DataLoaders(DeviceLoader(images, labels, bs=8, shuffle=True, batch_tfms=[ToFloatTensor()], device="cpu"),
                      DeviceLoader(images, labels, bs=16, batch_tfms=[ToFloatTensor()], device="cpu"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    learn = Learner(model, dls, lr=1e-2, device="cpu", progress=False)
    learn.fit(1)
    return learn


# ---------------------------------------------------------------- checkpoints: only our own files, named slots

FOREIGN = {"weights-best.safetensors": "a model the user keeps", "state-of-the-art-notes.txt": "notes",
           ".vimrc.tmp": "an editor's file"}


def test_save_checkpoint_keeps_files_it_did_not_write(tmp_path):
    from dlcourse.transfer import save_checkpoint
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name, text in FOREIGN.items():
        (folder / name).write_text(text)
    learn = tiny_learner()
    save_checkpoint(learn, folder, 1)
    save_checkpoint(learn, folder, 2)
    for name, text in FOREIGN.items():
        assert (folder / name).read_text() == text, name


def test_save_checkpoint_cleans_what_a_killed_save_left(tmp_path):
    """Temporary files of atomic_write and of safetensors, and the pair of a save killed before its manifest moved."""
    from dlcourse.transfer import checkpoint_files, load_checkpoint, save_checkpoint
    folder = tmp_path / "ckpt"
    learn = tiny_learner()
    save_checkpoint(learn, folder, 1)
    current = set(p.name for p in folder.iterdir())
    leftovers = [".weights-last-0002-0123abcd.safetensors.k2j4_x9q.tmp", ".state-last-0002-0123abcd.pt.a8dk3m2z.tmp",
                 ".checkpoint.json.zz81kq0a.tmp", ".tmpgXYxnH", "weights-last-0002-0123abcd.safetensors"]
    for name in leftovers:
        (folder / name).write_bytes(b"\0" * 10)
    for name, text in FOREIGN.items():
        (folder / name).write_text(text)
    save_checkpoint(learn, folder, 2)
    names = set(p.name for p in folder.iterdir())
    assert not names & set(leftovers), names & set(leftovers)
    assert set(FOREIGN) <= names
    assert not (current - {"checkpoint.json"}) & names  # the previous save's pair is gone too
    assert load_checkpoint(tiny_learner(), folder)["epoch"] == 2
    assert checkpoint_files(folder)["epoch"] == 2


def test_checkpoint_slots_last_and_best(tmp_path):
    from dlcourse.transfer import SaveCheckpoint, checkpoint_files, load_checkpoint, load_weights, save_checkpoint
    folder = tmp_path / "run"
    learn = tiny_learner()
    save_checkpoint(learn, folder, 1, name="best")
    best_weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.fit(1)
    save_checkpoint(learn, folder, 2)  # the default slot, "last"
    save_checkpoint(learn, folder, 3, name="last")
    assert load_checkpoint(tiny_learner(), folder, name="best")["epoch"] == 1
    assert load_checkpoint(tiny_learner(), folder)["epoch"] == 3
    model = tiny_learner().model
    load_weights(model, folder, name="best")
    assert all(torch.equal(v, best_weights[k]) for k, v in model.state_dict().items())
    assert checkpoint_files(folder, name="best")["weights"].is_file()
    assert len([p for p in folder.iterdir() if p.suffix == ".safetensors"]) == 2  # one per slot
    with pytest.raises(ValueError, match="no checkpoint named 'nope'.*best, last"):
        checkpoint_files(folder, name="nope")
    with pytest.raises(ValueError, match="slot name"):
        save_checkpoint(learn, folder, 3, name="../evil")
    SaveCheckpoint(folder, name="best").after_epoch(learn)  # the callback saves into a slot too
    assert checkpoint_files(folder, name="best")["epoch"] == learn.epoch + 1


def _truncate(path:Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path:Path):
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_key(key):
    def drop(path:Path):
        manifest = json.loads(path.read_text())
        slot = manifest["slots"]["last"] if key != "slots" else manifest
        del slot[key]
        path.write_text(json.dumps(manifest))
    return drop


CORRUPTIONS = {  # case: (which file, how, words the error must contain)
    "truncated weights": ("weights", _truncate, ["truncated"]),
    "truncated state": ("state", _truncate, ["truncated"]),
    "truncated manifest": ("manifest", _truncate, ["not valid JSON"]),
    "flipped weights": ("weights", _flip, ["sha256", "corrupt"]),
    "flipped state": ("state", _flip, ["sha256", "corrupt"]),
    "no tag": ("manifest", _drop_key("tag"), ["'tag'"]),
    "no weights": ("manifest", _drop_key("weights"), ["'weights'"]),
    "no checksum": ("manifest", _drop_key("sha256"), ["'sha256'"]),
    "no slots": ("manifest", _drop_key("slots"), ["'slots'"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_named(tmp_path, case):
    from dlcourse.transfer import MANIFEST, CheckpointError, save_checkpoint
    which, corrupt, words = CORRUPTIONS[case]
    folder = tmp_path / "ckpt"
    save_checkpoint(tiny_learner(), folder, 1)
    manifest = json.loads((folder / MANIFEST).read_text())["slots"]["last"]
    path = folder / (MANIFEST if which == "manifest" else manifest[which])
    corrupt(path)
    from dlcourse.transfer import load_checkpoint
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny_learner(), folder)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_bad_weights_file_is_named(tmp_path, how):
    from dlcourse.transfer import CheckpointError, load_weights, save_weights
    learn = tiny_learner()
    path = save_weights(learn.model, tmp_path / "model.safetensors")
    if how == "truncate":
        _truncate(path)
    else:
        path.write_bytes(os.urandom(path.stat().st_size))
    with pytest.raises(CheckpointError, match=f"{path}: .*not a (complete )?safetensors file"):
        load_weights(learn.model, path)


# ---------------------------------------------------------------- the image cache: verified, rebuilt, shared

def test_truncated_cache_is_rebuilt(tmp_path):
    from dlcourse.fastdata import image_cache
    files = tiny_files()
    first = image_cache(files, 32, name="t", cache=tmp_path, progress=False).clone()
    data = next((tmp_path / "image-cache").glob("t-*.u8"))
    _truncate(data)
    with pytest.warns(UserWarning, match=f"{data.name}.*rebuilding"):
        again = image_cache(files, 32, name="t", cache=tmp_path, progress=False)
    assert torch.equal(again, first)
    assert data.stat().st_size == 40 * 3 * 32 * 32


def test_garbage_cache_of_the_right_size_is_rebuilt(tmp_path):
    from dlcourse.fastdata import image_cache
    files = tiny_files()
    first = image_cache(files, 32, name="t", cache=tmp_path, progress=False).clone()
    data = next((tmp_path / "image-cache").glob("t-*.u8"))
    data.write_bytes(os.urandom(data.stat().st_size))
    with pytest.warns(UserWarning, match=f"{data.name}.*checksum"):
        again = image_cache(files, 32, name="t", cache=tmp_path, progress=False)
    assert torch.equal(again, first)


def test_cache_without_its_record_is_rebuilt(tmp_path):
    """A data file whose build was killed before the record was written (the record is the completed-marker)."""
    from dlcourse.fastdata import image_cache
    files = tiny_files()
    first = image_cache(files, 32, name="t", cache=tmp_path, progress=False).clone()
    next((tmp_path / "image-cache").glob("t-*.json")).unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        assert torch.equal(image_cache(files, 32, name="t", cache=tmp_path, progress=False), first)


def test_killed_builds_leave_nothing_behind(tmp_path):
    """Temporary files of a killed build, and caches of older versions of the files, go at the next build;
    files that only look alike stay."""
    from dlcourse.fastdata import image_cache
    folder = tmp_path / "image-cache"
    folder.mkdir()
    ours = [".t-32px-40-0123456789abcdef.u8.q8z2k1m0.part", ".t-32px-40-0123456789abcdef.json.ab12cd34.tmp",
            "t-32px-40-0123456789abcdef.u8", "t-32px-40-0123456789abcdef.json"]
    theirs = ["t-32px-notes.u8", ".t-32px.u8.tmp", "other-32px-40-0123456789abcdef.u8", "t-64px-40-0123456789abcdef.u8"]
    for name in ours + theirs:
        (folder / name).write_bytes(b"x")
    image_cache(tiny_files(), 32, name="t", cache=tmp_path, progress=False)
    names = set(cache_files(tmp_path))
    assert not names & set(ours)
    assert set(theirs) <= names
    assert len(names - set(theirs)) == 2  # the new data file and its record


def _pixels_digest(images:torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def _build_in_process(args):
    """One process of the concurrent-build test: for each trial, wait for the others, then open the same cache at the
    same instant (a shared deadline, spun on), and return the SHA-256 of the pixels it got."""
    barrier, shared, folder, n_trials = args
    from dlcourse.fastdata import image_cache
    files = tiny_files()
    digests = []
    for trial in range(n_trials):
        if barrier.wait(60) == 0:  # one process (any) sets the start time
            shared["start"] = time.time() + 0.3
        barrier.wait(60)
        start = shared["start"]
        while time.time() < start:
            pass
        digests.append(_pixels_digest(image_cache(files, 32, name="t", cache=Path(folder) / f"trial{trial}",
                                               progress=False, num_workers=1)))
    return digests


def test_concurrent_builds_of_one_cache_all_succeed(tmp_path):
    """Three processes start building the same cache at the same moment, eight times over (each time over 50 stale
    caches of the same name, which all of them want to remove): all succeed, with the pixels of an ordinary build."""
    n_procs, n_trials = 3, 8
    for trial in range(n_trials):
        folder = tmp_path / f"trial{trial}" / "image-cache"
        folder.mkdir(parents=True)
        for i in range(50):
            (folder / f"t-32px-40-{i:016x}.u8").write_bytes(b"stale")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier, shared = manager.Barrier(n_procs), manager.dict()
        with context.Pool(n_procs) as pool:
            work = pool.map_async(_build_in_process, [(barrier, shared, str(tmp_path), n_trials)] * n_procs)
            results = work.get(timeout=300)
    from dlcourse.fastdata import image_cache
    single = _pixels_digest(image_cache(tiny_files(), 32, name="t", cache=tmp_path / "single", progress=False))
    assert results == [[single] * n_trials] * n_procs, results
    for trial in range(n_trials):
        assert len(cache_files(tmp_path / f"trial{trial}")) == 2  # the data file and its record, no stale one


def test_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    from dlcourse.fastdata import image_cache
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError) as info:
        image_cache(tiny_files(), 32, name="t", cache=tmp_path, progress=False)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert str(tmp_path / "image-cache") in message and "0.1 MB" in message and "\n" not in message, message
    assert cache_files(tmp_path) == []  # no partial file


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1 MB tmpfs mounted on a folder (needs root; skipped where mounting is not permitted)."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_for_real(small_filesystem, run_py):
    """On a real 1 MB file system a 1.5 MB cache fails cleanly (no SIGBUS), naming the folder, leaving no file."""
    code = ("import sys; from dlcourse.fastdata import image_cache; from dlcourse.datablock import get_files;"
            "from dlcourse.datasets import tiny_imagenette;"
            "files = get_files(tiny_imagenette() / 'train', ['.JPEG'])[:120];"
            f"image_cache(files, 64, name='t', cache={str(small_filesystem)!r}, progress=False)")
    proc = run_py("-c", code, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])  # an exception, not a signal
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 28]") and str(small_filesystem / "image-cache") in last, last
    assert "1.5 MB" in last, last
    assert cache_files(small_filesystem) == []


def test_cache_verification_modes(tmp_path):
    """verify='size' trusts a record of the right sizes (fast); 'full' (the default) checks every byte."""
    from dlcourse.fastdata import image_cache
    files = tiny_files()
    first = image_cache(files, 32, name="t", cache=tmp_path, progress=False).clone()
    data = next((tmp_path / "image-cache").glob("t-*.u8"))
    _flip(data)
    assert not torch.equal(image_cache(files, 32, name="t", cache=tmp_path, progress=False, verify="size"), first)
    with pytest.warns(UserWarning, match="checksum"):
        assert torch.equal(image_cache(files, 32, name="t", cache=tmp_path, progress=False), first)
    with pytest.raises(ValueError, match="verify must be"):
        image_cache(files, 32, name="t", cache=tmp_path, verify="some")


def test_a_corrupt_cache_is_hashed_once_and_a_rebuild_by_another_process_is_used(tmp_path, monkeypatch):
    """Opening a corrupt cache reads its checksums once (not again under the lock) and rebuilds it; when another
    process rebuilds it while this one waits for the lock, this one checks the new files and builds nothing."""
    from dlcourse import fastdata
    files = tiny_files()
    first = fastdata.image_cache(files, 32, name="t", cache=tmp_path, progress=False).clone()
    data = next((tmp_path / "image-cache").glob("t-*.u8"))
    hashed, built = [], []
    block_digests, build, locked = fastdata._block_digests, fastdata._build, fastdata._locked
    monkeypatch.setattr(fastdata, "_block_digests",
                        lambda path, *args: hashed.append(path) or block_digests(path, *args))
    monkeypatch.setattr(fastdata, "_build", lambda *args: built.append(args[2]) or build(*args))
    _flip(data)
    with pytest.warns(UserWarning, match="checksum.*rebuilding"):
        assert torch.equal(fastdata.image_cache(files, 32, name="t", cache=tmp_path, progress=False), first)
    assert (hashed, built) == ([data], [data])
    @contextmanager
    def rebuilt_while_waiting(path):
        with locked(path):
            build(files, 32, data, data.with_suffix(".json"), False, None)  # another process, done before us
            yield
    monkeypatch.setattr(fastdata, "_locked", rebuilt_while_waiting)
    _flip(data)
    hashed.clear(), built.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(fastdata.image_cache(files, 32, name="t", cache=tmp_path, progress=False), first)
    assert not [w for w in caught if "rebuilding" in str(w.message)], [str(w.message) for w in caught]
    assert (hashed, built) == ([data, data], [])  # the corrupt file, then the one built meanwhile


# ---------------------------------------------------------------- file names that are not UTF-8

NON_UTF8 = os.fsdecode(b"caf\xff-photo.JPEG")  # the byte 0xff, as Python spells it in a str (surrogateescape)


def test_non_utf8_file_names_in_both_loaders(tmp_path):
    """A file renamed to a name that is not UTF-8 loads like any other: its row holds its pixels, with its label."""
    from dlcourse.datablock import IMAGE_EXTENSIONS, ItemList, get_files, image_folder_dls
    from dlcourse.fastdata import _square, cached_dataloaders
    root = image_folder(tmp_path / "data")
    one = next((root / "train" / "n01440764").iterdir())
    reference = shutil.copy(one, tmp_path / "reference.JPEG")  # the same bytes under a plain name
    renamed = one.parent / NON_UTF8
    os.rename(one, renamed)
    row = get_files(root / "train", IMAGE_EXTENSIONS).index(renamed)
    cached = cached_dataloaders(root, size=32, bs=4, valid_name="val", device="cpu", cache=tmp_path / "c",
                                progress=False)
    assert sum(len(yb) for _, yb in cached.train) == 12
    assert torch.equal(cached.train.images[row], torch.from_numpy(_square(Path(reference), 32)).permute(2, 0, 1))
    assert cached.train.vocab[int(cached.train.labels[row])] == "n01440764"
    items = image_folder_dls(root, size=32, bs=4, valid_name="val", progress=False)
    assert sum(len(yb) for _, yb in items.train) == 12
    ds = items.train.dataset
    assert ds.x.items[row] == renamed
    x, y = ds[row]
    assert torch.equal(x, ItemList([reference], tmp_path, ds.x.tfms)[0])
    assert ds.vocab[y] == "n01440764"


def test_non_utf8_bad_file_is_named(tmp_path):
    from dlcourse.datablock import ImageLoadError
    from dlcourse.fastdata import cached_dataloaders
    root = image_folder(tmp_path / "data")
    (root / "train" / "n01440764" / NON_UTF8).write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match="caf\udcff-photo.JPEG"):
        cached_dataloaders(root, size=32, valid_name="val", device="cpu", cache=tmp_path / "c", progress=False)


# ---------------------------------------------------------------- bad images: all named, or skipped and listed

def _break(root:Path, n:int) -> list[Path]:
    """n unreadable files in the training folder: empty, truncated, not images."""
    good = next((root / "train" / "n01440764").iterdir()).read_bytes()
    bad = []
    for i in range(n):
        path = root / "train" / "n02102040" / f"bad{i:02d}.JPEG"
        path.write_bytes([b"", good[:300], b"hello"][i % 3])
        bad.append(path)
    return bad


def _items_error(root):
    from dlcourse.datablock import ImageLoadError, image_folder_dls
    dls = image_folder_dls(root, size=32, bs=4, valid_name="val", progress=False, stats=([0.5] * 3, [0.25] * 3))
    with pytest.raises(ImageLoadError) as info:
        for _ in dls.train:
            pass
    return str(info.value)


def _cached_error(root, cache):
    from dlcourse.datablock import ImageLoadError
    from dlcourse.fastdata import cached_dataloaders
    with pytest.raises(ImageLoadError) as info:
        cached_dataloaders(root, size=32, bs=4, valid_name="val", device="cpu", cache=cache, progress=False)
    return str(info.value)


@pytest.mark.parametrize("loader", ["items", "cached"])
def test_every_bad_image_is_named(tmp_path, loader):
    root = image_folder(tmp_path / "data")
    bad = _break(root, 3)
    message = _items_error(root) if loader == "items" else _cached_error(root, tmp_path / "c")
    assert message.startswith("3 unreadable images of "), message
    for path in bad:
        assert str(path) in message, (path, message)
    assert "bad_images='skip'" in message


@pytest.mark.parametrize("loader", ["items", "cached"])
def test_many_bad_images_are_listed_up_to_20(tmp_path, loader):
    root = image_folder(tmp_path / "data")
    bad = _break(root, 25)
    message = _items_error(root) if loader == "items" else _cached_error(root, tmp_path / "c")
    assert message.startswith("25 unreadable images of "), message
    assert sum(str(path) in message for path in bad) == 20
    assert "and 5 more" in message


def test_items_builder_names_the_bad_images_of_both_parts(tmp_path):
    """Found while measuring the channel statistics (at build time), the bad images of train and valid alike."""
    from dlcourse.datablock import ImageLoadError, image_folder_dls
    root = image_folder(tmp_path / "data")
    bad = _break(root, 3)
    (root / "val" / "n01440764" / "bad.JPEG").write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        image_folder_dls(root, size=32, bs=4, valid_name="val", progress=False)
    message = str(info.value)
    assert message.startswith("4 unreadable images of 20:"), message
    assert all(str(path) in message for path in [*bad, root / "val" / "n01440764" / "bad.JPEG"])


def test_a_cached_failure_is_named_again_without_decoding(tmp_path):
    """The cache records its bad rows: the next run names them at once, and a skip run needs no second decode."""
    root = image_folder(tmp_path / "data")
    bad = _break(root, 2)
    first = _cached_error(root, tmp_path / "c")
    from unittest import mock
    with mock.patch("dlcourse.fastdata.load_image", side_effect=AssertionError("decoded again")):
        assert _cached_error(root, tmp_path / "c") == first
        from dlcourse.fastdata import cached_dataloaders
        with pytest.warns(UserWarning, match="skipping 2 unreadable images"):
            dls = cached_dataloaders(root, size=32, bs=4, valid_name="val", device="cpu", cache=tmp_path / "c",
                                     progress=False, bad_images="skip")
    assert sorted(dls.train.skipped) == sorted(bad)


@pytest.mark.parametrize("loader", ["items", "cached"])
def test_skip_bad_images_records_them(tmp_path, loader):
    from dlcourse.datablock import image_folder_dls, skipped_images
    from dlcourse.fastdata import cached_dataloaders
    root = image_folder(tmp_path / "data")
    bad = _break(root, 3)
    with pytest.warns(UserWarning, match="skipping 3 unreadable images of 19"):
        if loader == "items":
            dls = image_folder_dls(root, size=32, bs=4, valid_name="val", progress=False, bad_images="skip")
        else:
            dls = cached_dataloaders(root, size=32, bs=4, valid_name="val", device="cpu", cache=tmp_path / "c",
                                     progress=False, bad_images="skip")
    assert sum(len(yb) for _, yb in dls.train) == 12
    skipped = skipped_images(dls)
    assert sorted(skipped) == sorted(bad)
    assert all(str(path) in reason for path, reason in skipped.items())
    assert dls.valid.skipped == {}
    ys = torch.cat([yb for _, yb in dls.valid])
    assert ys.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("loader", ["items", "cached"])
def test_every_training_image_skipped_is_a_one_line_error(tmp_path, loader):
    from dlcourse.datablock import image_folder_dls
    from dlcourse.fastdata import cached_dataloaders
    root = image_folder(tmp_path / "data")
    for path in (root / "train").rglob("*.JPEG"):
        path.write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info, pytest.warns(UserWarning, match="skipping 12 unreadable images"):
        if loader == "items":
            image_folder_dls(root, size=32, valid_name="val", progress=False, bad_images="skip")
        else:
            cached_dataloaders(root, size=32, valid_name="val", device="cpu", cache=tmp_path / "c", progress=False,
                               bad_images="skip")
    assert str(info.value) == f"no training images in {root / 'train'}"


def _broken_transform(x):
    raise TypeError("a transform that fails on every item")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_error_in_a_transform_is_not_a_bad_image(tmp_path, num_workers):
    """A transform raising TypeError on readable images: the TypeError reaches the caller, from this process and from
    a worker alike, not an error listing the images as unreadable."""
    from dlcourse.datablock import ItemDataLoader, ItemList, LabeledData, OpenImage, ResizeFixed, ToByteTensor
    items = ItemList(tiny_files(8), tmp_path, [OpenImage(), ResizeFixed(32), ToByteTensor(), _broken_transform])
    dl = ItemDataLoader(LabeledData(items, ItemList([0] * 8)), batch_size=2, num_workers=num_workers)
    with pytest.raises(TypeError, match="a transform that fails on every item") as info:
        next(iter(dl))
    assert "unreadable" not in str(info.value), info.value


def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image
    from dlcourse.datablock import ImageLoadError, load_image
    path = tmp_path / "bomb.png"
    Image.new("RGB", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels: over twice the limit
    with pytest.raises(ImageLoadError, match=f"{path}: .*decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("loader", ["items", "cached"])
def test_one_class_is_refused(tmp_path, loader):
    from dlcourse.datablock import image_folder_dls
    from dlcourse.fastdata import cached_dataloaders
    root = image_folder(tmp_path / "data", classes=("n01440764",))
    with pytest.raises(ValueError, match=r"only one class \(n01440764\) in .*train"):
        if loader == "items":
            image_folder_dls(root, size=32, valid_name="val", progress=False)
        else:
            cached_dataloaders(root, size=32, valid_name="val", device="cpu", cache=tmp_path / "c", progress=False)


# ---------------------------------------------------------------- archives and downloads

def test_truncated_archive_is_refused_naming_it(tmp_path):
    from dlcourse.datasets import CorruptArchiveError, safe_extract
    archive = tmp_path / "data.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            payload = os.urandom(200_000)
            info = tarfile.TarInfo(f"ds/file{i}.bin")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    _truncate(archive)
    with pytest.raises(CorruptArchiveError, match=f"{archive}: truncated or corrupt"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, counting requests. /html/... answers an HTML page; /nolength/<f> sends half of <f> with no
    Content-Length; /stall/<f> sends the headers and 100 bytes, then nothing."""
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.requests.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "html":
            body = b"<html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if kind in ("nolength", "stall"):
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if kind == "nolength" else data[:100])
            self.wfile.flush()
            if kind == "stall":
                time.sleep(5)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_html_page_is_not_a_data_file(server, tmp_path):
    from dlcourse.datasets import download
    _, url = server
    with pytest.raises(ConnectionError, match=f"{url}/html/data.tgz: the server sent an HTML page"):
        download(f"{url}/html/data.tgz", tmp_path / "data.tgz", progress=False)
    assert list(tmp_path.glob("*data.tgz*")) == []


def test_download_of_the_wrong_size_is_refused(server, tmp_path):
    from dlcourse.datasets import download
    folder, url = server
    (folder / "data.bin").write_bytes(os.urandom(100_000))
    with pytest.raises(ConnectionError, match=f"{url}/nolength/data.bin: .*50000 bytes, expected 100000"):
        download(f"{url}/nolength/data.bin", tmp_path / "data.bin", progress=False, size=100_000)
    assert list(tmp_path.glob("*data.bin*")) == []


def test_stalled_download_times_out_naming_the_url(server, tmp_path):
    from dlcourse.datasets import download
    folder, url = server
    (folder / "data.bin").write_bytes(os.urandom(10_000))
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"{url}/stall/data.bin: no data for 1.0 s"):
        download(f"{url}/stall/data.bin", tmp_path / "data.bin", progress=False, timeout=1.)
    assert time.perf_counter() - start < 4
    assert list(tmp_path.glob("*data.bin*")) == []


def test_cached_archive_failing_its_checksum_is_fetched_again_once(server, tmp_path, monkeypatch):
    from dlcourse.datasets import DATASETS, ChecksumError, DataSource, RemoteFile, get_dataset
    folder, url = server
    archive = folder / "toyset.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("toyset/train/a/x.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    checksum = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(DATASETS, "toyset", DataSource("toyset", (RemoteFile("toyset.tgz", f"{url}/toyset.tgz", checksum),)))
    monkeypatch.setenv("DLCOURSE_DATA", str(tmp_path / "nowhere"))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "toyset.tgz").write_bytes(archive.read_bytes()[:100])  # an interrupted copy in the cache
    with pytest.warns(UserWarning, match="toyset.tgz.*fails its checksum.*downloading it again"):
        path = get_dataset("toyset", cache=cache, progress=False)
    assert (path / "train" / "a" / "x.txt").read_text() == "hello"
    assert Handler.requests == ["/toyset.tgz"]
    # a server that keeps sending a wrong file: one new request, then the error
    shutil.rmtree(cache)
    cache.mkdir()
    (cache / "toyset.tgz").write_bytes(b"garbage")
    archive.write_bytes(b"also garbage")
    Handler.requests = []
    with pytest.warns(UserWarning), pytest.raises(ChecksumError, match="toyset.tgz"):
        get_dataset("toyset", cache=cache, progress=False)
    assert Handler.requests == ["/toyset.tgz"]


# ---------------------------------------------------------------- transfer learning beyond XResNet

def test_torchvision_resnet_transfers():
    torchvision = pytest.importorskip("torchvision")
    from dlcourse.transfer import freeze, is_batchnorm, layer_groups, split_model, transfer_model
    base = torchvision.models.resnet18(weights=None)
    old_head = base.fc
    body, head = split_model(base)
    assert [type(m).__name__ for m in head] == ["AdaptiveAvgPool2d", "Linear"]
    assert body[-1] is base.layer4
    model = transfer_model(base, n_out=3)
    assert model.body.layer4 is base.layer4  # shared, not copied
    assert all(p is not q for p in model.head.parameters() for q in old_head.parameters())  # the head is new
    assert not any(m is old_head for m in model.modules())
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    freeze(model)
    for m in model.body.modules():
        for p in m.parameters(recurse=False):
            assert p.requires_grad == is_batchnorm(m), m
    assert all(p.requires_grad for p in model.head.parameters())
    assert len(layer_groups(model, n_body=2)) == 3
    cut_body, _ = split_model(base, cut=4)  # an explicit cut: the stem only
    assert list(cut_body) == [base.conv1, base.bn1, base.relu, base.maxpool]


def test_split_model_without_a_known_head_asks_for_cut():
    from dlcourse.transfer import split_model
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.ReLU()
    with pytest.raises(ValueError, match="pass `cut`"):
        split_model(Odd())


def test_group_optimizer_decays_weights_only_and_keeps_discriminative_lrs():
    from dlcourse.transfer import fine_tune, group_lrs, make_group_opt, transfer_model, layer_groups
    learn = tiny_learner()
    learn.model = transfer_model(learn.model, n_out=2, hidden=8)
    learn.opt_func = functools.partial(torch.optim.AdamW, weight_decay=0.1)
    groups = layer_groups(learn.model, n_body=2)
    opt = make_group_opt(learn, groups, lr=[1e-3, 2e-3, 3e-3])
    ndims = {id(p): p.ndim for p in learn.model.parameters()}
    for group in opt.param_groups:
        decays = {ndims[id(p)] > 1 for p in group["params"]}
        assert len(decays) == 1  # each optimizer group all decayed or all not
        assert group["weight_decay"] == (0.1 if decays.pop() else 0.)
        assert group["lr"] == [1e-3, 2e-3, 3e-3][group["layer_group"]]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(learn.model.parameters()))
    history = fine_tune(learn, epochs=1, lr=1e-2, freeze_epochs=1)
    assert [r["phase"] for r in history] == ["frozen", "unfrozen"]
    lrs = [g["lr"] for g in learn.opt.param_groups]
    expected = group_lrs(1., 3, 10.)
    for group, lr in zip(learn.opt.param_groups, lrs):
        assert abs(lr / lrs[-1] - expected[group["layer_group"]] / expected[-1]) < 1e-9
    for group in learn.opt.param_groups:  # fine_tune's optimizer keeps the split: weights decayed, the rest not
        decays = {ndims[id(p)] > 1 for p in group["params"]}
        assert len(decays) == 1 and group["weight_decay"] == (0.1 if decays.pop() else 0.)


# ---------------------------------------------------------------- a DDP rank that stops answering

def worker_stall(out, timeout_s):
    """Rank 1 stops (sleeps) after its second training batch; rank 0 must give up after `timeout_s`, naming rank 1."""
    from dlcourse.distributed import DistributedTraining, get_rank
    from dlcourse.learner import Callback, Learner

    class Stall(Callback):
        def after_batch(self, learn):
            if learn.training and learn.iter == 1 and get_rank() == 1:
                (Path(out) / "stalled").write_text(str(time.time()))
                time.sleep(120)

    learn = tiny_learner()
    learn = Learner(learn.model, learn.dls, lr=1e-2, device="cpu", progress=False,
                    cbs=[DistributedTraining(timeout_s=float(timeout_s)), Stall()])
    try:
        learn.fit(2)
    except Exception as err:
        (Path(out) / f"error-rank{get_rank()}.txt").write_text(f"{type(err).__name__}: {err}")
        raise



def test_stalled_rank_ends_the_job_within_the_timeout(tmp_path):
    timeout_s = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "stall", str(tmp_path), str(timeout_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill_launch(proc)  # torchrun and its workers, which run in sessions of their own
        proc.communicate()
        raise AssertionError("the job hung")
    ended = time.time()
    assert proc.returncode != 0
    stalled = float((tmp_path / "stalled").read_text())
    print(f"the job ended {ended - stalled:.1f} s after rank 1 stalled (timeout {timeout_s} s)")
    assert ended - stalled < timeout_s + 8, ended - stalled
    message = (tmp_path / "error-rank0.txt").read_text()
    assert message.startswith("DistributedTimeoutError: rank 0 waited"), message
    assert "rank 1 stopped responding" in message and "\n" not in message, message


if __name__ == "__main__":
    {"stall": worker_stall}[sys.argv[1]](*sys.argv[2:])
