#!/usr/bin/env bash
# Issue 17's GPU rows and the CUDA-only tests, as one call on a lent device machine (it has no internet and its
# Python 3.12 image holds torch, transformers, timm and onnxruntime but not these pure-Python packages).
#
# Here, before the device call (downloads the wheels into .whl/, which git ignores):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# What comes back under $OUT: bench-gpu.json (`clipforge bench --device cuda --json`), bench-gpu.log, tests.log.
set -uo pipefail
WHEELS="open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7"

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
    ls .whl
    exit
fi

OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run 'bash benchmarks/gpu_check.sh --fetch-wheels' here first"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, clipforge, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || exit 1
# CUDA-only tests first (short); -rs lists every skip with its reason
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_loss.py tests/test_checkpoint.py -k cuda \
    2>&1 | tee "$OUT/tests.log"
# ViT-B-32 224 px bf16: training samples/s, peak memory, MFU against the measured bf16 matmul peak, image embedding,
# each beside open_clip and transformers in the same run
timeout 360 python3 -m clipforge.cli bench --device cuda --parts embed train loss --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
