#!/usr/bin/env bash
# The GPU checks, for a bare GPU machine without network: it has torch and triton but not this project's other
# packages. `make gpu-wheels` on a machine with network fills .whl/ (git-ignored); copy it along, then
#
#   bash bench/gpu_session.sh           # everything below in one command, at most 8 minutes, most valuable first
#   bash bench/gpu_session.sh tests     # pytest -m gpu (kernels, trainer, compile, sampler, a GPU training run)
#   bash bench/gpu_session.sh latency   # bench/latency.py: one-step sampling, SD1.5 architecture first
#   bash bench/gpu_session.sh kernels   # bench/throughput.py kernel rows
#   bash bench/gpu_session.sh steps     # bench/throughput.py training-step rows (SD1.5 first)
#
# Each phase of the default run has its own time cap (GPU_CAP_TESTS, GPU_CAP_LATENCY, GPU_CAP_KERNELS, GPU_CAP_STEPS s) so
# one slow phase cannot starve the next. GPU_BENCH_ARGS is passed on to bench/throughput.py and GPU_LATENCY_ARGS to
# bench/latency.py (the CPU test of this script sets both to small CPU runs). Every JSON is rewritten after each
# row, so a phase cut off keeps what it measured. Results land in $OUT (runs/gpu when unset). Copy the figures into bench/RESULTS.md with
# the device name this script prints first.
set -uo pipefail
phase=${1:-all}
case "$phase" in all|tests|latency|kernels|steps) ;;
    *) echo "gpu_session: unknown phase '$phase' (all, tests, latency, kernels or steps)" >&2; exit 2 ;; esac
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
WHL=${GPU_WHEELS:-.whl}
if [ -d "$WHL" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
        || { echo "gpu_session: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
PY=${GPU_PYTHON:-python3}
BENCH=(bench/throughput.py ${GPU_BENCH_ARGS:-})
LATENCY=(bench/latency.py ${GPU_LATENCY_ARGS:---models sd15,sd15-taesd,digits --batches 1,16,4})
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
else
    echo "no nvidia-smi on this machine" | tee "$OUT/device.txt"
fi
$PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1 | tee -a "$OUT/device.txt"
# the text models' rows need transformers and its dependencies; say up front when they cannot import
$PY -c "import transformers, tokenizers; print('transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.txt"

run_phase() {  # run_phase NAME CAP_SECONDS: one phase, killed at its cap (0: no cap)
    local name=$1 cap=$2 lim=()
    [ "$cap" -gt 0 ] && lim=(timeout --signal=INT --kill-after=15 "$cap")
    echo "== gpu_session: $name (cap ${cap}s) $(date -u +%H:%M:%S)"
    case "$name" in
        tests) "${lim[@]}" $PY -m pytest -q -m gpu -rs -p no:logging tests/test_kernels.py tests/test_hotpath.py tests/test_infer.py \
            tests/test_end_to_end.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
        latency) "${lim[@]}" $PY "${LATENCY[@]}" --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log" ;;
        kernels) "${lim[@]}" $PY "${BENCH[@]}" --no-step --json "$OUT/throughput_kernels.json" 2>&1 \
            | tee "$OUT/kernels.log" ;;
        steps) "${lim[@]}" $PY "${BENCH[@]}" --no-kernels --json "$OUT/throughput_steps.json" 2>&1 \
            | tee "$OUT/steps.log" ;;
    esac
    local rc=$?
    [ $rc -eq 124 ] && echo "== gpu_session: $name cut off at its cap of ${cap}s; its JSON keeps the rows so far"
    return $rc
}

if [ "$phase" = all ]; then
    status=0
    run_phase tests "${GPU_CAP_TESTS:-120}" || status=1
    run_phase latency "${GPU_CAP_LATENCY:-180}" || status=1
    run_phase kernels "${GPU_CAP_KERNELS:-60}" || status=1
    run_phase steps "${GPU_CAP_STEPS:-170}" || status=1
    echo "== gpu_session: done $(date -u +%H:%M:%S)"
    exit $status
fi
run_phase "$phase" 0
