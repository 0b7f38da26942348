#!/usr/bin/env bash
# One visit to the GPU machine (<= 6 minutes of script time, DEADLINE_S): the batch-lifetime test,
# every GPU test, the loader benchmark (rows interleaved, repeated, medians), the kernels alone
# and the official code's rows.
#
# Results go to $OUT as each step ends, the key ones first, so a cut run still reports:
#   summary.txt       the commit measured, one line per step (exit code, seconds), then the tables
#   lifetime.txt      tests/test_loader.py -m gpu on this tree (0 changed batches = pass)
#   bench-key/        dali-plain, dali-ipmix, dali-ipmix-jsd at THREADS (bench.json/.txt/.png)
#   bench-train/      train and synthetic
#   kernels.json      scripts/bench_kernels.py: the Triton kernels alone
#   (gpu-tests)       every other GPU test: its log, in the summary and the archive
#   copy.txt          the cost of DaliLoader's copy of one batch (device to device)
#   bench-official/   the official code's DataLoader (OFFICIAL checkout), whole worker rounds
#   lifetime-prev.txt the same lifetime test against the code before the fix (PREV): fails if
#                     the hazard was real there
#   gpu-check.tar.gz  every log, at the end
#
# Steps (STEPS picks some, in this order; data runs beside env and lifetime): data env lifetime
# bench-key bench-train kernels gpu-tests copy bench-official lifetime-prev [train] [example]
# (train: train.py stopped and resumed; example: examples/pytorch_loop.py for EXAMPLE_STEPS steps).  A step that would start after DEADLINE_S
# seconds is skipped (and says so); each step is cut at the deadline plus 30 s; rc=3: a step
# that could not run here (no official checkout, no earlier code), its log says why.
#
# The tree carried to the GPU machine has no .git: give the commit and, for lifetime-prev, the
# earlier code as a folder (both made here, on the checkout):
#     git archive "$(git log --format=%H -S 'class StreamHandoff' --reverse -- dali_ipmix/loader.py | head -1)^" \
#         | (mkdir -p .gpu/prev && tar -x -C .gpu/prev)
#     DALI_IPMIX_COMMIT=$(git rev-parse HEAD) PREV_TREE=.gpu/prev bash scripts/gpu-check.sh  # carry .gpu
# In a git checkout PREV (default: the parent of the commit that added StreamHandoff) is
# exported by git archive instead.  To check the script itself on the CPU (small sizes, Triton
# through its interpreter, the GPU tests skipped), ~5 minutes on 2 cores (the kernels step, in
# the interpreter, ~3 of them; measured 2026-12-03):
#     DEVICE=cpu IMAGES=48 PICTURES=8 SRC_PX=64 BATCH=4 SIZE=32 THREADS=1 WORKERS=1 ITERS=2 \
#         WARMUP=1 REPEATS=2 MIN_SECONDS=0 OFFICIAL_ITERS=2 ARCH=resnet18 OUT=/tmp/gc bash scripts/gpu-check.sh
set -u
cd "$(dirname "$0")/.."
set -a          # the settings below reach the steps, which run in their own bash (timeout)
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
DEVICE=${DEVICE:-gpu}
STEPS=${STEPS:-data env lifetime bench-key bench-train kernels gpu-tests copy bench-official lifetime-prev}
DEADLINE_S=${DEADLINE_S:-330}
IMAGES=${IMAGES:-4096}         # generated sources, 4:3, SRC_PX high: 512x384 JPEGs are ~76 KiB
SRC_PX=${SRC_PX:-384}
PICTURES=${PICTURES:-1024}     # fractal mixing pictures (256 px)
BATCH=${BATCH:-256}
SIZE=${SIZE:-224}
THREADS=${THREADS:-8,16}       # DALI threads swept by the loader rows
WORKERS=${WORKERS:-16}         # DataLoader workers of the official code's rows
ITERS=${ITERS:-50}             # a row: at least ITERS batches over at least MIN_SECONDS
MIN_SECONDS=${MIN_SECONDS:-2}
REPEATS=${REPEATS:-3}          # rows interleaved, repeated: medians and min-max
WARMUP=${WARMUP:-4}
OFFICIAL_ITERS=${OFFICIAL_ITERS:-32}   # two rounds of 16 workers
OFFICIAL_REPEATS=${OFFICIAL_REPEATS:-1}
ARCH=${ARCH:-resnet50}
TRAIN_STEPS=${TRAIN_STEPS:-20} # the optional train step: then resumed for TRAIN_STEPS / 2 more
OFFICIAL=${OFFICIAL:-$ROOT/.gpu/official}   # the official IPMix code, carried there (not committed)
WORK=${WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
JOBS=$(nproc)
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
COMMIT=${DALI_IPMIX_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -c1)
export DALI_IPMIX_COMMIT=$COMMIT
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi
SUMMARY=$LOGS/summary.txt
set +a
: >"$SUMMARY"
echo "gpu-check $(date -u +%FT%TZ) on $(hostname): commit $COMMIT${DIRTY:+ (modified)} DEVICE=$DEVICE" \
     "STEPS='$STEPS' IMAGES=$IMAGES SRC_PX=$SRC_PX BATCH=$BATCH SIZE=$SIZE THREADS=$THREADS" \
     "WORKERS=$WORKERS ITERS=$ITERS MIN_SECONDS=$MIN_SECONDS REPEATS=$REPEATS ARCH=$ARCH" >>"$SUMMARY"
publish() { cp "$SUMMARY" "$OUT/summary.txt"; }
publish

step() {   # step NAME COMMAND...: run it with its log, record exit code and seconds
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    if [ "$SECONDS" -ge "$DEADLINE_S" ]; then
        printf '%-14s skipped: %ss of the %ss budget used\n' "$name" "$SECONDS" "$DEADLINE_S" | tee -a "$SUMMARY"
        publish; return 0
    fi
    echo "== $name: $*" | tee -a "$LOGS/$name.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$((DEADLINE_S + 30 - SECONDS))" bash -c '"$@"' "$name" "$@" \
        >>"$LOGS/$name.log" 2>&1
    local rc=$?
    printf '%-14s rc=%-3s %5ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$LOGS/$name.log" \
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

lifetime() {   # on this tree: the GPU tests (and, on the CPU, the handoff's own tests)
    local marks=gpu; [ "$DEVICE" = cpu ] && marks="gpu or not gpu"
    "$PY" -m pytest -q -p no:cacheprovider -rA -m "$marks" tests/test_loader.py >"$OUT/lifetime.txt" 2>&1
    local rc=$?; cat "$OUT/lifetime.txt"; return $rc
}

lifetime_prev() {   # the same GPU tests against the code before the fix
    local prev=${PREV_TREE:-}
    if [ -z "$prev" ]; then
        local rev=${PREV:-}
        if [ -z "$rev" ]; then       # the parent of the commit that added the fix
            rev=$(git -C "$ROOT" log --format=%H -S 'class StreamHandoff' --reverse \
                      -- dali_ipmix/loader.py 2>/dev/null | head -1)
            [ -n "$rev" ] || { echo "no PREV_TREE and no git history here: skipped"; return 3; }
            rev="$rev^"
        fi
        prev=$WORK/prev; rm -rf "$prev"; mkdir -p "$prev"
        git -C "$ROOT" archive "$rev" | tar -x -C "$prev" || return 3
        echo "previous code: $(git -C "$ROOT" rev-parse "$rev")"
    fi
    prev=$(cd "$prev" && pwd)
    if grep -q "class StreamHandoff" "$prev/dali_ipmix/loader.py"; then
        echo "$prev already has the fix: not the code before it"; return 3
    fi
    # this tree's tests, the earlier package (cwd and PYTHONPATH: $prev first)
    (cd "$prev" && PYTHONPATH=$prev "$PY" -m pytest -q -p no:cacheprovider -rA -m gpu \
        --rootdir "$ROOT" "$ROOT/tests/test_loader.py") >"$OUT/lifetime-prev.txt" 2>&1
    local rc=$?; cat "$OUT/lifetime-prev.txt"
    echo "lifetime against the previous code: rc=$rc (1 = batches changed: the hazard was real there)" \
        | tee -a "$OUT/lifetime-prev.txt"
    return $rc
}

gpu_tests() {   # every other GPU test (the lifetime ones ran first)
    "$PY" -m pytest -q -p no:cacheprovider -rA -m gpu --ignore=tests/test_loader.py tests/
}

copy_cost() {   # what DaliLoader's copy of a batch costs: 256 JSD float16 views, both layouts
    "$PY" - "$BATCH" "$SIZE" "$DEVICE" <<'PYEOF' | tee "$OUT/copy.txt"
import sys, time, torch
batch, size, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = torch.device("cuda" if device == "gpu" else "cpu")
src = torch.randn(batch * 3, 3, size, size, device=dev).half()
for fmt in (torch.contiguous_format, torch.channels_last):
    for _ in range(3):
        src.to(dev, copy=True, memory_format=fmt)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 50 if dev.type == "cuda" else 2, time.perf_counter()
    for _ in range(n):
        src.to(dev, copy=True, memory_format=fmt)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / n
    mb = src.numel() * src.element_size() / 1e6
    print(f"copy of {tuple(src.shape)} float16 ({mb:.0f} MB) to {fmt}: {ms:.3f} ms "
          f"({2 * mb / ms:.0f} GB/s read + write)")
PYEOF
}

kernels() {
    "$PY" scripts/bench_kernels.py --device "$([ "$DEVICE" = gpu ] && echo cuda || echo cpu)" \
        --batch "$BATCH" --size "$SIZE" --iters "$((ITERS > 20 ? 20 : ITERS))" \
        ${BLOCKS:+--blocks "$BLOCKS"} ${WARPS:+--warps "$WARPS"} --impls triton --out "$OUT/kernels.json"
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

bench() {   # bench DIR CONTENDERS [more flags]: one bench run into $OUT/DIR
    local dir=$1 contenders=$2; shift 2
    "$PY" -m dali_ipmix.cli bench --device "$DEVICE" --data "$WORK/imagenet/train" \
        --mixing "$WORK/fractals" -b "$BATCH" --image-size "$SIZE" --warmup "$WARMUP" \
        --arch "$ARCH" --out "$OUT/$dir" --overwrite --channels-last --contenders "$contenders" "$@"
}

bench_official() {
    [ -f "$OFFICIAL/imagenet.py" ] || { echo "no official checkout at $OFFICIAL: skipped"; return 3; }
    [ "$SIZE" = 224 ] || { echo "the official code needs SIZE=224: skipped"; return 3; }
    bench bench-official official --official "$OFFICIAL" --workers "$WORKERS" \
        --iters "$OFFICIAL_ITERS" --min-seconds 0 --repeats "$OFFICIAL_REPEATS"
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

example_loop() {   # the public loader in examples/pytorch_loop.py: EXAMPLE_STEPS steps of ARCH
    rm -rf "$WORK/example-run"
    "$PY" examples/pytorch_loop.py --data-path "$WORK/imagenet" --mixing "$WORK/fractals" \
        --model "$ARCH" -b "$BATCH" --epochs 1000 --max-steps "${EXAMPLE_STEPS:-300}" \
        -j "${THREADS%%,*}" --output-dir "$WORK/example-run"
}

export -f environment lifetime lifetime_prev gpu_tests copy_cost kernels make_data bench \
    bench_official train_and_resume example_loop
TIMING=(--iters "$ITERS" --min-seconds "$MIN_SECONDS" --repeats "$REPEATS")
# the data are made on the CPU cores while the first GPU steps run
step data make_data &
DATA_PID=$!
step env environment
step lifetime lifetime
wait "$DATA_PID"
step bench-key bench bench-key dali-read,dali-plain,dali-ipmix --threads "$THREADS" "${TIMING[@]}"
step bench-train bench bench-train train,synthetic --threads "${THREADS%%,*}" "${TIMING[@]}"
step kernels kernels
step gpu-tests gpu_tests
step copy copy_cost
step bench-official bench_official
step lifetime-prev lifetime_prev
step train train_and_resume
step example example_loop

{
    for dir in bench-key bench-train bench-official; do
        [ -f "$OUT/$dir/bench.txt" ] && { echo; echo "== $dir"; cat "$OUT/$dir/bench.txt"; }
    done
    [ -f "$OUT/copy.txt" ] && { echo; cat "$OUT/copy.txt"; }
    [ -f "$OUT/kernels.json" ] && { echo; grep -E "^ +[0-9]+ +(triton|torch)" "$LOGS/kernels.log" | tail -n 12; }
    [ -f "$LOGS/train.log" ] && { echo; grep -E "resum|summary|val top-1|img/s|checkpoint" "$LOGS/train.log" | tail -n 12; }
    [ -f "$LOGS/example.log" ] && { echo; grep -E "^step|val top-1" "$LOGS/example.log" | tail -n 4; }
    [ -f "$LOGS/data.log" ] && { echo; grep -E "JPEGs" "$LOGS/data.log"; }
} >>"$SUMMARY"
publish
tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d train-run/metrics.jsonl 2>/dev/null)
cat "$OUT/summary.txt"
