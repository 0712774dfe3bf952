#!/usr/bin/env bash
# The README main command's composition and seeds with every method, each judged: the counts the
# README gives for the other methods. Images, the judge's verdicts (judge.txt) and logs go to
# $OUT/<method>; one "shown in" line per method.
#   bash scripts/mini/main_command_by_method.sh
#   LORAS="object_1 style_2 object_2" METHODS="merge composite" OUT=/tmp/by_method bash scripts/mini/main_command_by_method.sh
set -euo pipefail
OUT=${OUT:-runs/main_command_by_method}
LORAS=${LORAS:-"character_3 background_2"}
METHODS=${METHODS:-$(python -c 'from cmlora.methods import METHOD_LABELS; print(*METHOD_LABELS)')}
args=()
for id in $LORAS; do args+=(--lora "$id"); done
for method in $METHODS; do
  rm -rf "${OUT:?}/$method"
  mkdir -p "$OUT/$method"
  log="$OUT/$method/log.txt"
  if ! cmlora generate "${args[@]}" --method "$method" --num-images 4 --quiet --out "$OUT/$method" > "$log" 2>&1 ||
    ! python scripts/mini/judge_images.py "$OUT/$method"/*.png > "$OUT/$method/judge.txt" 2>> "$log"; then
    echo "$method failed; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
  echo "$method: $(tail -n 1 "$OUT/$method/judge.txt")"
done
