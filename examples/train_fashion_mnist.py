#!/usr/bin/env python
"""The demo run (`make demo`): a small CNN trained on real Fashion-MNIST with the dlcourse Learner.

Prints the progress bar and the epoch table, then saves the loss plot and the results under --out.
"""
import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dlcourse.core import load_fashion_mnist, set_seed
from dlcourse.learner import DataLoaders, Learner, accuracy


def conv_block(ni, nf):
    "3x3 convolution with stride 2 (halves the feature map), BatchNorm, ReLU."
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())


def small_cnn(n_out=10):
    "28x28 -> 14 -> 7 -> 4 -> 2 -> global average pool -> linear."
    return nn.Sequential(conv_block(1, 16), conv_block(16, 32), conv_block(32, 64), conv_block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, n_out))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files (default: DLCOURSE_DATA)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--n-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="demo_out", help="folder for loss.png and results.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    set_seed(args.seed)
    data = load_fashion_mnist(args.data)
    x_train = data["x_train"][: args.n_train].float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x_valid = data["x_valid"].float().div(255).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    dls = DataLoaders.from_datasets(TensorDataset((x_train - mean) / std, data["y_train"][: args.n_train]),
                                    TensorDataset((x_valid - mean) / std, data["y_valid"]), bs=args.bs)
    print(f"Fashion-MNIST: {dls}")
    learn = Learner(small_cnn(), dls, lr=args.lr, metrics=[accuracy], progress=not args.no_progress)
    learn.fit(args.epochs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ax = learn.recorder.plot_loss()
    ax.set_title(f"Fashion-MNIST, small CNN, {args.epochs} epochs")
    ax.figure.savefig(out / "loss.png", dpi=100, bbox_inches="tight")
    (out / "results.json").write_text(json.dumps(learn.recorder.history, indent=1))
    print(f"final validation accuracy {learn.recorder.history[-1]['accuracy']:.4f}; "
          f"loss plot: {out / 'loss.png'}, results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
