#!/usr/bin/env bash
# One visit to the GPU machine: environment, GPU tests, loader and training throughput.
# Results: $OUT/summary.txt (also printed last) and $OUT/gpu-check.tar.gz (every log, bench.json,
# bench.txt, bench.png, metrics).  Steps run on even if one fails; each one's exit code and time
# are in the summary.
#
# There (see ../shared/gpu/README.md): scripts/gpu-wheels.sh and ../shared/gpu/pack-dali here, the
# four DALI parts sent, then one more call with carry [".gpu/wheels"] and the command
#     . /tmp/dali-site/activate && bash scripts/gpu-check.sh
# A visit is capped at 10 minutes a command: STEPS picks steps, e.g. STEPS="data bench" then
# STEPS="readable train" in a second call (the generated data stay in $WORK while the machine is
# warm).  Here, to check the script itself on the CPU (small sizes):
#     DEVICE=cpu IMAGES=64 PICTURES=16 SRC_PX=96 BATCH=8 SIZE=64 THREADS=1 ITERS=2 WARMUP=1 \
#         TRAIN_STEPS=4 ARCH=resnet18 bash scripts/gpu-check.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
DEVICE=${DEVICE:-gpu}
STEPS=${STEPS:-doctor tests data bench readable train}
IMAGES=${IMAGES:-4096}         # generated sources, 4:3, SRC_PX high: 512x384 JPEGs are ~76 KiB,
SRC_PX=${SRC_PX:-384}          # the size of the set the feasibility figures were measured on
PICTURES=${PICTURES:-1024}     # fractal mixing pictures (256 px)
BATCH=${BATCH:-256}
SIZE=${SIZE:-224}
THREADS=${THREADS:-8,16}       # DALI threads / DataLoader workers swept by the bench
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-5}
ARCH=${ARCH:-resnet50}
TRAIN_STEPS=${TRAIN_STEPS:-300}
WORK=${WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
JOBS=$(nproc)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=$LOGS/summary.txt
echo "gpu-check $(date -u +%FT%TZ) on $(hostname): DEVICE=$DEVICE STEPS='$STEPS' IMAGES=$IMAGES" \
     "SRC_PX=$SRC_PX BATCH=$BATCH SIZE=$SIZE THREADS=$THREADS ARCH=$ARCH" >>"$SUMMARY"

missing=$("$PY" - <<'PYEOF'
import importlib.util
print(" ".join(m for m in ("pytest", "psutil", "matplotlib") if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .gpu/wheels/*.whl \
            >>"$LOGS/wheels.log" 2>&1
        export PYTHONPATH=$PYTHONPATH:$WORK/site
        echo "installed from .gpu/wheels for: $missing" >>"$SUMMARY"
    else
        echo "missing here: $missing (run scripts/gpu-wheels.sh and carry .gpu/wheels)" >>"$SUMMARY"
    fi
fi

step() {   # step NAME COMMAND...: run it with its log, record exit code and seconds
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*" | tee -a "$LOGS/$name.log"
    local t0=$SECONDS
    "$@" >>"$LOGS/$name.log" 2>&1
    local rc=$?
    printf '%-9s rc=%-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$LOGS/$name.log" \
        | tee -a "$SUMMARY"
}

make_data() {
    "$PY" - "$WORK/imagenet" "$IMAGES" "$SRC_PX" "$JOBS" "$BATCH" <<'PYEOF'
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from dali_ipmix.bench.data import write_sources

root, count, px, jobs, batch = Path(sys.argv[1]), *map(int, sys.argv[2:6])

def part(job):   # one class folder per job (jNN/class000/...): file names never collide
    n = count // jobs + (job < count % jobs)
    write_sources(root / "train" / f"j{job:02d}", n, px, classes=1, seed=job)
    # a sixteenth for validation, and at least one batch of it in all
    write_sources(root / "val" / f"j{job:02d}", max(n // 16, -(-batch // jobs)), px, classes=1,
                  seed=1000 + job)

# fork: `part` lives in this stdin script, which spawned workers could not import
with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
    list(pool.map(part, range(jobs)))
files = list((root / "train").rglob("*.jpg"))
print(f"{len(files)} train JPEGs, mean {sum(f.stat().st_size for f in files) / len(files) / 1024:.1f} KiB")
PYEOF
    "$PY" -m dali_ipmix.cli fractals --out "$WORK/fractals" --count "$PICTURES" --size 256 \
        --jobs "$JOBS" --overwrite
}

bench() {   # bench OUTDIR ARGS...: the bench command on the generated data
    local dir=$1; shift
    "$PY" -m dali_ipmix.cli bench --device "$DEVICE" --data "$WORK/imagenet/train" \
        --mixing "$WORK/fractals" -b "$BATCH" --image-size "$SIZE" --iters "$ITERS" \
        --warmup "$WARMUP" --arch "$ARCH" --out "$dir" --overwrite "$@"
}

step doctor "$PY" -m dali_ipmix.cli doctor
if [ "$DEVICE" = gpu ]; then
    step tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
else      # no GPU tests to run here: the fused kernel's CPU tests stand in
    step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py
fi
step data make_data
step bench bench "$WORK/bench" --threads "$THREADS" --channels-last \
    --contenders reference,reference-jsd,dali-plain,dali-ipmix,dali-ipmix-jsd,train,synthetic
step readable bench "$WORK/bench-readable" --threads "${THREADS%%,*}" --backend dali \
    --contenders dali-ipmix
rm -rf "$WORK/train-run"
step train "$PY" train.py --data-path "$WORK/imagenet" --mixing-set "$WORK/fractals" \
    --arch "$ARCH" --image-size "$SIZE" -b "$BATCH" --max-steps "$TRAIN_STEPS" \
    --epochs $(( (TRAIN_STEPS * BATCH + IMAGES - 1) / IMAGES )) \
    --device "$DEVICE" --channels-last --workers "${THREADS%%,*}" --print-freq 20 \
    --output-dir "$WORK/train-run" --no-tensorboard

{
    for f in "$WORK/bench/bench.txt" "$WORK/bench-readable/bench.txt"; do
        [ -f "$f" ] && { echo; cat "$f"; }
    done
    [ -f "$LOGS/train.log" ] && { echo; grep -E "summary|val top-1|throughput|time:" "$LOGS/train.log"; }
    [ -f "$LOGS/data.log" ] && { echo; grep -E "JPEGs" "$LOGS/data.log"; }
} >>"$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" logs \
    $(cd "$WORK" && ls -d bench bench-readable train-run/metrics.jsonl 2>/dev/null)
cat "$OUT/summary.txt"
