#!/usr/bin/env bash
# The GPU checks, for a bare GPU machine without network: it has torch and triton but not this project's other
# packages. `make gpu-wheels` on a machine with network fills .whl/ (git-ignored); copy it along, then run one
# phase per command (each fits in 10 minutes):
#
#   bash bench/gpu_session.sh tests     # pytest -m gpu (kernels, trainer, compile)
#   bash bench/gpu_session.sh kernels   # bench/throughput.py kernel rows
#   bash bench/gpu_session.sh steps     # bench/throughput.py training-step rows
#
# The throughput JSON is rewritten after every row, so a command cut off at a time limit keeps what it measured.
# Results land in $OUT (runs/gpu when unset). Copy the figures into bench/RESULTS.md with the device name this
# script prints first.
set -uo pipefail
phase=${1:?usage: bench/gpu_session.sh tests|kernels|steps}
case "$phase" in tests|kernels|steps) ;; *) echo "gpu_session: unknown phase '$phase' (tests, kernels or steps)" >&2; exit 2 ;; esac
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_session: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__,
'diffusers', diffusers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/device.txt"
case "$phase" in
    tests)
        python3 -m pytest -q -m gpu -rs tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    kernels)
        python3 bench/throughput.py --no-step --json "$OUT/throughput_kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    steps)
        python3 bench/throughput.py --no-kernels --json "$OUT/throughput_steps.json" 2>&1 | tee "$OUT/steps.log" ;;
esac
