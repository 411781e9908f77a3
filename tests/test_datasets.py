"""What the data notebooks cannot hold well: real HTTP downloads from a local server, malicious archives, worker processes,
and the fast path together with the augmentation of a later notebook."""
import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from dlcourse.datablock import (ImageLoadError, ItemDataLoader, ItemList, LabeledData, OpenImage, ResizeFixed,
                                ToByteTensor, image_folder_dls)
from dlcourse.datasets import (DATASETS, ChecksumError, DataSource, RemoteFile, UnsafeArchiveError, download,
                               get_dataset, safe_extract, tiny_imagenette)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; counts GET requests; `/short/<file>` announces more bytes than it sends, then hangs up."""
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.requests.append(self.path)
        if self.path.startswith("/short/"):
            data = (Path(self.directory) / self.path[len("/short/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data) + 1000))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/served; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def make_archive(path, members):
    """A .tgz with members (name, kind, value): kind 'file' (value: bytes), 'symlink'/'hardlink' (value: target), 'fifo'."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = value or ""
            tar.addfile(info)
    return path


def sha256(path):
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_download_right_and_wrong_checksum(server, tmp_path):
    folder, url = server
    payload = os.urandom(2_500_000)  # more than one 1 MB chunk
    (folder / "data.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "data.bin"
    with pytest.raises(ChecksumError, match=f"{url}/data.bin: sha256 of the download is .*nothing was written"):
        download(f"{url}/data.bin", dest, "sha256:" + "1" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []
    assert download(f"{url}/data.bin", dest, sha256(folder / "data.bin"), progress=False).read_bytes() == payload
    n_requests = len(Handler.requests)
    download(f"{url}/data.bin", dest, sha256(folder / "data.bin"), progress=False)  # verified copy: no request
    assert len(Handler.requests) == n_requests


def test_download_cut_short_leaves_nothing(server, tmp_path):
    folder, url = server
    (folder / "data.bin").write_bytes(os.urandom(100_000))
    with pytest.raises(ConnectionError, match=f"{url}/short/data.bin: the download stopped after 50000 of 101000 bytes"):
        download(f"{url}/short/data.bin", tmp_path / "data.bin", progress=False)
    assert list(tmp_path.glob("*data.bin*")) == []


def test_get_dataset_downloads_extracts_and_prefers_local(server, tmp_path, monkeypatch):
    folder, url = server
    archive = make_archive(folder / "toyset.tgz", [("toyset/train/a/x.txt", "file", b"hello")])
    source = DataSource("toyset", (RemoteFile("toyset.tgz", f"{url}/toyset.tgz", sha256(archive)),))
    monkeypatch.setitem(DATASETS, "toyset", source)
    local = tmp_path / "local"
    local.mkdir()
    monkeypatch.setenv("DLCOURSE_DATA", str(local))
    # 1. nothing local: downloaded into the cache, verified, extracted
    path = get_dataset("toyset", cache=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "toyset" and (path / "train" / "a" / "x.txt").read_text() == "hello"
    assert Handler.requests == ["/toyset.tgz"]
    # 2. already extracted in the cache: no request
    assert get_dataset("toyset", cache=tmp_path / "cache") == path
    # 3. the archive in a DLCOURSE_DATA folder, empty cache: extracted from there, no request
    (local / "toyset.tgz").write_bytes(archive.read_bytes())
    assert get_dataset("toyset", cache=tmp_path / "cache2", progress=False) == tmp_path / "cache2" / "toyset"
    # 4. a corrupt archive in DLCOURSE_DATA is an error naming it, not a silent download
    (local / "toyset.tgz").write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match=str(local / "toyset.tgz")):
        get_dataset("toyset", cache=tmp_path / "cache3")
    # 5. the extracted folder in DLCOURSE_DATA wins over everything
    (local / "toyset").mkdir()
    assert get_dataset("toyset", cache=tmp_path / "cache3") == local / "toyset"
    assert Handler.requests == ["/toyset.tgz"]


MALICIOUS = {
    "absolute path": ([("/tmp/dlcourse-evil.txt", "file", b"x")], "has an absolute path or a '..' component"),
    "dot-dot": ([("ok/../../evil.txt", "file", b"x")], "has an absolute path or a '..' component"),
    "symlink outside": ([("ds/link", "symlink", "../../outside"), ("ds/link/evil.txt", "file", b"x")],
                        "link 'ds/link' -> '../../outside' points outside the target"),
    "absolute symlink": ([("ds/link", "symlink", "/etc")], "link 'ds/link' -> '/etc' points outside the target"),
    "hardlink outside": ([("ds/hard", "hardlink", "../../etc/passwd")], "hard link 'ds/hard' -> '../../etc/passwd'"),
    "fifo": ([("ds/pipe", "fifo", None)], "member 'ds/pipe' is a device file or a FIFO"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_malicious_archive_rejected_nothing_written(tmp_path, case):
    members, message = MALICIOUS[case]
    archive = make_archive(tmp_path / "evil.tgz", [("ds/fine.txt", "file", b"ok"), *members])
    root = tmp_path / "root"
    target = root / "a" / "b"
    target.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError, match=f"{archive}: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        safe_extract(archive, target)
    assert sorted(p for p in root.rglob("*")) == [root / "a", target]  # not even the safe member was written
    assert not Path("/tmp/dlcourse-evil.txt").exists()


def copy_class(src_split, dst_split, wnid, n):
    """Copy n images of class `wnid` from a split folder of the tiny sample."""
    (dst_split / wnid).mkdir(parents=True)
    files = sorted((src_split / wnid).iterdir())[:n]
    for f in files:
        (dst_split / wnid / f.name).write_bytes(f.read_bytes())
    return files


def test_worker_error_is_one_clean_message(tmp_path):
    """A bad file read in a worker process raises ImageLoadError naming it, with no worker traceback inside."""
    good = sorted((tiny_imagenette() / "train" / "n01440764").iterdir())[:7]
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(good[0].read_bytes()[:500])
    items = ItemList([*good, bad], tmp_path, [OpenImage(), ResizeFixed(32), ToByteTensor()])
    ds = LabeledData(items, ItemList([0] * 8))
    dl = ItemDataLoader(ds, batch_size=2, num_workers=2)
    with pytest.raises(ImageLoadError) as info:
        for _ in dl:
            pass
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot decode the image")
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker process" not in message
    ok = ItemDataLoader(LabeledData(items[:7], ItemList([0] * 7)), batch_size=4, num_workers=2)
    assert [xb.shape for xb, _ in ok] == [(4, 3, 32, 32), (3, 3, 32, 32)]


def test_image_folder_dls_with_workers_trains_and_skips(tmp_path):
    """The builder with 2 workers and bad_images='skip' on a copy of the tiny sample with a zero-byte file."""
    tiny = tiny_imagenette()
    for wnid in ("n01440764", "n02102040"):
        copy_class(tiny / "train", tmp_path / "train", wnid, 8)
        copy_class(tiny / "val", tmp_path / "val", wnid, 4)
    (tmp_path / "train" / "n01440764" / "zero.JPEG").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image of 25:\n.*zero.JPEG: empty file"):
        dls = image_folder_dls(tmp_path, size=32, bs=4, valid_name="val", num_workers=2, bad_images="skip",
                               progress=False)
    ys = torch.cat([yb for _, yb in dls.valid])
    assert ys.tolist() == [0] * 4 + [1] * 4
    assert sum(len(yb) for _, yb in dls.train) == 16


def test_get_dataset_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'nope'; known: imagenette2, .*fashion-mnist"):
        get_dataset("nope")


def test_cached_dataloaders_with_the_augmentation_crop(tmp_path):
    """The fast path's training loader takes the augmentation notebook's batch crop, and drop_last, from the caller."""
    from dlcourse.augment import BatchRandomResizedCrop
    from dlcourse.fastdata import cached_dataloaders
    dls = cached_dataloaders(tiny_imagenette(), size=64, bs=32, valid_name="val", device="cpu", cache=tmp_path,
                             train_tfms=[BatchRandomResizedCrop(48)], drop_last=True, progress=False, num_workers=2)
    assert (len(dls.train), len(dls.valid)) == (240 // 32, 2)
    assert [type(t).__name__ for t in sorted(dls.train.batch_tfms, key=lambda t: t.order)] == [
        "ToFloatTensor", "BatchRandomResizedCrop", "Normalize"]
    xb, yb = next(iter(dls.train))
    assert xb.shape == (32, 3, 48, 48) and xb.dtype == torch.float32 and yb.shape == (32,)
    xv, _ = next(iter(dls.valid))
    assert xv.shape == (64, 3, 64, 64)  # validation: not cropped


def test_fashion_mnist_downloads_when_missing(server, tmp_path, monkeypatch):
    """With Fashion-MNIST nowhere on disk, `load_fashion_mnist()` downloads the four files (checksums verified) into the
    cache folder, from a local server standing in for the official one; a second call finds them there."""
    import shutil
    from dlcourse import core
    source_dir = Path("/usr/share/datasets/fashion-mnist")
    if not source_dir.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist (the files to serve) is not installed")
    folder, base = server
    files = []
    for f in sorted(source_dir.glob("*.gz")):
        shutil.copy(f, folder / f.name)
        files.append(RemoteFile(f.name, f"{base}/{f.name}", "md5:" + hashlib.md5(f.read_bytes()).hexdigest()))
    source = DataSource("fashion-mnist", tuple(files), extract=False)
    monkeypatch.setitem(DATASETS, "fashion-mnist", source)
    monkeypatch.setattr(core, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("DLCOURSE_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("DLCOURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = core.load_fashion_mnist()
    assert data["x_train"].shape == (60000, 28, 28) and data["y_valid"].shape == (10000,)
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(f.name for f in files)
    n_requests = len(Handler.requests)
    assert n_requests == 4
    core.load_fashion_mnist()
    assert len(Handler.requests) == n_requests  # found in the cache: nothing downloaded again
    with pytest.raises(FileNotFoundError):
        monkeypatch.setenv("DLCOURSE_CACHE", str(tmp_path / "cache2"))
        core.load_fashion_mnist(download=False)
