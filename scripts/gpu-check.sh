#!/usr/bin/env bash
# One visit to the GPU machine: GPU tests, the kernels alone, the loader benchmark against the
# official code and plain DALI, and a short ResNet-50 training run with a resume.
#
# Results go to $OUT as each step ends, the key ones first, so a cut run still reports:
#   summary.txt     one line per step (exit code, seconds), then the tables
#   kernels.json    scripts/bench_kernels.py: Triton vs eager torch, stage times, block sweep
#   bench.json/.txt dali-ipmix bench (rewritten after every row), bench.png at its end
#   gpu-check.tar.gz  every log, at the end
#
# Steps (STEPS picks some, in this order): env kernels data dali-tests bench train.
# "env kernels data" need no DALI: on the device machine they can run in the calls that carry the
# first DALI parts (../shared/gpu/README.md), the rest after the last part is unpacked:
#     STEPS="env data kernels" bash scripts/gpu-check.sh          # with part 0: ~65 s on an H200
#     . /tmp/dali-site/activate && STEPS="dali-tests bench train" bash scripts/gpu-check.sh   # ~4 min
# (measured 2026-11-27 with the defaults below; the whole visit took ~9 minutes of device time
# with the machine's start and the four transfers).
# Generated data stay in $WORK while the machine is warm.  Sizes are set by the variables below;
# here, to check the script itself on the CPU (small sizes, Triton through its interpreter):
#     DEVICE=cpu IMAGES=64 PICTURES=16 SRC_PX=96 BATCH=8 SIZE=64 THREADS=1 WORKERS=1 ITERS=2 \
#         WARMUP=1 TRAIN_STEPS=4 ARCH=resnet18 bash scripts/gpu-check.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
DEVICE=${DEVICE:-gpu}
STEPS=${STEPS:-env kernels data dali-tests bench train}
IMAGES=${IMAGES:-4096}         # generated sources, 4:3, SRC_PX high: 512x384 JPEGs are ~76 KiB
SRC_PX=${SRC_PX:-384}
PICTURES=${PICTURES:-1024}     # fractal mixing pictures (256 px)
BATCH=${BATCH:-256}
SIZE=${SIZE:-224}
THREADS=${THREADS:-8,16}       # DALI threads swept by the bench
WORKERS=${WORKERS:-16}         # DataLoader workers of the official code's row
ITERS=${ITERS:-15}
WARMUP=${WARMUP:-4}
ARCH=${ARCH:-resnet50}
TRAIN_STEPS=${TRAIN_STEPS:-20} # then resumed for TRAIN_STEPS / 2 more
OFFICIAL=${OFFICIAL:-$ROOT/.gpu/official}   # the official IPMix code, carried there (not committed)
WORK=${WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
JOBS=$(nproc)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi
SUMMARY=$LOGS/summary.txt
echo "gpu-check $(date -u +%FT%TZ) on $(hostname): DEVICE=$DEVICE STEPS='$STEPS' IMAGES=$IMAGES" \
     "SRC_PX=$SRC_PX BATCH=$BATCH SIZE=$SIZE THREADS=$THREADS WORKERS=$WORKERS ARCH=$ARCH" >>"$SUMMARY"
publish() { cp "$SUMMARY" "$OUT/summary.txt"; }

step() {   # step NAME COMMAND...: run it with its log, record exit code and seconds
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*" | tee -a "$LOGS/$name.log"
    local t0=$SECONDS
    "$@" >>"$LOGS/$name.log" 2>&1
    local rc=$?
    printf '%-10s rc=%-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$LOGS/$name.log" \
        | tee -a "$SUMMARY"
    tail -n 3 "$LOGS/$name.log" | sed 's/^/    /' >>"$SUMMARY"
    publish
}

environment() {
    nvidia-smi -L 2>&1 | head -2
    "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "torchvision", "numpy", "PIL", "nvidia.dali"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__)
PYEOF
}

kernels() {
    local t=gpu; [ "$DEVICE" = cpu ] && t="not gpu"
    "$PY" -m pytest -q -p no:cacheprovider -m "$t" tests/test_triton.py
    local rc=$?                       # the timings are worth having even when a test fails
    "$PY" scripts/bench_kernels.py --device "$([ "$DEVICE" = gpu ] && echo cuda || echo cpu)" \
        --batch "$BATCH" --size "$SIZE" --iters "$ITERS" ${BLOCKS:+--blocks "$BLOCKS"} \
        ${WARPS:+--warps "$WARPS"} --out "$OUT/kernels.json" || return 1
    return $rc
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

dali_tests() {
    local t=gpu; [ "$DEVICE" = cpu ] && t="not gpu"
    "$PY" -m pytest -q -p no:cacheprovider -m "$t" tests/test_fused.py tests/test_pipeline.py
}

bench() {
    local official=()
    [ -f "$OFFICIAL/imagenet.py" ] && [ "$SIZE" = 224 ] && official=(--official "$OFFICIAL")
    "$PY" -m dali_ipmix.cli bench --device "$DEVICE" --data "$WORK/imagenet/train" \
        --mixing "$WORK/fractals" -b "$BATCH" --image-size "$SIZE" --iters "$ITERS" \
        --warmup "$WARMUP" --arch "$ARCH" --out "$OUT" --overwrite --channels-last \
        --threads "$THREADS" --workers "$WORKERS" "${official[@]}" \
        --contenders official,dali-plain,dali-ipmix,kernel,train,synthetic,dali-draws
}

train_and_resume() {   # TRAIN_STEPS steps with a checkpoint, then --resume auto for half as many
    rm -rf "$WORK/train-run"
    # enough epochs that the resumed run still has steps to take
    local epochs=$(( TRAIN_STEPS * 3 / 2 * BATCH / IMAGES + 1 ))
    local common=(--data-path "$WORK/imagenet" --mixing-set "$WORK/fractals" --arch "$ARCH"
                  --image-size "$SIZE" -b "$BATCH" --epochs "$epochs" --device "$DEVICE" --channels-last
                  --workers "${THREADS%%,*}" --print-freq 10 --output-dir "$WORK/train-run"
                  --no-tensorboard --ckpt-every "$((TRAIN_STEPS / 2))")
    "$PY" train.py "${common[@]}" --max-steps "$TRAIN_STEPS" || return 1
    "$PY" train.py "${common[@]}" --max-steps "$((TRAIN_STEPS * 3 / 2))" --resume auto
}

step env environment
step kernels kernels
step data make_data
step dali-tests dali_tests
step bench bench
step train train_and_resume

{
    [ -f "$OUT/kernels.json" ] && { echo; grep -E "^ +[0-9]+ +(triton|torch)" "$LOGS/kernels.log" | tail -n 12; }
    [ -f "$OUT/bench.txt" ] && { echo; cat "$OUT/bench.txt"; }
    [ -f "$LOGS/train.log" ] && { echo; grep -E "resum|summary|val top-1|img/s|checkpoint" "$LOGS/train.log" | tail -n 12; }
    [ -f "$LOGS/data.log" ] && { echo; grep -E "JPEGs" "$LOGS/data.log"; }
} >>"$SUMMARY"
publish
tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d train-run/metrics.jsonl 2>/dev/null)
cat "$OUT/summary.txt"
