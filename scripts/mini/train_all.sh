#!/usr/bin/env bash
# Train every asset of the mini world (src/cmlora/mini/assets, or $CMLORA_MINI_ASSETS) from scratch,
# fixed seeds. Intermediate files (VAE before packing, tokenizer files) go to $WORK; logs: $WORK/*.log.
#   bash scripts/mini/train_all.sh                      # every stage, on the CPU
#   DEVICE=cuda bash scripts/mini/train_all.sh          # the same scripts on a lent GPU
#   STAGES="base_more loras profile" bash scripts/mini/train_all.sh   # resume from a stage
# The default stages run base_more as many times as the shipped base had passes (BASE_MORE_PASSES).
# Each stage's wall time is appended to $WORK/times.txt.
set -euo pipefail
WORK=${WORK:-/tmp/mini_build}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
if [[ -z "${STAGES:-}" ]]; then
  more=$(python -c 'from cmlora.mini.train import BASE_MORE_PASSES as n; print(" ".join(["base_more"] * n))')
  STAGES="vae detectors base $more loras profile check"
fi
mkdir -p "$WORK"
passes=0
train() { python -m cmlora.mini.train "$@" --work "$WORK" --device "$DEVICE"; }
timed() {
  local name=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - start )) s" | tee -a "$WORK/times.txt"
}
loras() {
  # The 11 LoRAs are independent (each has its own seed): on a CPU two single-threaded processes use
  # 2 cores better than one process with 2 threads on models this small.
  train loras --threads 1 --only character_1 character_2 character_3 clothing_1 clothing_2 style_1 \
    > "$WORK/loras_a.log" 2>&1 &
  local first=$!
  train loras --threads 1 --only style_2 background_1 background_2 object_1 object_2 \
    > "$WORK/loras_b.log" 2>&1 &
  local second=$!
  wait "$first"
  wait "$second"
}
profile() {
  # CMLoRA's default order for the mini LoRAs: their frequency profile, made with the new LoRAs.
  local assets
  assets=$(python -c 'import cmlora.mini as m; print(m.assets_dir())')
  cmlora profile --quiet --seeds 8 --guidance 5 --device "$DEVICE" --out "$assets/mini_profile.json" \
    $(for id in character_1 character_2 character_3 clothing_1 clothing_2 style_1 style_2 \
      background_1 background_2 object_1 object_2; do echo --lora "$id"; done)
}
for stage in $STAGES; do
  case $stage in
    vae) timed vae train vae --threads "$THREADS" 2>&1 | tee "$WORK/vae.log" ;;
    detectors) timed detectors train detectors --threads "$THREADS" 2>&1 | tee "$WORK/det.log" ;;
    base) timed base train base --threads "$THREADS" 2>&1 | tee "$WORK/base.log" ;;
    base_more)
      passes=$((passes + 1))
      timed "base_more_$passes" train base_more --threads "$THREADS" 2>&1 | tee "$WORK/base_more_$passes.log" ;;
    loras) timed loras loras ;;
    profile) timed profile profile 2>&1 | tee "$WORK/profile.log" ;;
    check) timed check python scripts/mini/check_world.py --threads "$THREADS" --device "$DEVICE" \
      2>&1 | tee "$WORK/check.log" ;;
    *) echo "unknown stage '$stage': use vae, detectors, base, base_more, loras, profile, check" >&2; exit 2 ;;
  esac
done
