#!/usr/bin/env bash
# Imagenette on one GPU with dlcourse.train: one recipe, 3 seeds, one JSON line per run on stdout. These are the
# training steps of bench/gpu_all.sh (data, grid, pick, seeds, best-summary) for a single recipe, without its 8-minute
# budget: this script sets that script's settings and runs it.
#
# Usage (from the repository root):
#   bench/imagenette_gpu.sh                      # the GPU benchmark: 128px, 5 epochs, seeds 0 1 2
#   SEEDS="0" EPOCHS=1 SIZE=32 BS=32 ARCH=xresnet18 DEVICE=cpu DATA=tiny bench/imagenette_gpu.sh   # a CPU smoke test
#
# The archive: put imagenette2-128.tgz (../shared/data/ has it) in data_local/, a folder git ignores, and name it in
# the run's carry list; the data step extracts it there once and builds the image cache (or DATA=<folder, archive or
# name>). The recipe: RECIPE, one of gpu_all.sh's (default xresnet50-ranger-bs128: xresnet50 at full width, Mish,
# Ranger at lr 8e-3 with weight decay 1e-2, flat-cos, batches of 128, label smoothing 0.1, random resized crop, no
# mixup); ARCH, WIDTH, ACT, MIXUP, LR, OPT, SCHED, WD, SIZE, EPOCHS, BS and DEVICE change its settings, and EXTRA adds
# flags of `dlcourse train` that set any other (e.g. EXTRA="--precision fp32").
# Each invocation writes into a new folder, bench/results/imagenette_gpu-<date-time>/ (git-ignored; OUT= names another,
# which must not hold an earlier run): gpu.jsonl, every step's log in logs/ and each run's full results in runs/. Every
# line of gpu.jsonl also goes to stdout: the data step's, one per run
#   {"step": "grid-<recipe>" or "seeds-<recipe>-<seed>", "recipe": ..., "seed": 0, "accuracy": ..., "fit_seconds": ...,
#    "prep_seconds": ..., "images_per_second": ..., "opt": ..., "sched": ..., ...}
# then best-summary, with the mean and spread over the seeds, a status line after each step, and a last "done" line.
# The exit status is 0 when every step succeeded.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

flags=()
for setting in ARCH ACT MIXUP LR OPT SCHED WD; do  # (WIDTH, SIZE, EPOCHS, BS, DEVICE, DATA: gpu_all.sh's own settings)
    [ -z "${!setting:-}" ] || flags+=("--$(echo "$setting" | tr '[:upper:]' '[:lower:]')" "${!setting}")
done
export GRID=${RECIPE:-xresnet50-ranger-bs128} SEEDS=${SEEDS:-"0 1 2"} ONLY="env data grid pick seeds best" \
    TRAIN_FLAGS="${flags[*]} ${EXTRA:-}" OUT=${OUT:-bench/results/imagenette_gpu-$(date +%Y%m%d-%H%M%S)}
export WORK=${WORK:-$OUT} BUDGET=${BUDGET:-86400} CAP_DATA=${CAP_DATA:-3600} CAP_RUN=${CAP_RUN:-14400}
exec bash bench/gpu_all.sh
