#!/usr/bin/env bash
# Train every asset of the mini world (src/cmlora/mini/assets) from scratch on a CPU, fixed seeds.
# Intermediate files (VAE before packing, tokenizer files) go to $WORK.  Logs: $WORK/*.log
set -euo pipefail
WORK=${WORK:-/tmp/mini_build}
THREADS=${THREADS:-2}
mkdir -p "$WORK"
python -m cmlora.mini.train vae       --work "$WORK" --threads "$THREADS" 2>&1 | tee "$WORK/vae.log"
python -m cmlora.mini.train detectors --work "$WORK" --threads "$THREADS" 2>&1 | tee "$WORK/det.log"
python -m cmlora.mini.train base      --work "$WORK" --threads "$THREADS" 2>&1 | tee "$WORK/base.log"
# The 11 LoRAs are independent (each has its own seed): two single-threaded processes use 2 cores
# better than one process with 2 threads on models this small. With the per-concept schedule
# (train.py's CONCEPT_SCHEDULE) the two took 25.9 and 22.7 minutes (sum of each LoRA's logged time).
python -m cmlora.mini.train loras --work "$WORK" --threads 1 \
  --only character_1 character_2 character_3 clothing_1 object_1 object_2 > "$WORK/loras_a.log" 2>&1 &
first=$!
python -m cmlora.mini.train loras --work "$WORK" --threads 1 \
  --only clothing_2 style_1 style_2 background_1 background_2 > "$WORK/loras_b.log" 2>&1 &
second=$!
wait "$first"
wait "$second"
python scripts/mini/check_world.py --threads "$THREADS" 2>&1 | tee "$WORK/check.log"
