#!/usr/bin/env bash
# Issue 17's GPU rows and the CUDA-only tests, as one call on a lent device machine (it has no internet and its
# Python 3.12 image holds torch, transformers, timm and onnxruntime but not these pure-Python packages).
#
# Here, before the device call (downloads the wheels into .whl/, which git ignores):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# What comes back under $OUT: tests.log; bench-gpu.json/.log (`clipforge bench --device cuda`); profile.txt
# (benchmarks/gpu_profile.py); bench-gpu-compile.json/.log (--train-compile) and bench-gpu-b1024.json/.log (batch 1024).
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
# Every phase gets what is left of a ~560 s budget (the device call allows 600), most important first, each
# writing its own files, so a phase cut short loses only itself.
BUDGET=${GPU_CHECK_BUDGET:-560}
left() { local t=$(( BUDGET - SECONDS )); [ "$t" -gt "$1" ] && echo "$1" || echo $(( t > 5 ? t : 5 )); }
# CUDA-only tests first (short); -rs lists every skip with its reason
timeout "$(left 90)" python3 -m pytest -q -rs -p no:cacheprovider tests/test_loss.py tests/test_checkpoint.py -k cuda \
    2>&1 | tee "$OUT/tests.log"
# ViT-B-32 224 px bf16: training samples/s, peak memory, MFU against the measured bf16 matmul peak, image embedding,
# each beside open_clip and transformers in the same run
timeout "$(left 300)" python3 -m clipforge.cli bench --device cuda --parts embed train loss --json "$OUT/bench-gpu.json" \
    2>&1 | tee "$OUT/bench-gpu.log"
# Where the step's time goes (launch-bound or kernel-bound), eager
timeout "$(left 60)" python3 benchmarks/gpu_profile.py --model ViT-B-32 --batch 256 2>&1 | tee "$OUT/profile.txt"
# Both implementations under torch.compile, then a larger batch: how far each lifts MFU
timeout "$(left 180)" python3 -m clipforge.cli bench --device cuda --parts train --train-compile \
    --json "$OUT/bench-gpu-compile.json" 2>&1 | tee "$OUT/bench-gpu-compile.log"
timeout "$(left 120)" python3 -m clipforge.cli bench --device cuda --parts train --train-batch 1024 \
    --json "$OUT/bench-gpu-b1024.json" 2>&1 | tee "$OUT/bench-gpu-b1024.log"
echo "gpu_check done in ${SECONDS}s"
