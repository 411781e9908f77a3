#!/usr/bin/env bash
# Every GPU check of dlcourse in one unattended run of at most 8 minutes, one JSON line per result.
#
# Steps, in order (each under its own `timeout`, each result appended to $OUT/gpu.jsonl as soon as it exists, a failed
# or timed-out step recorded with the last lines of its log, and the next step run anyway):
#   env        GPU, memory, torch / CUDA / cuDNN versions, CPUs, the settings of this run
#   data       extract Imagenette (data_local/imagenette2-128.tgz) and the Fashion-MNIST prefix, build the image cache
#   cells-*    the notebooks' `#| cuda` cells: tools/run_cells.py runs each notebook that has one, flags cuda
#   precision  bench/precision_gpu.py (FP32, FP16 from scratch, AMP FP16/BF16, with and without channels_last)
#   augment    bench/augment.py --skip-cpu (batched augmentation as a fraction of a training step)
#   grid-*     Imagenette 128px, 5 epochs, one seed (the first of SEEDS) per recipe of GRID, through dlcourse.train
#              (no checkpoints)
#   pick       the best grid recipe: the most accurate of those with fit_seconds <= FIT_TARGET, else the most accurate
#   seeds-*    that recipe with the other SEEDS (by default 1 and 2), then best-summary: mean/min/max over all its seeds
#   ref-*      the course's two reference runs at 128px, 5 epochs: the lesson-11 CNN (73.6% in the course) and the
#              lesson-12 xresnet34 recipe (82.4%), with the course's optimizer, schedule and batch size
#   done       totals
# A global deadline (BUDGET seconds from the start) clips every step's timeout, keeping the time the later steps that
# ONLY selects need (a grid recipe that no longer fits is recorded as skipped), so the whole run ends within BUDGET plus
# a few seconds. Each training run also prints its optimizer (class and hyper-parameters, as the trained learner holds
# them) and its schedule (the learning rate and momentum of its first, highest and last batch, as the Recorder saw them).
#
# On the GPU machine (one `run` call of the device tool):
#   1. here, first:  bench/gpu_all.sh prepare
#      puts imagenette2-128.tgz and fashion-mnist-prefix.tar.xz (the first 12,928 training and 5,000 test images of
#      Fashion-MNIST, what the notebooks' non-slow cells use; the whole set does not fit in what travels) into
#      data_local/ (git-ignored) and checks that the working tree plus those two files stay under 64 MiB.
#   2. run:  command   PYTHONPATH=. bash bench/gpu_all.sh
#            carry     ["data_local/imagenette2-128.tgz", "data_local/fashion-mnist-prefix.tar.xz"]
#            timeout_s 540   (BUDGET 480 s of steps, plus the script's own seconds)
#   3. the JSON lines come back in the tool's $OUT as gpu.jsonl (step logs and each run's results.json in logs.tgz);
#      copy gpu.jsonl to bench/results/gpu_all-<date>/ here: .gitignore lets bench/results/*/*.jsonl be committed.
# Without an OUT in the environment the run writes into a new folder bench/results/gpu_all-<date-time>/.
# bench/imagenette_gpu.sh runs the training steps alone, for one recipe and without the budget, through this script.
#
# A tiny end-to-end check on a CPU (every step in its small form, a couple of minutes):
#   OMP_NUM_THREADS=1 DEVICE=cpu DATA=tiny SIZE=32 EPOCHS=1 BS=16 WIDTH=0.25 STANDINS=1 bench/gpu_all.sh
# Settings (environment): DEVICE (cuda), DATA (empty: the extracted archive; or tiny, a folder, an archive), SIZE (128),
# EPOCHS (5), BS and WIDTH (empty: each recipe's own; set them for tiny runs), BUDGET (480), FIT_TARGET (15),
# GRID (recipe names, see RECIPES below), SEEDS ("0 1 2"), TRAIN_FLAGS (flags of `dlcourse train` that set fields of
# every recipe, e.g. "--arch xresnet18 --lr 1e-3"), CELLS (notebooks; default: those with a `#| cuda` code cell),
# CELL_FLAGS (cuda on a GPU, none on a CPU), STANDINS (1: IPython/fastcore stand-ins even where installed), OUT, WORK,
# ONLY (step names or prefixes to run, e.g. ONLY="env data ref" for a short rerun), CAP_* (per-step caps, below).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DLCOURSE_DATA="$ROOT/data_local${DLCOURSE_DATA:+:$DLCOURSE_DATA}"
export DLCOURSE_CACHE=${DLCOURSE_CACHE:-$ROOT/bench/results/cache}
export TQDM_DISABLE=1 MPLBACKEND=${MPLBACKEND:-Agg} PYTHONUNBUFFERED=1  # unbuffered: a killed step's log keeps its last lines
ARCHIVE=${ARCHIVE:-data_local/imagenette2-128.tgz}
FASHION_XZ=data_local/fashion-mnist-prefix.tar.xz
FASHION_TRAIN=${FASHION_TRAIN:-12928}  # 08_fp16 trains on x_train[:12_800] and tests on the next 128
FASHION_VALID=${FASHION_VALID:-5000}   # ... and validates on x_valid[:5000]
TRAVEL_LIMIT=$((64 * 1024 * 1024))

# --------------------------------------------------------------------------------------------------- prepare (here)
read -r -d '' PREPARE_PY <<'EOF'
import io, json, lzma, os, shutil, subprocess, sys, tarfile
from pathlib import Path
from dlcourse.core import _find_idx, find_data, read_idx
archive, fashion_xz, n_train, n_valid, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
Path("data_local").mkdir(exist_ok=True)
if not Path(archive).exists():
    source = find_data("imagenette2-128.tgz")  # DLCOURSE_DATA, or ../shared/data beside the checkout
    shutil.copyfile(source, archive)
    print(f"copied {source} to {archive}", file=sys.stderr)

def idx_prefix(path, n):
    "The first `n` items of the uint8 IDX file at `path` (gzipped or not), as the bytes of an IDX file of their own."
    items = read_idx(path)[:n]
    assert items.dtype.itemsize == 1, f"{path}: not a uint8 IDX file"
    head = bytes([0, 0, 0x08, items.ndim]) + b"".join(d.to_bytes(4, "big") for d in items.shape)
    return head + items.numpy().tobytes(), len(items)

if not fashion_xz.exists():
    folder = find_data("fashion-mnist")
    parts = {"train-images-idx3-ubyte": n_train, "train-labels-idx1-ubyte": n_train,
             "t10k-images-idx3-ubyte": n_valid, "t10k-labels-idx1-ubyte": n_valid}
    tmp = fashion_xz.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for stem, n in parts.items():
            data, kept = idx_prefix(_find_idx(folder, stem), n)
            info = tarfile.TarInfo(f"fashion-mnist/{stem}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(fashion_xz)
    print(f"wrote {fashion_xz}: the first {n_train} training and {n_valid} test images of {folder}", file=sys.stderr)
listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True).stdout
tree = sum(os.path.getsize(f) for f in listed.decode().split("\0") if f and os.path.isfile(f))
carry = [archive, str(fashion_xz)]
total = tree + sum(os.path.getsize(f) for f in carry)
print(json.dumps({"tree_bytes": tree, "carry": carry, "carry_bytes": {f: os.path.getsize(f) for f in carry},
                  "total_bytes": total, "limit_bytes": limit, "room_left_bytes": limit - total, "fits": total <= limit}))
sys.exit(0 if total <= limit else 1)
EOF

if [ "${1:-}" = "prepare" ]; then
    exec "$PY" -c "$PREPARE_PY" "$ARCHIVE" "$FASHION_XZ" "$FASHION_TRAIN" "$FASHION_VALID" "$TRAVEL_LIMIT"
fi
[ $# -eq 0 ] || { echo "usage: bench/gpu_all.sh [prepare]" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------------ settings
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-}
SIZE=${SIZE:-128}
EPOCHS=${EPOCHS:-5}
BS=${BS:-}
WIDTH=${WIDTH:-}
BUDGET=${BUDGET:-480}
FIT_TARGET=${FIT_TARGET:-15}
# In order of priority: the recipes at the end run only if the budget still allows them.
GRID=${GRID:-"xresnet50-ranger-bs128 xresnet50-ranger-bs256 xresnet34-ranger-bs128 xresnet50-adam-bs128 \
xresnet18-ranger-bs128 xresnet50-ranger-bs64 xresnet34-ranger-bs256"}
SEEDS=${SEEDS:-"0 1 2"}
read -ra SEED_LIST <<< "$SEEDS"
((${#SEED_LIST[@]} > 0)) || { echo "gpu_all.sh: SEEDS names no seed" >&2; exit 2; }
TRAIN_FLAGS=${TRAIN_FLAGS:-}
STANDINS=${STANDINS:-0}
if [ "$DEVICE" = cpu ]; then CELL_FLAGS=${CELL_FLAGS-}; else CELL_FLAGS=${CELL_FLAGS-cuda}; fi
STAMP=$(date +%Y%m%d-%H%M%S)
if [ -z "${OUT:-}" ]; then OUT=bench/results/gpu_all-$STAMP; WORK=${WORK:-$OUT}; else WORK=${WORK:-bench/results/gpu_all-$STAMP}; fi
JSONL=$OUT/gpu.jsonl
if [ -s "$JSONL" ]; then echo "gpu_all.sh: $JSONL already holds a run; name a new OUT" >&2; exit 2; fi
mkdir -p "$OUT" "$WORK/logs" "$WORK/runs"
export GPU_ALL_WORK=$WORK DEVICE SIZE EPOCHS BS WIDTH TRAIN_FLAGS
[ -n "$DATA" ] || DATA=data_local/imagenette2-128
export DATA

# Per-step caps in seconds (CAP_* in the environment change them); the deadline may clip them further.
CAP_ENV=${CAP_ENV:-15} CAP_DATA=${CAP_DATA:-45} CAP_CELLS=${CAP_CELLS:-60} CAP_PRECISION=${CAP_PRECISION:-60}
CAP_AUGMENT=${CAP_AUGMENT:-30} CAP_RUN=${CAP_RUN:-50} CAP_CNN=${CAP_CNN:-40} CAP_R34=${CAP_R34:-50} MIN_STEP=${MIN_STEP:-8}

selected() {  # is step NAME asked for? (ONLY: names or name prefixes, e.g. "env data grid"; empty: every step)
    [ -z "${ONLY:-}" ] && return 0
    local want
    for want in $ONLY; do [[ $1 == "$want"* ]] && return 0; done
    return 1
}

reserve() {  # reserve PREFIX SECONDS: SECONDS if ONLY may select a step whose name starts with PREFIX, else 0
    local want
    [ -z "${ONLY:-}" ] && { echo "$2"; return; }
    for want in $ONLY; do [[ $1 == "$want"* || $want == "$1"* ]] && { echo "$2"; return; }; done
    echo 0
}

# The time a step leaves for the later ones (those ONLY selects): the fixed steps leave one grid run, the runs of the
# other seeds and the references; a grid run leaves the other seeds and the references; a seed run the references.
RESERVE_REFS=$(($(reserve ref-course-lesson11-cnn "$CAP_CNN") + $(reserve ref-course-xresnet34 "$CAP_R34")))
RESERVE_SEEDS=$(($(reserve seeds- $(((${#SEED_LIST[@]} - 1) * CAP_RUN))) + RESERVE_REFS))
RESERVE_EARLY=$(($(reserve grid- "$CAP_RUN") + RESERVE_SEEDS))
START=$SECONDS
DEADLINE=$((START + BUDGET))

# ----------------------------------------------------------------------------------------------- python helpers
# stdout of a step -> its log; each JSON object line also -> gpu.jsonl (tagged with the step) and the console
read -r -d '' FILTER_PY <<'EOF'
import json, sys
name, jsonl, log = sys.argv[1:4]
with open(log, "a") as logf:
    for line in sys.stdin:
        logf.write(line)
        logf.flush()
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "step" in obj:
            obj["item_step"] = obj.pop("step")
        out = json.dumps({"step": name, **obj})
        with open(jsonl, "a") as f:
            f.write(out + "\n")
        print(out, flush=True)
EOF

# the status line of a step: {"step", "step_status": ok|failed|timed_out|skipped, "rc", "seconds", "timeout_s", ...}
read -r -d '' EMIT_PY <<'EOF'
import json, sys, time
name, status, rc, t0, limit, log, note, jsonl = sys.argv[1:9]
line = {"step": name, "step_status": status, "rc": int(rc), "seconds": round(time.time() - float(t0), 1) if float(t0) else 0.,
        "timeout_s": int(limit)}
if note:
    line["note"] = note
if status != "ok":
    try:
        line["log_tail"] = [l.rstrip()[:300] for l in open(log, errors="replace").readlines()[-15:]]
    except OSError:
        line["log_tail"] = []
out = json.dumps(line)
with open(jsonl, "a") as f:
    f.write(out + "\n")
print(out, flush=True)
EOF

read -r -d '' ENV_PY <<'EOF'
import hashlib, json, os, platform, subprocess, sys
from pathlib import Path
import torch
def first(path, key):
    try:
        return next((l.split(":", 1)[1].strip() for l in open(path) if l.startswith(key)), None)
    except OSError:
        return None
def run(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None
mem_kb = first("/proc/meminfo", "MemTotal")
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(), "cpu_usable": len(os.sched_getaffinity(0)), "cpu_model": first("/proc/cpuinfo", "model name"),
        "host_memory_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None, "torch_threads": torch.get_num_threads()}
for mod in ("torchvision", "numpy", "PIL", "safetensors", "matplotlib"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception:
        info[mod] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                   "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count(),
                   "bf16": torch.cuda.is_bf16_supported()}
    info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"])
else:
    info["gpu"] = None
digest = hashlib.sha256()
for f in sorted(Path("dlcourse").glob("*.py")):
    digest.update(f.name.encode() + f.read_bytes())
info["dlcourse_sha256"] = digest.hexdigest()[:16]
info["git"] = run(["git", "describe", "--always", "--dirty", "--abbrev=12"])
keys = ("DEVICE", "DATA", "SIZE", "EPOCHS", "BS", "WIDTH", "BUDGET", "FIT_TARGET", "GRID", "SEEDS", "TRAIN_FLAGS",
        "CELL_FLAGS", "STANDINS", "ONLY")
info["settings"] = {k: os.environ.get(f"GPU_ALL_{k}") for k in keys}
print(json.dumps(info))
EOF

# the data: Imagenette extracted, the Fashion-MNIST prefix extracted, the image cache built (so runs only read it)
read -r -d '' DATA_PY <<'EOF'
import json, os, shutil, subprocess, sys, tarfile, time
from pathlib import Path
fashion_xz, archive = Path(sys.argv[1]), Path(sys.argv[2])
out = {}
start = time.perf_counter()
if os.environ["DATA"] == "data_local/imagenette2-128" and not Path("data_local/imagenette2-128/train").is_dir():
    if not archive.exists():
        sys.exit(f"{archive} not found: run `bench/gpu_all.sh prepare` before the GPU run, and name it in the carry list")
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(archive), "-C", "data_local"], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall("data_local", filter="data")
    out["extract_seconds"] = round(time.perf_counter() - start, 2)
if fashion_xz.exists() and not Path("data_local/fashion-mnist").exists():
    with tarfile.open(fashion_xz) as tar:
        tar.extractall("data_local", filter="data")
from dlcourse.core import find_data, load_fashion_mnist
try:
    folder = find_data("fashion-mnist")
    fashion = load_fashion_mnist(folder, download=False)  # all four files read and checked, as the notebooks read them
    counts = {"train": len(fashion["x_train"]), "valid": len(fashion["x_valid"])}
    out["fashion_mnist"] = {"path": str(folder), **counts, "whole": counts == {"train": 60000, "valid": 10000}}
except (FileNotFoundError, ValueError) as err:  # not found, or not the IDX files it should be
    out["fashion_mnist"] = {"missing" if isinstance(err, FileNotFoundError) else "unreadable": str(err)}
    Path(os.environ["GPU_ALL_WORK"], "fashion_missing").write_text(str(err) + "\n")
from dlcourse.config import TrainConfig
from dlcourse.train import prepare_data
start = time.perf_counter()
cfg = TrainConfig(data=os.environ["DATA"], size=int(os.environ["SIZE"]), bs=16, device=os.environ["DEVICE"], progress=False)
data = prepare_data(cfg)
out.update(data=str(data.root), size=cfg.size, n_train=len(data.dls.train.dataset), n_valid=len(data.dls.valid.dataset),
           cache_seconds=round(time.perf_counter() - start, 2), cache=os.environ.get("DLCOURSE_CACHE"))
print(json.dumps(out))
EOF

# one training run of a named recipe; one JSON line; the full results in $WORK/runs/<name>.json
read -r -d '' TRAIN_PY <<'EOF'
import json, os, shlex, sys, time
from dataclasses import fields
from functools import partial
from pathlib import Path
wall_start = time.perf_counter()
name, recipe, seed, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import torch
from dlcourse.cli import make_parser
from dlcourse.config import TrainConfig
from dlcourse.optimizers import SGD, Adam
from dlcourse.schedule import fit_one_cycle
from dlcourse.train import dls_vocab, fit_recipe, lesson11_cnn, make_learner, prepare_data, run_results
# The recipes' own settings; DATA, SIZE, EPOCHS, DEVICE (and BS, WIDTH, TRAIN_FLAGS when set) come from the environment.
RANGER = dict(act="mish", width=1., opt="ranger", sched="flat_cos", lr=8e-3, wd=1e-2, mixup=0., label_smoothing=0.1, augment="crop")
RECIPES = {
    "xresnet50-ranger-bs128": dict(config=dict(RANGER, arch="xresnet50", bs=128)),  # bench/imagenette_gpu.sh's recipe
    "xresnet50-ranger-bs256": dict(config=dict(RANGER, arch="xresnet50", bs=256, lr=1.1e-2)),  # lr x sqrt(2)
    "xresnet34-ranger-bs128": dict(config=dict(RANGER, arch="xresnet34", bs=128)),
    "xresnet50-adam-bs128": dict(config=dict(RANGER, arch="xresnet50", bs=128, opt="adam", sched="one_cycle")),
    "xresnet18-ranger-bs128": dict(config=dict(RANGER, arch="xresnet18", bs=128)),
    "xresnet50-ranger-bs64": dict(config=dict(RANGER, arch="xresnet50", bs=64, lr=6e-3)),  # lr / sqrt(2), rounded
    "xresnet34-ranger-bs256": dict(config=dict(RANGER, arch="xresnet34", bs=256, lr=1.1e-2)),
    # course-v3 lesson 12 (nbs/dl2/11_train_imagenette): xresnet34, ReLU, batch 64, random resized crop (35-100%) and
    # flip, label smoothing 0.1, Adam (mom 0.9, sqr_mom 0.99, eps 1e-6, wd 1e-2), 5 epochs of a one-cycle from lr/10
    # up to 1e-2 over the first half, down to lr/1e5, momentum 0.95-0.85-0.95: 82.4%
    "course-xresnet34": dict(config=dict(arch="xresnet34", act="relu", width=1., bs=64, lr=1e-2, opt="adam", wd=1e-2,
                                         sched="one_cycle", mixup=0., label_smoothing=0.1, augment="crop"),
                             opt=partial(Adam, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=1e-2, decouple_wd=True),
                             sched=dict(div=10., div_final=1e5, pct_start=0.5, moms=(0.95, 0.85, 0.95)), course=0.824),
    # course-v3 lesson 11 (nbs/dl2/08_data_block): the plain CNN, batch 64, images resized to 128px without
    # augmentation, cross entropy, plain SGD (no momentum, no weight decay), lr along cosines 0.1 -> 0.3 over the first
    # 30% of the steps, then -> 0.05: 73.6%
    "course-lesson11-cnn": dict(config=dict(arch="xresnet18", width=1., bs=64, lr=0.3, opt="sgd", wd=0., sched="one_cycle",
                                            mixup=0., label_smoothing=0., augment="none"),
                                model="lesson11_cnn", opt=partial(SGD, mom=0., wd=0.),
                                sched=dict(div=3., div_final=6., pct_start=0.3, moms=None), course=0.736),
}
if recipe not in RECIPES:
    sys.exit(f"gpu_all.sh: unknown recipe {recipe!r}; the recipes are {', '.join(RECIPES)}")
spec = RECIPES[recipe]
env = os.environ
cfg_args = {**spec["config"], "data": env["DATA"], "size": int(env["SIZE"]), "epochs": int(env["EPOCHS"]),
            "device": env["DEVICE"], "seed": seed, "progress": False}
if env.get("BS"):
    cfg_args["bs"] = int(env["BS"])
if env.get("WIDTH") and "model" not in spec:
    cfg_args["width"] = float(env["WIDTH"])
if env.get("TRAIN_FLAGS"):  # parsed and checked as `dlcourse train` parses them; only the fields of TrainConfig
    given = vars(make_parser(suppress=True).parse_args(["train", *shlex.split(env["TRAIN_FLAGS"])]))
    given.pop("command")
    others = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if others:
        sys.exit(f"gpu_all.sh: TRAIN_FLAGS sets {', '.join(others)}: only the settings of a run (TrainConfig) can be set")
    cfg_args.update(given)
cfg = TrainConfig(**cfg_args)
data = prepare_data(cfg)
model = lesson11_cnn(len(dls_vocab(data.dls))) if spec.get("model") == "lesson11_cnn" else None
learn, resolved = make_learner(cfg, data, model=model)
if "opt" in spec:
    learn.opt_func = spec["opt"]
if torch.cuda.is_available() and cfg.device != "cpu":
    torch.cuda.reset_peak_memory_stats()
if "sched" in spec:
    fit_one_cycle(learn, cfg.epochs, lr=cfg.lr, **spec["sched"])
else:
    fit_recipe(learn, cfg)
results = run_results(learn, cfg, resolved, data)
if model is not None:
    results["model"] = {"arch": spec["model"], "parameters": sum(p.numel() for p in model.parameters())}
# What the trained learner used: its optimizer's class and hyper-parameters (weight decay per parameter group, lr and
# momentum as scheduled), and the learning rate and momentum of the first, highest (lowest for momentum) and last batch.
def sig(x):
    return float(f"{x:.6g}")
groups = learn.opt.param_groups
opt = {"name": type(learn.opt).__name__, **{k: v for k, v in groups[0].items() if k not in ("params", "lr", "mom", "wd")
                                             and isinstance(v, (bool, int, float, str))},
       "wd": [g["wd"] for g in groups]}
lrs, moms = learn.recorder.lrs, [m for m in learn.recorder.moms if m is not None]
sched = {"name": cfg.sched, "batches": len(lrs), "lr": [sig(lrs[0]), sig(max(lrs)), sig(lrs[-1])],
         "mom": [sig(moms[0]), sig(min(moms)), sig(moms[-1])] if moms else None}
results["recipe"] = {"name": recipe, "group": group, "opt": opt, "sched": sched}
Path(env["GPU_ALL_WORK"], "runs", f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
line = {"recipe": recipe, "group": group, "seed": seed, "accuracy": round(results["accuracy"], 4),
        "valid_loss": round(results["valid_loss"], 4), "train_loss": round(results["train_loss"], 4),
        "fit_seconds": round(results["fit_seconds"], 2), "train_seconds": round(results["train_seconds"], 2),
        "prep_seconds": round(results["prep_seconds"], 2), "images_per_second": round(results["images_per_second"], 1),
        "epochs_accuracy": [round(e["accuracy"], 4) for e in results["epochs"]],
        "model": spec.get("model", cfg.arch), "width": None if model is not None else cfg.width,
        "act": None if model is not None else cfg.act, "size": cfg.size, "epochs": cfg.epochs, "bs": cfg.bs, "lr": cfg.lr,
        "opt": opt, "sched": sched, "mixup": cfg.mixup, "label_smoothing": cfg.label_smoothing,
        "augment": cfg.augment, "precision": resolved["precision"], "channels_last": resolved["channels_last"],
        "n_train": results["n_train"], "n_valid": results["n_valid"], "device": results["device"]["name"],
        "torch": results["versions"]["torch"], "wall_seconds": round(time.perf_counter() - wall_start, 1)}
if torch.cuda.is_available() and cfg.device != "cpu":
    line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
if "course" in spec:
    line["course_accuracy"] = spec["course"]
print(json.dumps(line), flush=True)
EOF

# the best grid recipe: most accurate among fit_seconds <= target, else most accurate; its name also -> the file argv[3]
read -r -d '' PICK_PY <<'EOF'
import json, sys
jsonl, target, picked = sys.argv[1], float(sys.argv[2]), sys.argv[3]
runs = [r for r in map(json.loads, open(jsonl)) if r.get("group") == "grid" and r.get("accuracy") is not None]
if not runs:
    sys.exit("no grid run finished: nothing to pick")
fast = [r for r in runs if r["fit_seconds"] <= target]
best = max(fast or runs, key=lambda r: r["accuracy"])
print(json.dumps({"picked": best["recipe"], "accuracy": best["accuracy"], "fit_seconds": best["fit_seconds"],
                  "rule": f"most accurate with fit_seconds <= {target:g}" if fast else f"none within {target:g} s: most accurate",
                  "candidates": {r["recipe"]: [r["accuracy"], r["fit_seconds"]] for r in runs}}))
open(picked, "w").write(best["recipe"] + "\n")
EOF

read -r -d '' SUMMARY_PY <<'EOF'
import json, statistics, sys
jsonl, recipe, target, n_seeds = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
runs = [r for r in map(json.loads, open(jsonl)) if r.get("recipe") == recipe and r.get("group") in ("grid", "seeds")
        and r.get("accuracy") is not None]
acc, fit = [r["accuracy"] for r in runs], [r["fit_seconds"] for r in runs]
print(json.dumps({"recipe": recipe, "seeds": [r["seed"] for r in runs], "runs": len(runs),
                  "accuracy_mean": round(statistics.mean(acc), 4), "accuracy_min": min(acc), "accuracy_max": max(acc),
                  "accuracy_stdev": round(statistics.stdev(acc), 4) if len(acc) > 1 else None,
                  "fit_seconds_mean": round(statistics.mean(fit), 2), "fit_seconds_max": max(fit),
                  "target": {"accuracy_mean": 0.803, "fit_seconds": target},
                  "target_met": len(runs) == n_seeds >= 3 and statistics.mean(acc) >= 0.803 and max(fit) <= target}))
sys.exit(0 if len(runs) == n_seeds else 1)
EOF

# ------------------------------------------------------------------------------------------------------- running
pack_logs() {  # the logs and run summaries travel back with gpu.jsonl when OUT is not the work folder
    [ "$(cd "$OUT" && pwd)" = "$(cd "$WORK" && pwd)" ] || tar -czf "$OUT/logs.tgz" -C "$WORK" logs runs 2>/dev/null
}

emit() {  # emit NAME STATUS RC T0 LIMIT LOG NOTE
    "$PY" -c "$EMIT_PY" "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$JSONL"
}

STEPS_FAILED=()
step() {  # step NAME CAP RESERVE CMD...: CMD under a timeout of min(CAP, seconds left - RESERVE)
    local name=$1 cap=$2 reserve=$3
    shift 3
    selected "$name" || return 0
    local left=$((DEADLINE - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    local log="$WORK/logs/$name.log"
    if ((left < MIN_STEP)); then
        emit "$name" skipped 0 0 "$((left > 0 ? left : 0))" "$log" \
            "time budget: $((DEADLINE - SECONDS)) s left, ${reserve} s of it kept for the later steps"
        STEPS_FAILED+=("$name")
        return 3
    fi
    echo "== $name (timeout ${limit} s)" >&2
    local t0
    t0=$(date +%s.%N)
    # shellcheck disable=SC2094  # stderr and the filter both append to the log, on purpose
    timeout -k 5 "$limit" "$@" 2>>"$log" | "$PY" -u -c "$FILTER_PY" "$name" "$JSONL" "$log"
    local rc=${PIPESTATUS[0]} status=ok
    if ((rc == 124 || rc == 137)); then status=timed_out; elif ((rc != 0)); then status=failed; fi
    emit "$name" "$status" "$rc" "$t0" "$limit" "$log" ""
    [ "$status" = ok ] || STEPS_FAILED+=("$name")
    pack_logs
    return "$rc"
}

export GPU_ALL_DEVICE=$DEVICE GPU_ALL_DATA=$DATA GPU_ALL_SIZE=$SIZE GPU_ALL_EPOCHS=$EPOCHS GPU_ALL_BS=$BS \
    GPU_ALL_WIDTH=$WIDTH GPU_ALL_BUDGET=$BUDGET GPU_ALL_FIT_TARGET=$FIT_TARGET GPU_ALL_GRID=$GRID \
    GPU_ALL_SEEDS=$SEEDS GPU_ALL_TRAIN_FLAGS=$TRAIN_FLAGS GPU_ALL_CELL_FLAGS=$CELL_FLAGS GPU_ALL_STANDINS=$STANDINS \
    GPU_ALL_ONLY=${ONLY:-}
echo "gpu_all.sh: JSON lines -> $JSONL, logs -> $WORK/logs (budget ${BUDGET} s)" >&2

# 1. environment
step env "$CAP_ENV" "$RESERVE_EARLY" "$PY" -c "$ENV_PY"

# 2. data
mkdir -p data_local
step data "$CAP_DATA" "$RESERVE_EARLY" "$PY" -c "$DATA_PY" "$FASHION_XZ" "$ARCHIVE"

# 3. the notebooks' `#| cuda` cells
if [ -z "${CELLS:-}" ]; then
    CELLS=$("$PY" tools/run_cells.py nbs/*.ipynb --having cuda | tr '\n' ' ')
fi
cell_args=()
read -ra flag_words <<< "$CELL_FLAGS"
[ ${#flag_words[@]} -eq 0 ] || cell_args+=(--flags "${flag_words[@]}")
[ "$STANDINS" != 1 ] || cell_args+=(--standins)
for nb in $CELLS; do
    if selected "cells-$(basename "$nb" .ipynb)" && [ -f "$WORK/fashion_missing" ] && grep -q load_fashion_mnist "$nb"; then
        emit "cells-$(basename "$nb" .ipynb)" skipped 0 0 0 /dev/null \
            "Fashion-MNIST not found (no download here): carry $FASHION_XZ (bench/gpu_all.sh prepare writes it)"
        STEPS_FAILED+=("cells-$(basename "$nb" .ipynb)")
        continue
    fi
    step "cells-$(basename "$nb" .ipynb)" "$CAP_CELLS" "$RESERVE_EARLY" "$PY" tools/run_cells.py "$nb" "${cell_args[@]}"
done

# 4. precision and augmentation benchmarks
precision_args=()
[ "$DEVICE" != cpu ] || precision_args+=(--smoke)
step precision "$CAP_PRECISION" "$RESERVE_EARLY" "$PY" bench/precision_gpu.py "${precision_args[@]}"
step augment "$CAP_AUGMENT" "$RESERVE_EARLY" "$PY" bench/augment.py --skip-cpu

# 5. the grid (the first seed), the best recipe's other seeds, its summary over all the seeds
for recipe in $GRID; do
    step "grid-$recipe" "$CAP_RUN" "$RESERVE_SEEDS" "$PY" -c "$TRAIN_PY" "grid-$recipe" "$recipe" "${SEED_LIST[0]}" grid
done
rm -f "$WORK/picked.txt"
step pick 20 "$RESERVE_SEEDS" "$PY" -c "$PICK_PY" "$JSONL" "$FIT_TARGET" "$WORK/picked.txt"
best=$(cat "$WORK/picked.txt" 2>/dev/null)
if [ -n "$best" ]; then
    for seed in "${SEED_LIST[@]:1}"; do
        step "seeds-$best-$seed" "$CAP_RUN" "$RESERVE_REFS" "$PY" -c "$TRAIN_PY" "seeds-$best-$seed" "$best" "$seed" seeds
    done
    step best-summary 20 "$RESERVE_REFS" "$PY" -c "$SUMMARY_PY" "$JSONL" "$best" "$FIT_TARGET" "${#SEED_LIST[@]}"
elif selected seeds; then
    emit seeds skipped 0 0 0 /dev/null "no grid recipe was picked (see the pick line): the runs of the other seeds were not started"
    STEPS_FAILED+=(seeds)
fi

# 6. the course's reference runs
step ref-course-lesson11-cnn "$CAP_CNN" "$(reserve ref-course-xresnet34 "$CAP_R34")" "$PY" -c "$TRAIN_PY" ref-course-lesson11-cnn course-lesson11-cnn 0 reference
step ref-course-xresnet34 "$CAP_R34" 0 "$PY" -c "$TRAIN_PY" ref-course-xresnet34 course-xresnet34 0 reference

# totals
failed_json=""
for name in "${STEPS_FAILED[@]}"; do failed_json+="${failed_json:+, }\"$name\""; done
echo "{\"step\": \"done\", \"seconds\": $((SECONDS - START)), \"budget_s\": $BUDGET, \"steps_not_ok\": [$failed_json]}" \
    | tee -a "$JSONL"
pack_logs
echo "gpu_all.sh: $(wc -l < "$JSONL") JSON lines in $JSONL" >&2
[ ${#STEPS_FAILED[@]} -eq 0 ]
