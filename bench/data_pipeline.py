#!/usr/bin/env python
"""Images per second of the training data pipeline, side by side: dlcourse per-item, dlcourse cached, fastai DataBlock.

The pipeline: decode the JPEG (done once, up front, by the cached path), random resized crop to 128 (area 35-100%,
aspect ratio 3/4-4/3), random horizontal flip, collate into a batch, convert to floats in [0, 1]. Data: the
training images of imagenette2-128 (found through DLCOURSE_DATA and extracted into the cache by
`dlcourse.datasets.imagenette(128)`).

- per_item: `ItemDataLoader` over `LabeledData` with OpenImage + PilRandomResizedCrop + ToByteTensor, --workers
  worker processes, uint8 collate, float conversion in the main process.
- cached: `image_cache` (a memory-mapped uint8 tensor, built once; its build time is reported separately) and
  `DeviceLoader` with ToFloatTensor + BatchRandomResizedCrop on the default device.
- fastai: fastai's `DataBlock` (ImageBlock, CategoryBlock) with item_tfms RandomResizedCrop(128, min_scale=0.35) and
  FlipItem(0.5), IntToFloatTensor (ImageBlock's default batch transform), --workers workers. Runs only where fastai
  is importable: install it in a separate venv (it needs fastcore 2.x, dlcourse's dev tools need fastcore<2):

    python3 -m venv bench/.venv-fastai
    bench/.venv-fastai/bin/pip install torch==2.14.1 torchvision==0.29.1 fastai==2.8.12
    bench/.venv-fastai/bin/pip install -e . --no-deps
    bench/.venv-fastai/bin/python bench/data_pipeline.py --repeats 3

Each measurement skips the first batch (worker start-up), then times --batches batches. The paths are measured in
turn within each repeat (interleaved, so that load changes on a shared machine hit all of them alike). Prints one
JSON line per measurement, then a summary line with the medians and the ratios to fastai.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def measure(loader, n_batches, to_float=None):
    "Images/second over `n_batches` batches of `loader`, after one warm-up batch."
    it = iter(loader)
    next(it)
    n_images, start = 0, time.perf_counter()
    for _ in range(n_batches):
        xb, yb = next(it)
        if to_float is not None:
            xb = to_float(xb)
        n_images += len(yb)
    seconds = time.perf_counter() - start
    del it
    return n_images, seconds


def dlcourse_per_item(files, labels, args):
    from dlcourse.datablock import ItemDataLoader, ItemList, LabeledData, OpenImage, ToByteTensor
    from dlcourse.augment import PilRandomResizedCrop
    tfms = [OpenImage(), PilRandomResizedCrop(args.size, scale=(0.35, 1.)), ToByteTensor()]
    ds = LabeledData(ItemList(files, tfms=tfms), ItemList(labels))
    dl = ItemDataLoader(ds, args.bs, shuffle=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    return lambda: measure(dl, args.batches, to_float=lambda xb: xb.float().div_(255.))


def dlcourse_cached(files, labels, args):
    from dlcourse.augment import BatchRandomResizedCrop
    from dlcourse.datablock import ToFloatTensor
    from dlcourse.fastdata import DeviceLoader, image_cache
    start = time.perf_counter()
    images = image_cache(files, args.size, name="imagenette2-128-train", progress=False)  # shared with cached_dataloaders
    print(json.dumps({"path": "cached", "cache_ready_s": round(time.perf_counter() - start, 2),
                      "cache_mb": round(images.numel() / 1e6, 1)}), flush=True)
    dl = DeviceLoader(images, torch.tensor(labels), args.bs, shuffle=True, device=args.device,
                      batch_tfms=[ToFloatTensor(), BatchRandomResizedCrop(args.size, scale=(0.35, 1.))])
    return lambda: measure(dl, args.batches)


def fastai_datablock(path, args):
    from fastai.vision.all import (CategoryBlock, DataBlock, FlipItem, GrandparentSplitter, ImageBlock,
                                   RandomResizedCrop, get_image_files, parent_label)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files,
                      splitter=GrandparentSplitter(valid_name="val"), get_y=parent_label,
                      item_tfms=[RandomResizedCrop(args.size, min_scale=0.35), FlipItem(0.5)])
    dls = block.dataloaders(path, bs=args.bs, num_workers=args.workers, device=torch.device("cpu"))
    return lambda: measure(dls.train, args.batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the per-item loaders")
    parser.add_argument("--device", default="auto", help="device of the cached path")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the main process (default 0: torch's default, one per core; on a "
                             "machine shared with other jobs, 1 avoids threads stalling each other)")
    parser.add_argument("--paths", default="per_item,cached,fastai")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dlcourse.datablock import IMAGE_EXTENSIONS, CategoryProcessor, get_files, parent_label
    from dlcourse.datasets import imagenette
    path = imagenette(128, progress=False)
    files = get_files(path / "train", IMAGE_EXTENSIONS)
    proc = CategoryProcessor()
    proc.fit([parent_label(f) for f in files])
    labels = proc.process([parent_label(f) for f in files], files)

    runners = {}
    for name in args.paths.split(","):
        if name == "per_item":
            runners[name] = dlcourse_per_item(files, labels, args)
        elif name == "cached":
            runners[name] = dlcourse_cached(files, labels, args)
        elif name == "fastai":
            try:
                runners[name] = fastai_datablock(path, args)
            except ImportError as e:
                print(json.dumps({"path": "fastai", "skipped": f"fastai not importable here ({e})"}), flush=True)

    results = {name: [] for name in runners}
    for repeat in range(args.repeats):
        for name, run in runners.items():
            n_images, seconds = run()
            results[name].append(n_images / seconds)
            print(json.dumps({"path": name, "repeat": repeat, "images": n_images, "seconds": round(seconds, 3),
                              "images_per_s": round(n_images / seconds, 1)}), flush=True)

    medians = {name: round(statistics.median(v), 1) for name, v in results.items()}
    ratios = {f"{name}/fastai": round(medians[name] / medians["fastai"], 2)
              for name in medians if name != "fastai" and "fastai" in medians}
    conditions = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": args.workers,
                  "bs": args.bs, "size": args.size, "batches": args.batches, "repeats": args.repeats,
                  "device": args.device, "python": platform.python_version(), "torch": torch.__version__,
                  "load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({"summary": {"median_images_per_s": medians, "ratios": ratios, "conditions": conditions}}))


if __name__ == "__main__":
    sys.exit(main())
