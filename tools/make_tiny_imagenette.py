#!/usr/bin/env python
"""Make the tiny Imagenette sample bundled in the package (dlcourse/data/imagenette2-tiny) from the real archive.

The JPEG bytes are copied unchanged (no re-encoding), so the sample is real data in the archive's own format:
`imagenette2-tiny/{train,val}/<wnid>/<file>.JPEG`, the same layout as fast.ai's archives. The choice of files is a
seeded random sample per class and split, so rerunning the script gives the same files.

    python tools/make_tiny_imagenette.py                       # finds imagenette2-128.tgz through DLCOURSE_DATA
    python tools/make_tiny_imagenette.py --archive path/to/imagenette2-128.tgz --train 24 --valid 12
"""
import argparse
import os
import random
import shutil
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "imagenette2-tiny"


def find_archive(name="imagenette2-128.tgz"):
    "The archive in the first DLCOURSE_DATA folder that holds it."
    for folder in os.environ.get("DLCOURSE_DATA", "").split(os.pathsep):
        if folder and (Path(folder) / name).exists():
            return Path(folder) / name
    sys.exit(f"{name} not found in DLCOURSE_DATA ({os.environ.get('DLCOURSE_DATA', 'unset')}); pass --archive")


def pick(names, n, seed):
    "A seeded sample of `n` names, returned sorted."
    return sorted(random.Random(seed).sample(sorted(names), n))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=None, help="imagenette2-*.tgz (default: found in DLCOURSE_DATA)")
    parser.add_argument("--out", type=Path, default=ROOT / "dlcourse" / "data" / NAME)
    parser.add_argument("--train", type=int, default=24, help="training images per class")
    parser.add_argument("--valid", type=int, default=12, help="validation images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    archive = args.archive or find_archive()

    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpeg")}
        groups = defaultdict(list)  # (split, wnid) -> member names
        for name in members:
            _, split, wnid, _ = name.split("/")
            groups[split, wnid].append(name)
        per_split = {"train": args.train, "val": args.valid}
        chosen = [n for (split, wnid), names in sorted(groups.items()) for n in pick(names, per_split[split], args.seed)]
        if args.out.exists():
            shutil.rmtree(args.out)
        for name in chosen:
            _, split, wnid, fname = name.split("/")
            target = args.out / split / wnid / fname
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(members[name]).read())
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {len(chosen)} images from {archive.name} ({len(groups) // 2} classes), {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
