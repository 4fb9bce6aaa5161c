#!/usr/bin/env bash
# The benchmark study of docs/results.md: configs/study/*.toml into runs/study, in order, or only the
# configs named as arguments. Resumable: rerun after an interruption and finished cells are skipped.
# Two runners on different configs may share the output folder (each cell is one appended line).
set -euo pipefail
cd "$(dirname "$0")/.."
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/study/*.toml)
for cfg in "${configs[@]}"; do
  echo "== $cfg"
  .venv/bin/relprune bench --config "$cfg" --out "${OUT:-runs/study}"
done
