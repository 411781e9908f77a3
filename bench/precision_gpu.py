#!/usr/bin/env python
"""Training speed of each precision: xresnet50 at 128px, batch 256, through the dlcourse Learner, in FP32, from-scratch
FP16 (`MixedPrecision`), AMP FP16 (autocast + GradScaler) and AMP BF16, each with and without channels_last.

Needs a CUDA GPU; without one it says so and exits with status 0 (so `make bench` goes on). `--smoke` runs a tiny
version (small images, small batch, a few steps) on whatever device there is, the CPU included, to check the script.

Output: one JSON line per setting on stdout (also appended to `--out` if given), then a markdown table of images/s.
The batch is one real Imagenette batch (read from imagenette2-128.tgz found through DLCOURSE_DATA), repeated; without
the archive a random batch of the same shape is used (the speed of these models does not depend on pixel values).
"""
import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from dlcourse.core import find_data, set_seed  # noqa: E402
from dlcourse.fp16 import AMP, ChannelsLast, MixedPrecision  # noqa: E402
from dlcourse.learner import ORDER, Callback, DataLoaders, Learner  # noqa: E402

SETTINGS = ("fp32", "fp16_scratch", "amp_fp16", "amp_bf16")
LABELS = {"fp32": "FP32", "fp16_scratch": "FP16 from scratch", "amp_fp16": "AMP FP16", "amp_bf16": "AMP BF16"}
IMAGENET_STATS = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))


def parse_args(argv=None):
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bs", type=int, default=256, help="batch size")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (cuDNN autotuning, loss-scale settling)")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per setting")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)}")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for the FP32 matmuls/convolutions (default: true FP32)")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--model", default="xresnet50", choices=("xresnet18", "xresnet50"), help="the model to train")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run (xresnet18, 16px, batch 4, 2 steps) on any device, CPU included")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.bs, args.size, args.warmup, args.steps = "xresnet18", 4, 16, 1, 2
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {SETTINGS}")
    return args


def build_model(name:str="xresnet50", n_out:int=10):
    """`name` from dlcourse.xresnet, or torchvision's resnet of the same depth (with a printed note) if that is missing."""
    try:
        from dlcourse import xresnet
        return name, getattr(xresnet, name)(n_out=n_out)
    except ImportError as e:
        fallback = name.replace("xresnet", "resnet")
        print(f"note: dlcourse.xresnet not importable ({e}); falling back to torchvision.models.{fallback}", file=sys.stderr)
        import torchvision
        return f"torchvision {fallback}", getattr(torchvision.models, fallback)(num_classes=n_out)


def imagenette_batch(bs:int, size:int):
    """`bs` training images of imagenette2-128.tgz, as many of each class (resized, normalised), and labels; or None."""
    try:
        archive = find_data("imagenette2-128.tgz")
    except FileNotFoundError:
        return None
    from PIL import Image
    per_class = -(-bs // 10)  # Imagenette has 10 classes
    images, wnids = [], []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and "/train/" in member.name and member.name.endswith(".JPEG")):
                continue
            wnid = member.name.split("/")[-2]
            if wnids.count(wnid) >= per_class:
                continue
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((size, size))
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3))
            wnids.append(wnid)
            if len(wnids) == 10 * per_class:
                break
    images, wnids = images[:bs], wnids[:bs]
    if len(images) < bs:
        return None
    x = torch.stack(images).permute(0, 3, 1, 2).float().div(255)  # (bs, 3, size, size)
    mean, std = IMAGENET_STATS
    x = (x - mean[:, None, None]) / std[:, None, None]
    vocab = sorted(set(wnids))
    return x, torch.tensor([vocab.index(w) for w in wnids])


class RepeatBatch:
    """A loader that yields the same (already placed) batch `n` times: no data-loading cost in the measurement."""
    def __init__(self, xb, yb, n:int):
        self.xb, self.yb, self.n = xb, yb, n
        self.dataset = range(n * len(yb))

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([(self.xb, self.yb)] * self.n)


class StepTimer(Callback):
    """Times the training steps after the first `warmup` ones (synchronising the GPU at both ends)."""
    order = ORDER["timer"]  # the clock starts before the other callbacks' before_batch

    def __init__(self, warmup:int):
        self.warmup = warmup

    def _sync(self, learn):
        if learn.device.type == "cuda":
            torch.cuda.synchronize(learn.device)

    def before_batch(self, learn):
        if learn.training and learn.iter == self.warmup:
            self._sync(learn)
            self.start = time.perf_counter()

    def after_train(self, learn):
        self._sync(learn)
        self.seconds = time.perf_counter() - self.start


def precision_cbs(setting:str, channels_last:bool) -> list:
    """The callbacks of one setting."""
    if setting == "fp32":
        return [ChannelsLast()] if channels_last else []
    if setting == "fp16_scratch":
        return [MixedPrecision(), *([ChannelsLast()] if channels_last else [])]
    return [AMP(setting.removeprefix("amp_"), channels_last=channels_last)]


def measure(setting:str, channels_last:bool, batch, device, args) -> dict:
    """Train for warmup + steps batches in one setting; return the measurements."""
    set_seed(0)
    model_name, model = build_model(args.model, n_out=10)
    cbs = precision_cbs(setting, channels_last)
    timer = StepTimer(args.warmup)
    dls = DataLoaders(RepeatBatch(*batch, n=args.warmup + args.steps))
    opt_func = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)
    learn = Learner(model, dls, lr=0.01, opt_func=opt_func, cbs=[*cbs, timer], progress=False, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    learn.fit(1)
    precision_cb = cbs[0] if cbs and not isinstance(cbs[0], ChannelsLast) else None
    row = {"setting": setting, "label": LABELS[setting], "channels_last": channels_last, "model": model_name,
           "bs": args.bs, "size": args.size, "steps": args.steps,
           "images_per_s": round(args.steps * args.bs / timer.seconds, 1),
           "ms_per_step": round(1000 * timer.seconds / args.steps, 2),
           "skipped_steps": getattr(precision_cb, "skipped_steps", 0),
           "loss_scale": getattr(precision_cb, "scale", 1.0),
           "final_loss": round(learn.recorder.losses[-1], 4)}
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def print_table(rows:list[dict]):
    """A markdown table: one line per precision, NCHW and channels_last side by side, speed-up vs FP32 NCHW."""
    by_key = {(r["setting"], r["channels_last"]): r["images_per_s"] for r in rows}
    base = by_key.get(("fp32", False))
    print("\n| precision | images/s (NCHW) | images/s (channels_last) | speed-up vs FP32 NCHW (best) |")
    print("| --- | ---: | ---: | ---: |")
    for setting in dict.fromkeys(r["setting"] for r in rows):
        nchw, cl = by_key.get((setting, False)), by_key.get((setting, True))
        best = max(v for v in (nchw, cl) if v is not None)
        ratio = f"{best / base:.2f}x" if base else "n/a"
        print(f"| {LABELS[setting]} | {nchw or 'n/a'} | {cl or 'n/a'} | {ratio} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("precision_gpu.py: no CUDA GPU found, so there is nothing to measure (mixed precision speed is a GPU "
              "matter). Run it on a CUDA machine, or with --smoke to check the script on this one.", file=sys.stderr)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    settings = list(args.settings)
    if "amp_bf16" in settings and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("note: this GPU does not support bfloat16; skipping amp_bf16", file=sys.stderr)
        settings.remove("amp_bf16")
    batch = imagenette_batch(args.bs, args.size)
    data = "imagenette2-128 batch"
    if batch is None:
        print("note: imagenette2-128.tgz not found through DLCOURSE_DATA; timing on a random batch", file=sys.stderr)
        batch = (torch.randn(args.bs, 3, args.size, args.size), torch.randint(0, 10, (args.bs,)))
        data = "random batch"
    batch = tuple(t.to(device) for t in batch)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "tf32": args.tf32, "data": data, "smoke": args.smoke}
    rows = []
    for setting in settings:
        for channels_last in (False, True):
            row = {**measure(setting, channels_last, batch, device, args), **env}
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
