#!/usr/bin/env bash
# The benchmark study of docs/results.md: every config in configs/study, in order, into runs/study.
# Resumable: rerun after an interruption and finished cells are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
for cfg in configs/study/*.toml; do
  echo "== $cfg"
  .venv/bin/relprune bench --config "$cfg" --out "${OUT:-runs/study}"
done
