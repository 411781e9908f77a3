#!/usr/bin/env python
"""Data augmentation throughput: a per-image PIL pipeline against the batched tensor pipeline of `dlcourse.augment`.

The work, the same on both sides (128px images, decoded once up front: JPEG decoding is not timed):
random resized crop to 128 (area 35-100%, aspect ratio 3/4-4/3), random left-right flip, random rotation up to 10
degrees, random brightness and contrast, to a float tensor in [0, 1], normalisation.

- pil: per image, `PilRandomResizedCrop` + `PilRandomRotate` + PIL `ImageEnhance` brightness/contrast + `ToByteTensor`,
  then stack, float and normalise the batch; one core, in the main process (a DataLoader with k workers runs k of
  these in parallel).
- batched: the uint8 batch through `ToFloatTensor`, `AffineAugment` (crop, flip and rotation composed into one matrix
  per image, one `grid_sample`), `BatchLighting`, `Normalize`; with 1 torch thread, and with --threads threads.

CPU measurements are interleaved (each repeat runs every path once), so that the load of a shared machine hits them
alike; medians are reported, with the ratios batched/pil. Then, when a CUDA device is present, the GPU part: the time
of the batched augmentation (plus random erasing) of 256 uint8 images at 128px, as a fraction of one xresnet50
training step (bf16 autocast, channels_last, SGD) on the same batch; target under 5%. Without CUDA it is skipped with
a message. Output: one JSON line per measurement and a summary line.

    python bench/augment.py [--bs 64] [--batches 4] [--repeats 3] [--threads 2]
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch


def load_images(n):
    "The first `n` images of the bundled tiny Imagenette sample (train, then val), decoded: RGB PIL images, 128px."
    from dlcourse.datablock import IMAGE_EXTENSIONS, get_files, load_image
    from dlcourse.datasets import tiny_imagenette
    root = tiny_imagenette()
    files = get_files(root / "train", IMAGE_EXTENSIONS) + get_files(root / "val", IMAGE_EXTENSIONS)
    images = [load_image(f) for f in files[:n]]
    for img in images:
        img.load()
    return images


def normalizer():
    "The normalisation both pipelines end with (rough Imagenette statistics)."
    from dlcourse.datablock import Normalize
    return Normalize([0.47, 0.46, 0.43], [0.27, 0.26, 0.29])


class PilLighting:
    "Random brightness and contrast of a PIL image with ImageEnhance (factors in [1 - amount, 1 + amount])."
    def __init__(self, brightness=0.2, contrast=0.3):
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, img):
        from PIL import ImageEnhance
        img = ImageEnhance.Brightness(img).enhance(random.uniform(1 - self.brightness, 1 + self.brightness))
        return ImageEnhance.Contrast(img).enhance(random.uniform(1 - self.contrast, 1 + self.contrast))


def pil_pipeline(size):
    "Per image: crop + flip, rotate, lighting, to uint8 tensor; per batch: stack, float, normalise."
    from dlcourse.augment import PilRandomResizedCrop, PilRandomRotate
    from dlcourse.datablock import ToByteTensor, compose
    item_tfms = [PilRandomResizedCrop(size, scale=(0.35, 1.)), PilRandomRotate(10., p=1.), PilLighting(), ToByteTensor()]
    norm = normalizer()

    def run(pils):
        xb = torch.stack([compose(img, item_tfms) for img in pils])  # (bs, 3, size, size) uint8
        return norm(xb.float().div_(255.))
    return run


def batched_pipeline(size, erasing=False):
    "Per batch: uint8 -> float, one affine resampling (crop + flip + rotate), lighting, normalise (and erasing)."
    from dlcourse.augment import AffineAugment, BatchErasing, BatchLighting
    from dlcourse.datablock import ToFloatTensor, compose
    tfms = [ToFloatTensor(), AffineAugment(size, crop_scale=(0.35, 1.), max_rotate=10., max_zoom=1., p=1.),
            BatchLighting(0.2, 0.3, p=1.), normalizer()]
    if erasing:
        tfms.append(BatchErasing(p=0.5))
    return lambda xb: compose(xb, tfms)


def time_cpu(fn, batches, n_batches):
    "Images per second of `fn` over `n_batches` batches (after one warm-up batch)."
    fn(batches[0])
    start, n_images = time.perf_counter(), 0
    for i in range(n_batches):
        out = fn(batches[i % len(batches)])
        n_images += len(out)
    return n_images / (time.perf_counter() - start)


def cpu_part(args, pils):
    "Interleaved CPU measurements; returns the medians in images/s."
    from dlcourse.datablock import ToByteTensor
    pil_batches = [pils[i:i + args.bs] for i in range(0, len(pils) - args.bs + 1, args.bs)]
    tensor_batches = [torch.stack([ToByteTensor()(img) for img in b]) for b in pil_batches]  # uint8 (bs, 3, h, w)
    pil_run, batched_run = pil_pipeline(args.size), batched_pipeline(args.size)
    paths = {"pil": (lambda: time_cpu(pil_run, pil_batches, args.batches), 1),
             "batched_1_thread": (lambda: time_cpu(batched_run, tensor_batches, args.batches), 1),
             f"batched_{args.threads}_threads": (lambda: time_cpu(batched_run, tensor_batches, args.batches), args.threads)}
    results = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, (run, threads) in paths.items():
            torch.set_num_threads(threads)
            images_per_s = run()
            results[name].append(images_per_s)
            print(json.dumps({"part": "cpu", "path": name, "repeat": repeat, "torch_threads": threads,
                              "images_per_s": round(images_per_s, 1)}), flush=True)
    torch.set_num_threads(args.threads)
    return {name: round(statistics.median(v), 1) for name, v in results.items()}


def cuda_ms(fn, n, warmup=3):
    "Median milliseconds of `fn()` on the current CUDA device over `n` calls, timed with CUDA events."
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_part(args, pils):
    "Batched augmentation of 256 images at 128px against one xresnet50 training step, on the GPU."
    import torch.nn.functional as F
    from dlcourse.augment import sampling_grid
    from dlcourse.datablock import ToByteTensor
    from dlcourse.xresnet import xresnet50
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    bs = args.gpu_bs
    xb = torch.stack([ToByteTensor()(pils[i % len(pils)]) for i in range(bs)]).to(device)  # (bs, 3, 128, 128) uint8
    yb = torch.randint(0, 10, (bs,), device=device)
    augment = batched_pipeline(args.size, erasing=True)
    aug_ms = cuda_ms(lambda: augment(xb), args.gpu_iters)

    mats = torch.eye(3, device=device).expand(bs, 3, 3).contiguous()
    grid_ms = {"sampling_grid (matmul)": cuda_ms(lambda: sampling_grid(mats, args.size, args.size), args.gpu_iters),
               "F.affine_grid": cuda_ms(lambda: F.affine_grid(mats[:, :2], (bs, 3, args.size, args.size),
                                                              align_corners=False), args.gpu_iters)}

    model = xresnet50(n_out=10).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs = augment(xb).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(inputs), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_ms = cuda_ms(step, args.gpu_iters, warmup=5)
    result = {"part": "gpu", "device": torch.cuda.get_device_name(), "bs": bs, "size": args.size,
              "augment_ms": round(aug_ms, 3), "xresnet50_step_ms": round(step_ms, 2),
              "augment_fraction_of_step": round(aug_ms / step_ms, 4), "target": "< 0.05",
              "grid_ms": {k: round(v, 4) for k, v in grid_ms.items()}}
    print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bs", type=int, default=64, help="CPU batch size")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per CPU measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads, batched path")
    parser.add_argument("--gpu-bs", type=int, default=256)
    parser.add_argument("--gpu-iters", type=int, default=20)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    random.seed(0)
    torch.manual_seed(0)
    pils = load_images(max(args.bs * 4, 256))

    summary = {}
    if not args.skip_cpu:
        medians = cpu_part(args, pils)
        summary["cpu_median_images_per_s"] = medians
        summary["cpu_ratios"] = {f"{name}/pil": round(v / medians["pil"], 2) for name, v in medians.items() if name != "pil"}
    if torch.cuda.is_available():
        summary["gpu"] = gpu_part(args, pils)
    else:
        message = "skipped: no CUDA device here; run this script on a machine with one for the GPU part"
        print(json.dumps({"part": "gpu", "skipped": message}), flush=True)
        summary["gpu"] = message
    summary["conditions"] = {"cpus": os.cpu_count(), "torch_threads": args.threads, "bs": args.bs, "size": args.size,
                             "batches": args.batches, "repeats": args.repeats, "python": platform.python_version(),
                             "torch": torch.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
