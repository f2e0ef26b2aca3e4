#!/usr/bin/env bash
# The GPU checks in one device call per phase, for a session that is lent a GPU machine (30 min of device time;
# each call at most 10 min). That machine has torch and triton but not this project's other packages, and no
# network: `make gpu-wheels` here first (fills .whl/, git-ignored), then carry it:
#
#   run(command="bash bench/gpu_session.sh tests",   carry=[".whl"])   # pytest -m gpu (kernels, trainer, compile)
#   run(command="bash bench/gpu_session.sh kernels", carry=[".whl"])   # bench/throughput.py kernel rows
#   run(command="bash bench/gpu_session.sh steps",   carry=[".whl"])   # bench/throughput.py training-step rows
#
# The throughput JSON is rewritten after every row, so a call cut off at its limit still returns what it measured.
#
# Results land in $OUT (the device tool's folder; runs/gpu when run by hand). Copy the figures into
# bench/RESULTS.md with the device name this script prints first.
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
