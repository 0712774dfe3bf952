#!/usr/bin/env bash
# The quality benchmark one N at a time, each N as two CPU processes (RANK 0 and 1), then one table of
# all of them. A finished N is a result of its own, so a long run that is stopped keeps what it made;
# running the script again resumes where it stopped (every run folder resumes). Progress: $OUT-n<N>/rank*.log.
#   bash benchmarks/quality_by_n.sh                 # N = 2, 3, 4, 5 into runs/quality-n{2..5}, table in runs/quality
#   SIZES="2 3" OUT=runs/q bash benchmarks/quality_by_n.sh
# Extra arguments go to every quality.py call (e.g. --images-per-n 100, --front).
set -euo pipefail
OUT=${OUT:-runs/quality}
SIZES=${SIZES:-"2 3 4 5"}
runs=()
for n in $SIZES; do
  run="$OUT-n$n"
  start=$(date +%s)
  mkdir -p "$run"
  RANK=0 WORLD_SIZE=2 python benchmarks/quality.py --n "$n" --out "$run" --threads 1 "$@" > "$run/rank0.log" 2>&1 &
  first=$!
  RANK=1 WORLD_SIZE=2 python benchmarks/quality.py --n "$n" --out "$run" --threads 1 "$@" > "$run/rank1.log" 2>&1 &
  second=$!
  wait "$first"
  wait "$second"
  echo "N = $n: $(( $(date +%s) - start )) s ($run)"
  runs+=("$run")
done
python benchmarks/quality.py --combine "${runs[@]}" --out "$OUT"
