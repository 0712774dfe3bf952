#!/usr/bin/env bash
# Time the VAE, detector, base and base_more stages of the mini world without touching the shipped
# assets: each stage runs STEPS steps (default 100) into a temporary assets folder, and the full-length
# cost is extrapolated as  set-up + default steps x (seconds per step), both read off the stage's own log.
#   bash scripts/mini/time_stages.sh            # about 11 minutes on 2 cores
#   LOGS=/some/dir bash scripts/mini/time_stages.sh --parse-only   # re-read logs of an earlier run
#   STAGES="base_more" LOGS=/some/dir bash scripts/mini/time_stages.sh   # one stage more into a run
set -euo pipefail
STEPS=${STEPS:-100}
THREADS=${THREADS:-2}
LOGS=${LOGS:-$(mktemp -d)}
ALL="vae detectors base base_more"
STAGES=${STAGES:-$ALL}
# each stage's step option (the parser's dest is the same with _ for -)
declare -A OPTION=([vae]=vae-steps [detectors]=det-steps [base]=base-steps [base_more]=base-more-steps)
if [[ "${1:-}" != "--parse-only" ]]; then
  # the shipped prompts, read before CMLORA_MINI_ASSETS points at the scratch folder
  prompts="$(python -c 'import cmlora.mini as m; print(m.assets_dir())')/prompts.json"
  export CMLORA_MINI_ASSETS="$LOGS/assets"
  mkdir -p "$CMLORA_MINI_ASSETS"
  cp "$prompts" "$CMLORA_MINI_ASSETS/"
  for stage in $STAGES; do
    start=$(date +%s.%N)
    python -m cmlora.mini.train "$stage" "--${OPTION[$stage]}" "$STEPS" \
      --work "$LOGS/work" --threads "$THREADS" > "$LOGS/$stage.log" 2>&1
    echo "$(date +%s.%N) - $start" | bc > "$LOGS/$stage.total"
  done
fi
sum=0
for stage in $ALL; do
  [[ -f "$LOGS/$stage.total" ]] || continue
  full_steps=$(python -c "from cmlora.mini.train import parser; print(parser().get_default('${OPTION[$stage]//-/_}'))")
  total=$(cat "$LOGS/$stage.total")
  # first and last "step K ... Ns" lines of the stage's log
  read -r k0 s0 k1 s1 <<< "$(grep -E " step [0-9]+ " "$LOGS/$stage.log" |
    sed -E 's/.* step ([0-9]+) .* ([0-9]+)s$/\1 \2/' | sed -n '1p;$p' | tr '\n' ' ')"
  per_step=$(echo "scale=4; ($s1 - $s0) / ($k1 - $k0)" | bc)
  setup=$(echo "scale=1; $total - ($s1 - $s0)" | bc)
  full=$(echo "scale=1; $setup + $full_steps * $per_step" | bc)
  sum=$(echo "scale=1; $sum + $full" | bc)
  printf '%-10s %6.1f s for %d steps: %.3f s/step, set-up %.0f s -> %d steps: %.0f s (%.1f min)\n' \
    "$stage" "$total" "$((k1 + 1))" "$per_step" "$setup" "$full_steps" "$full" "$(echo "$full / 60" | bc -l)"
done
printf 'stages above at default length: %.0f s (%.1f min), %d threads\n' "$sum" "$(echo "$sum / 60" | bc -l)" "$THREADS"
