#!/usr/bin/env bash
# Install (if needed) and run the whole workflow on the embedded demo; print where the results are.
# Extra arguments go to snakemake (e.g. `bash scripts/demo.sh --cores 4`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
snakemake "$@"
snakemake "$@" --report results/report.html
echo
echo "tables:  $PWD/results/tables/  (comparison.md, ablations.md, pretrain_cost.md, ...)"
echo "figures: $PWD/results/figures/ (PNG + PDF + CSV)"
echo "report:  $PWD/results/report.html  (open in a browser)"
