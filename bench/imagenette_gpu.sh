#!/usr/bin/env bash
# Imagenette on one GPU with `dlcourse train`: 3 seeds, one JSON line per run on stdout.
#
# Usage (from the repository root):
#   bench/imagenette_gpu.sh                      # the GPU benchmark: 128px, 5 epochs, seeds 0 1 2
#   SEEDS="0" EPOCHS=1 SIZE=32 BS=32 ARCH=xresnet18 DEVICE=cpu DATA=tiny bench/imagenette_gpu.sh   # a CPU smoke test
#
# The archive: put imagenette2-128.tgz (../shared/data/ has it) in data_local/, a folder git ignores, and name
# data_local in the run's carry list; the script extracts it there once (or uses DATA=<folder, archive or name>).
# Each invocation writes into a new folder, bench/results/imagenette_gpu-<date-time>/ (git-ignored; OUT= names another,
# which must not hold earlier runs), its full results under seed<N>/, and prints one line per run:
#   {"seed": 0, "accuracy": ..., "fit_seconds": ..., "prep_seconds": ..., "images_per_second": ..., ...}
# then a last line with the mean and spread over the seeds. Any flag of `dlcourse train` can be added with EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ARCHIVE=${ARCHIVE:-data_local/imagenette2-128.tgz}
SEEDS=${SEEDS:-"0 1 2"}
ARCH=${ARCH:-xresnet50}
WIDTH=${WIDTH:-1}    # the CLI's defaults (half width, mixup 0.2) are tuned for the tiny sample, not for Imagenette
MIXUP=${MIXUP:-0}
ACT=${ACT:-mish}
SIZE=${SIZE:-128}
EPOCHS=${EPOCHS:-5}
BS=${BS:-128}
LR=${LR:-8e-3}
OPT=${OPT:-ranger}
SCHED=${SCHED:-flat_cos}
WD=${WD:-1e-2}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
OUT=${OUT:-bench/results/imagenette_gpu-$(date +%Y%m%d-%H%M%S)}

if [ -z "${DATA:-}" ]; then
    if [ ! -d data_local/imagenette2-128/train ]; then
        [ -f "$ARCHIVE" ] || { echo "imagenette_gpu.sh: $ARCHIVE not found (copy ../shared/data/imagenette2-128.tgz there)" >&2; exit 1; }
        start=$SECONDS
        tar -xzf "$ARCHIVE" -C data_local
        echo "extracted $ARCHIVE in $((SECONDS - start)) s" >&2
    fi
    DATA=data_local/imagenette2-128
fi

# A private image cache shared by the invocations: the first run decodes the JPEGs (its prep_seconds), later ones reuse it.
export DLCOURSE_CACHE=${DLCOURSE_CACHE:-bench/results/cache}
export TQDM_DISABLE=1
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "imagenette_gpu.sh: $OUT already holds files: give a new OUT (each invocation writes a folder of its own)" >&2
    exit 1
fi
mkdir -p "$OUT"

for seed in $SEEDS; do
    run_dir="$OUT/seed$seed"
    # shellcheck disable=SC2086  # EXTRA is split into flags on purpose
    "$PYTHON" -m dlcourse train --data "$DATA" --arch "$ARCH" --width "$WIDTH" --mixup "$MIXUP" --act "$ACT" --size "$SIZE" --epochs "$EPOCHS" \
        --bs "$BS" --lr "$LR" --opt "$OPT" --sched "$SCHED" --wd "$WD" --device "$DEVICE" --seed "$seed" \
        --no-progress --out "$run_dir" $EXTRA > "$run_dir.log" 2>&1 \
        || { echo "imagenette_gpu.sh: seed $seed failed; last lines of $run_dir.log:" >&2; tail -5 "$run_dir.log" >&2; exit 1; }
    "$PYTHON" - "$run_dir/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["accuracy", "fit_seconds", "train_seconds", "prep_seconds", "images_per_second"]
line = {"seed": r["settings"]["seed"], **{k: round(r[k], 4) for k in keys},
        "epochs_accuracy": [round(e["accuracy"], 4) for e in r["epochs"]],
        "arch": r["settings"]["arch"], "width": r["settings"]["width"], "mixup": r["settings"]["mixup"], "size": r["settings"]["size"], "epochs": r["settings"]["epochs"],
        "bs": r["settings"]["bs"], "lr": r["settings"]["lr"], "opt": r["settings"]["opt"],
        "precision": r["resolved"]["precision"], "device": r["device"]["name"], "torch": r["versions"]["torch"]}
print(json.dumps(line), flush=True)
EOF
done

"$PYTHON" - "$OUT" $SEEDS <<'EOF'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
runs = [json.load(open(f"{out}/seed{s}/results.json")) for s in seeds]
acc = [r["accuracy"] for r in runs]
fit = [r["fit_seconds"] for r in runs]
print(json.dumps({"summary": True, "runs": len(runs), "accuracy_mean": round(statistics.mean(acc), 4),
                  "accuracy_min": round(min(acc), 4), "accuracy_max": round(max(acc), 4),
                  "fit_seconds_mean": round(statistics.mean(fit), 2), "fit_seconds_max": round(max(fit), 2)}))
EOF
