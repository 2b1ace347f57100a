#!/usr/bin/env bash
# Reproduce every table of docs/RESULTS.md: the paper's experiments on the data under
# DATA_ROOT (default ../shared/data), EfficientNet-Lite0, one script after another.
# Results: runs/paper/<experiment>/*.csv|json|md; wall times: runs/paper/wall.txt.
#   bash benchmarks/run_paper.sh                 # everything (about 1 h on 2 CPU cores)
#   PY=/path/to/python DATA_ROOT=/data bash benchmarks/run_paper.sh paper_table1_regions
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_ROOT=${DATA_ROOT:-../shared/data}
EXPERIMENTS=${*:-paper_table1_regions paper_table2_layers paper_fig5_multiscale paper_finetune paper_table6_qe distractors}
mkdir -p runs/paper
status=0
for e in $EXPERIMENTS; do
  extra=()
  [ "$e" = paper_table6_qe ] && extra=(--finetuned runs/paper/finetune)
  start=$(date +%s)
  echo "== $e"
  "$PY" "benchmarks/$e.py" --data-root "$DATA_ROOT" "${extra[@]}" > "runs/paper/$e.log" 2>&1
  rc=$?
  echo "$e rc=$rc $(( $(date +%s) - start )) s $(date -u +%FT%TZ)" | tee -a runs/paper/wall.txt
  [ $rc -ne 0 ] && { status=1; tail -20 "runs/paper/$e.log"; }
done
exit $status
