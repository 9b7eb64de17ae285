#!/usr/bin/env bash
# GPU speed in one command: the CUDA correctness tests, the engine sweep and the headline (epochs of the
# real trainer on CIFAR-shaped data), everything written under OUT within 8 minutes.
#
#   bash benchmarks/gpu.sh OUT           on a CUDA machine (the repository is found from this file's place)
#   bash benchmarks/gpu.sh --quick OUT   the same steps on the CPU at tiny sizes (CI: tests/pipeline/test_gpu_script.py)
#
# Needs only python3 with torch, torchvision, timm, pandas, pyyaml,
# safetensors, tqdm and pytest (no jsonschema, no snakemake: configs then get their defaults unchecked, which
# papa prints once). PYTHON picks the interpreter (default python3). OUT receives at most 6 files:
#   gpu.log                     everything this script printed
#   pytest-gpu.log, .xml        `pytest -m gpu` (junit XML), the CUDA tests (sync-debug mode included)
#   results-<device>.md, .jsonl the targets, the trainer's epochs, the engine sweep (benchmarks/gpu.py)
#   profile-<device>.txt        only when a target is missed: torch's kernel table of one step per engine
# Copy the results into benchmarks/ (benchmarks/README.md says what to update with them).
set -uo pipefail

# ---- sizes on a GPU; the quick mode's are below ----------------------------------------------------
MODELS="resnet18_cifar vgg16_bn"     # the sweep's models, CIFAR shapes (3x32x32, 10 classes)
POPULATIONS="10 4 2 1"               # the sweep's population sizes
ENGINES="loop stacked stacked+compile"  # every run with channels-last, in PRECISION
PRECISION=bf16                       # autocast
BATCH=64                             # images per member and step
STEPS=20 WARMUP=5 REPEATS=3          # per sweep run: 5 untimed steps, then the fastest of 3 blocks of 20
TRAIN_IMAGES=50000 TEST_IMAGES=10000 # the headline's CIFAR-shaped data (2% of the training images validate)
HEADLINE_P=10 HEADLINE_BATCH=64      # config/paper/table1.yaml's CIFAR-10 ResNet-18 run: p = 10, batch 64
HEADLINE_EPOCHS=1                    # timed epochs per setting (a compiled setting trains one more first)
REPAIR_ITERS=5                       # PAPA-all's REPAIR batches (the paper config's)
DEVICE=cuda
PYTEST_LIMIT_S=120                   # pytest -m gpu is stopped after this
BUDGET_S=440                         # no measurement starts that would not end by then (from the start)
LIMIT_S=470                          # the measurements are stopped here whatever runs (8 min = 480 s)
SUFFIX=""
# Expected on one H200 (16 CPU cores), from the step costs in benchmarks/README.md:
#   pytest -m gpu .................................. 30-60 s
#   sweep, 16 eager runs (process start ~3 s each) .. ~100 s
#   sweep, ResNet-18 p=10 compiled ................. 60-120 s (torch.compile of the vmapped step)
#   trainer, loop: 1 epoch of 765 steps ............ 30-60 s (10 members one after another: launch-bound)
#   trainer, fastest stacked: 1 epoch (+1 compiled)  10-30 s (+ compilation, mostly from the cache)
#   PAPA-all averaging with REPAIR ................. < 10 s
#   = 230-390 s; the other 7 compiled sweep runs (60-120 s each) fill what is left of BUDGET_S and are
#   listed as skipped when it runs out.

ARGS="$*"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit 0
fi
if [ "${1:-}" = "--quick" ]; then
    shift
    # ResNet-18 and VGG-16 on a 2-core CPU: a step of p=2 at batch 2 takes about a second in fp32 (bf16 is
    # emulated, 5-20x slower, on CPUs without AVX512-BF16 or AMX). Compilation is left out: compiling
    # ResNet-18's step took 327 s on one busy core here (compiled runs go through the same `papa bench`
    # process as the eager ones; the budget logic that schedules them is tested in tests/pipeline/test_gpu_script.py).
    POPULATIONS="2" ENGINES="loop stacked" PRECISION=fp32 BATCH=2 STEPS=1 WARMUP=1 REPEATS=1
    TRAIN_IMAGES=44 TEST_IMAGES=8 HEADLINE_P=2 HEADLINE_BATCH=4  # 43 training images: 10 steps, one PAPA push
    REPAIR_ITERS=1 DEVICE=cpu PYTEST_LIMIT_S=600 BUDGET_S=3000 LIMIT_S=3600 SUFFIX=-quick
fi
if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "benchmarks/gpu.sh: error: expected [--quick] OUT (--help says more)" >&2
    exit 2
fi
START=$(date +%s)
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || { echo "benchmarks/gpu.sh: error: cannot create $1" >&2; exit 2; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu.log") 2>&1
TEE=$!

finish() {  # exit with $1 once tee has written the whole log
    exec >&- 2>&-
    wait "$TEE"
    exit "$1"
}

echo "== benchmarks/gpu.sh $ARGS ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), $(getconf _NPROCESSORS_ONLN) CPUs)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv
fi
# one start of torch: what runs here, and whether the device the sizes are meant for is present
"$PYTHON" -c "import sys, torch; cuda = torch.cuda.is_available(); print('python', sys.version.split()[0], \
'| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if cuda else None); \
sys.exit(0 if cuda or '$DEVICE' == 'cpu' else 3)"
case $? in
    0) ;;
    3) echo "benchmarks/gpu.sh: error: torch sees no CUDA device here (--quick runs the same steps on the CPU)"
       finish 2 ;;
    *) echo "benchmarks/gpu.sh: error: $PYTHON cannot start torch"
       finish 2 ;;
esac

echo "== 1. pytest -m gpu (limit ${PYTEST_LIMIT_S} s)"
# -p no:xdist (and its looponfail): one process (the image has no pytest-xdist; a checkout's environment may have it without execnet)
timeout -k 10 "$PYTEST_LIMIT_S" "$PYTHON" -m pytest -m gpu -p no:cacheprovider -p no:xdist -p no:xdist.looponfail -q \
    --junitxml="$OUT/pytest-gpu.xml" tests >"$OUT/pytest-gpu.log" 2>&1
pytest_rc=$?
tail -n 20 "$OUT/pytest-gpu.log"
echo "pytest exit status $pytest_rc after $(($(date +%s) - START)) s"

echo "== 2-3. engine sweep, the trainer's epochs, targets (budget ${BUDGET_S} s from the start)"
# SIGINT to the whole group at the limit: the driver keeps the results it has written
timeout -s INT -k 15 $((START + LIMIT_S - $(date +%s))) "$PYTHON" -m benchmarks.gpu --out "$OUT" \
    --device "$DEVICE" --name-suffix="$SUFFIX" --models $MODELS --populations $POPULATIONS --engines $ENGINES \
    --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS" \
    --train-images "$TRAIN_IMAGES" --test-images "$TEST_IMAGES" --headline-population "$HEADLINE_P" \
    --headline-batch-size "$HEADLINE_BATCH" --headline-epochs "$HEADLINE_EPOCHS" --precision "$PRECISION" \
    --repair-iters "$REPAIR_ITERS" \
    --deadline $((START + BUDGET_S)) --command "benchmarks/gpu.sh ${SUFFIX:+--quick }OUT"
bench_rc=$?

echo "== done in $(($(date +%s) - START)) s: pytest exit status $pytest_rc, measurements exit status $bench_rc"
ls -l "$OUT"
[ "$pytest_rc" -ne 0 ] && finish "$pytest_rc"
finish "$bench_rc"
