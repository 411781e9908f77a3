"""Time one optimizer `step()` on the parameters of a ResNet-50 (about 25.6M parameters, 161 tensors) on the CPU:
dlcourse's `Adam` and `SGD` side by side with `torch.optim.AdamW(foreach=True)` and `torch.optim.SGD(foreach=True)`,
with the same hyper-parameters.

The four optimizers are timed in one run, interleaved (each round times every one of them once, in a rotating order),
so that a noisy, shared machine slows them all alike; the medians over the rounds are reported. Prints one JSON line
per optimizer, one per ratio (ours / PyTorch's), and a closing summary line. Target: ratio <= 1.25.

    python bench/optimizer_step.py [--rounds 15] [--threads N] [--device cpu]
"""
import argparse
import json
import statistics
import time

import torch

from dlcourse.optimizers import SGD, Adam


def resnet50_shapes() -> list[tuple]:
    "The shapes of the parameters of torchvision's ResNet-50 (built on the meta device: no memory, no init)."
    from torchvision.models import resnet50
    with torch.device("meta"):
        model = resnet50()
    return [tuple(p.shape) for p in model.parameters()]


def make_params(shapes, device, seed:int=0) -> list[torch.nn.Parameter]:
    "Parameters of `shapes` with random values and random gradients (the same for every call with `seed`)."
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device) * 1e-2
        params.append(p)
    return params


CONTENDERS = {
    # name: (constructor, baseline name or None)
    "torch.optim.AdamW(foreach)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                                                weight_decay=1e-2, foreach=True), None),
    "dlcourse.Adam": (lambda ps: Adam(ps, lr=1e-3, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=1e-2),
                      "torch.optim.AdamW(foreach)"),
    "torch.optim.SGD(foreach)": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, foreach=True), None),
    "dlcourse.SGD": (lambda ps: SGD(ps, lr=1e-2, mom=0.9), "torch.optim.SGD(foreach)"),
}


def sync(device):
    "Wait for the device to finish its queued work (a no-op on the CPU)."
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(opt, device) -> float:
    "Seconds taken by one `opt.step()`."
    sync(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per optimizer (interleaved)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (state creation)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = resnet50_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    opts = {name: make(make_params(shapes, device)) for name, (make, _) in CONTENDERS.items()}
    for opt in opts.values():
        for _ in range(args.warmup):
            opt.step()
    times = {name: [] for name in opts}
    names = list(opts)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            times[name].append(time_step(opts[name], device))
    meta = {"device": str(device), "threads": torch.get_num_threads(), "n_params": n_params, "n_tensors": len(shapes),
            "rounds": args.rounds, "torch": torch.__version__}
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(json.dumps({"optimizer": name, "median_ms": round(1e3 * medians[name], 2),
                          "min_ms": round(1e3 * min(ts), 2), "max_ms": round(1e3 * max(ts), 2), **meta}))
    ratios = {}  # the median over rounds of (ours / PyTorch's) in the same round: robust to slow phases of the machine
    for name, (_, baseline) in CONTENDERS.items():
        if baseline is None:
            continue
        ratios[name] = statistics.median(a / b for a, b in zip(times[name], times[baseline]))
        print(json.dumps({"ratio": f"{name} / {baseline}", "median_of_round_ratios": round(ratios[name], 3),
                          "ratio_of_medians": round(medians[name] / medians[baseline], 3), "target": 1.25,
                          "ok": ratios[name] <= 1.25}))
    print(json.dumps({"summary": {name: round(r, 3) for name, r in ratios.items()},
                      "all_within_target": all(r <= 1.25 for r in ratios.values())}))


if __name__ == "__main__":
    main()
