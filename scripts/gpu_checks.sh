#!/usr/bin/env bash
# The GPU checks of the Speed issue, in stages, each under its own time limit so that one slow stage
# cannot take the others' time. Results (JSON) and one log go to $OUT (default runs/gpu).
#
#   bash scripts/gpu_checks.sh env sd15 sdxl dtype compile
#
# env: versions and the card; sd15: SD-1.5 512 fp16, all methods, N = 2..5, sequential and batched;
# sdxl: SDXL 1024 fp16; dtype: fp32/fp16/bf16 on the mini world (benchmarks/dtype_check.py); compile:
# SD-1.5 512 N = 5 with the UNet's blocks compiled by inductor. Environment: <STAGE>_LIMIT (seconds),
# SD15_N / SDXL_N (LoRA counts), SD15_BATCH (both), SDXL_REPEATS (3), FUSE (auto; both times merge and
# switch un-fused and fused).
#
# On a machine without cmlora installed, wheels in .whl/ (diffusers, peft) are installed to /tmp/site
# and the source tree is put on PYTHONPATH.
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:src
fi
PY=${PY:-python3}
SPEED=(benchmarks/speed.py --device cuda --dtype fp16 --fuse ${FUSE:-auto})

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name: limit ${limit}s, start $(date +%T)"
    timeout "$limit" "$@"
    echo "== $name: exit $? at $(date +%T)"
}

for name in "$@"; do
    case $name in
        env)
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
            $PY -c "import torch, diffusers, transformers, peft, cmlora; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
            ;;
        sd15)
            stage sd15 ${SD15_LIMIT:-240} $PY "${SPEED[@]}" --arch sd15 --size 512 --n ${SD15_N:-5,2,3,4} --batch ${SD15_BATCH:-both} --repeats 3 --out "$OUT/speed_gpu_sd15_512.json"
            ;;
        dtype)
            stage dtype ${DTYPE_LIMIT:-150} $PY benchmarks/dtype_check.py --device cuda --every ${DTYPE_EVERY:-40} --seeds 2 --out "$OUT/dtype_check_gpu.json"
            ;;
        sdxl)
            stage sdxl ${SDXL_LIMIT:-300} $PY "${SPEED[@]}" --arch sdxl --size 1024 --n ${SDXL_N:-5,2,3,4} --repeats ${SDXL_REPEATS:-3} --out "$OUT/speed_gpu_sdxl_1024.json"
            ;;
        compile)  # compare with the sd15 stage's N = 5 rows of the same machine ("batched" is the default)
            stage compile ${COMPILE_LIMIT:-200} $PY "${SPEED[@]}" --arch sd15 --size 512 --n 5 --methods merge,composite,cmlora-offline --repeats 3 --compile inductor --out "$OUT/compile_gpu_sd15_inductor.json"
            ;;
        *)
            echo "unknown stage $name (env, sd15, dtype, sdxl, compile)" >&2
            exit 2
            ;;
    esac
done
