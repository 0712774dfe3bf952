#!/usr/bin/env bash
# The GPU checks of the Speed issue, in stages, each under its own time limit so that one slow stage
# cannot take the others' time. Results (JSON) and one log go to $OUT (default runs/gpu).
#
#   bash scripts/gpu_checks.sh env sd15 sdxl dtype compile
#   bash scripts/gpu_checks.sh env mini
#
# env: versions and the card; sd15: SD-1.5 512 fp16, all methods, N = 2..5, sequential and batched;
# sdxl: SDXL 1024 fp16; dtype: fp32/fp16/bf16 on the mini world (benchmarks/dtype_check.py); compile:
# SD-1.5 512 N = 5 with the UNet's blocks compiled by inductor; mini: the mini world's training stages
# (scripts/mini/train_all.sh with DEVICE=cuda) into a scratch assets folder, all within MINI_BUDGET
# seconds (600), stage by stage so that one failing stage leaves the others' results; the stage times,
# logs and the new assets (a tar in 15 MB parts: cat $OUT/mini_assets.tar.* | tar x) come back for the
# world's check on the CPU. Environment: <STAGE>_LIMIT (seconds),
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
    # train_all.sh calls `python` and the `cmlora` command, which such a machine lacks
    mkdir -p /tmp/bin
    command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
    printf '#!/bin/sh\nexec python3 -m cmlora.app.cli "$@"\n' > /tmp/bin/cmlora
    chmod +x /tmp/bin/cmlora
    export PATH=/tmp/bin:$PATH
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
        mini)
            dir=${MINI_DIR:-/tmp/mini_gpu}
            mkdir -p "$dir/assets" "$dir/work"
            deadline=$(( $(date +%s) + ${MINI_BUDGET:-600} ))
            # the VAE first (the others need it), the judge last (no other stage needs it)
            for s in ${MINI_STAGES:-vae base base_more loras profile detectors}; do
                left=$(( deadline - $(date +%s) ))
                (( left > 0 )) || { echo "== mini_$s: skipped, MINI_BUDGET spent"; continue; }
                CMLORA_MINI_ASSETS=$dir/assets WORK=$dir/work DEVICE=${MINI_DEVICE:-cuda} STAGES=$s \
                    stage "mini_$s" "$left" bash scripts/mini/train_all.sh
            done
            cp "$dir/work/times.txt" "$OUT/mini_times.txt"
            tar czf "$OUT/mini_logs.tgz" -C "$dir/work" --exclude=vae --exclude=tokenizer --exclude='*.pt' .
            tar cf - -C "$dir" assets | split -b 15M - "$OUT/mini_assets.tar."
            ;;
        *)
            echo "unknown stage $name (env, sd15, dtype, sdxl, compile, mini)" >&2
            exit 2
            ;;
    esac
done
