#!/usr/bin/env bash
# Issue 17's GPU rows and the CUDA-only tests, as one call on a lent device machine (it has no internet and its
# Python 3.12 image holds torch, transformers, timm and onnxruntime but not these pure-Python packages).
#
# Here, before the device call (downloads the wheels into .whl/, which git ignores):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   (phases can be named: run(command="bash benchmarks/gpu_check.sh variants bench-train", ...); see PHASES below)
# What comes back under $OUT: tests.log; bench-gpu.json/.log (`clipforge bench --device cuda`); profile.txt
# (benchmarks/gpu_profile.py); variants.json/.log (benchmarks/gpu_train_variants.py); bench-gpu-compile.json/.log
# (--train-compile), bench-gpu-b1024.json/.log (batch 1024) and the other phases' likewise.
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
# Phases (arguments choose and order them; default: the most important first; what does not fit is cut). Each gets
# what is left of a ~560 s budget (the device call allows 600) and writes its own files under $OUT, so a phase cut
# short loses only itself (at most 8 files come back). On an H200 `variants` and `bench` together took ~350 s;
# the three compile phases compile every implementation three times each.
PHASES=${*:-tests bench compile-b1024 variants profile}
BUDGET=${GPU_CHECK_BUDGET:-560}
left() { local t=$(( BUDGET - SECONDS )); [ "$t" -gt "$1" ] && echo "$1" || echo $(( t > 5 ? t : 5 )); }
bench() {  # bench NAME SECONDS ARGS...: clipforge bench on the GPU, JSON and log under $OUT
    local name=$1 seconds=$2; shift 2
    timeout "$(left "$seconds")" python3 -m clipforge.cli bench --device cuda "$@" --json "$OUT/$name.json" \
        2>&1 | tee "$OUT/$name.log"
}
for phase in $PHASES; do
    case $phase in
        # CUDA-only tests (short); -rs lists every skip with its reason
        tests) timeout "$(left 90)" python3 -m pytest -q -rs -p no:cacheprovider tests/test_loss.py \
                   tests/test_checkpoint.py tests/test_models.py -k cuda 2>&1 | tee "$OUT/tests.log" ;;
        # ViT-B-32 224 px bf16: training samples/s, peak memory, MFU against the measured bf16 matmul peak, image
        # embedding, each beside open_clip and transformers in the same run
        bench) bench bench-gpu 300 --parts embed train loss ;;
        bench-train) bench bench-gpu-train 150 --parts train ;;
        # where the eager step's time goes (launch-bound or kernel-bound)
        profile) timeout "$(left 60)" python3 benchmarks/gpu_profile.py --model ViT-B-32 --batch 256 2>&1 \
                     | tee "$OUT/profile.txt" ;;
        # the step's recent choices against what they replaced, interleaved in one process
        variants) timeout "$(left 90)" python3 benchmarks/gpu_train_variants.py --json "$OUT/variants.json" 2>&1 \
                      | tee "$OUT/variants.log" ;;
        # both implementations under torch.compile, and larger batches: how far each lifts MFU
        compile) bench bench-gpu-compile 180 --parts train --train-compile ;;
        b1024) bench bench-gpu-b1024 120 --parts train --train-batch 1024 ;;
        compile-b1024) bench bench-gpu-compile-b1024 200 --parts train --train-compile --train-batch 1024 ;;
        *) echo "unknown phase $phase" ;;
    esac
done
echo "gpu_check done in ${SECONDS}s"
