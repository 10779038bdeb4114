#!/usr/bin/env bash
# On the GPU machine, from the repository root, in one call of about ten minutes: install the carried wheels
# (bench/gpu_wheels.sh), prove every GPU path (bench/gpu_check.py), then measure the trainer
# (bench/throughput.py) at the paper's BigGAN-128 and BigGAN-deep-128, eager and compiled. Everything lands in
# $OUT (at most 8 files): env.txt, gpu_check.log, gpu_check.json, gpu_check_samples.png, throughput.log,
# throughput.json, throughput_compile.json.
#
#   OUT=/tmp/out bash bench/gpu_run.sh                 # the GPU call (bench/RESULTS.md, "How to run on a GPU")
#   OUT=/tmp/out DEVICE=cpu QUICK=1 bash bench/gpu_run.sh   # a smoke of the same script on CPU, tiny sizes
#
# Each stage has its own time limit, so a hang in one still leaves the others' results; the exit status is
# the first failing stage's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
T_CHECK=${T_CHECK:-270}      # seconds for gpu_check (its target: under 5 minutes)
T_BENCH=${T_BENCH:-160}      # throughput, eager, both archs
T_COMPILE=${T_COMPILE:-100}  # throughput, compiled, BigGAN-128 only
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR="$DEVICE" GLOO_SOCKET_IFNAME=lo
THREADS=$(nproc)
status=0
note() { echo "[gpu_run $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/env.txt"; }

# -- 1. install (no index there: only what .whl/ carries) -------------------------------------------------------
note "python $($PY -c 'import sys; print(sys.version.split()[0])'), $THREADS CPU threads"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  t0=$(date +%s)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >>"$OUT/env.txt" 2>&1 || { note "FAIL: wheel install"; exit 3; }
  # DeepSpeed from its sdist, pure Python (DS_BUILD_OPS=0), against the torch that is there
  DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
    .whl/deepspeed-*.tar.gz >>"$OUT/env.txt" 2>&1 || { note "FAIL: deepspeed sdist build"; exit 3; }
  note "installed into $SITE in $(( $(date +%s) - t0 ))s"
  export PYTHONPATH="$SITE:$PWD"
else
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  $PY -c 'import torch, deepspeed, kornia, webdataset; print("torch", torch.__version__, "cuda", torch.version.cuda,
"deepspeed", deepspeed.__version__, "kornia", kornia.__version__, "webdataset", webdataset.__version__)' 2>&1 | tail -1
} >>"$OUT/env.txt"

# -- 2. every GPU path ------------------------------------------------------------------------------------------
check_args=(--device "$DEVICE" --out "$OUT" --budget-s $((T_CHECK - 45)))  # no part starts in the last 45 s
[ "$QUICK" = 1 ] && check_args+=(--quick --steps 2 --parts loader,train,resume,sampling --budget-s 100000)
note "gpu_check ${check_args[*]}"
timeout -k 10 "$T_CHECK" $PY bench/gpu_check.py "${check_args[@]}" >"$OUT/gpu_check.log" 2>&1
rc=$?; note "gpu_check exit $rc"; [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc

# -- 3. throughput: (a) the trainer as a user runs it vs (b) the bare fp32 step; loader vs consumption -------------
bench_args=(--device "$DEVICE" --channels-last --set "data.num_threads=$THREADS")
[ "$QUICK" = 1 ] && bench_args+=(--arch biggan --ch 4 --resolution 32 --batch 4 --warmup 1 --iters 2 --images 64)
note "throughput ${bench_args[*]}"
timeout -k 10 "$T_BENCH" $PY bench/throughput.py "${bench_args[@]}" --json "$OUT/throughput.json" \
  >"$OUT/throughput.log" 2>&1
rc=$?; note "throughput exit $rc"; [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc

# the same BigGAN-128 batch, compiled
batch=$($PY -c 'import json,sys; r=[x for x in json.load(open(sys.argv[1]))["runs"] if x["arch"]=="biggan"]; print(r[0]["batch"])' \
  "$OUT/throughput.json" 2>/dev/null || echo "")
compile_args=(--device "$DEVICE" --arch biggan --channels-last --compile --no-loader)
[ -n "$batch" ] && compile_args+=(--batch "$batch")
[ "$QUICK" = 1 ] && compile_args+=(--ch 4 --resolution 32 --warmup 1 --iters 2 --images 64)
note "throughput ${compile_args[*]}"
timeout -k 10 "$T_COMPILE" $PY bench/throughput.py "${compile_args[@]}" --json "$OUT/throughput_compile.json" \
  >>"$OUT/throughput.log" 2>&1
rc=$?; note "throughput (compile) exit $rc"; [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc

tail -n 14 "$OUT/gpu_check.log"
grep -hE "px  batch|\(a\)|\(b\)|ratio|loader \(" "$OUT/throughput.log" | tail -n 20
note "done, exit $status"
exit $status
