#!/usr/bin/env bash
# Install (if needed) and run the whole workflow on the embedded demo; print where the results are.
# Extra arguments go to snakemake (e.g. `bash scripts/demo.sh --cores 4`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
snakemake "$@"
echo
echo "table:  $PWD/results/tables/comparison.md  (and .csv)"
echo "figure: $PWD/results/figures/test_dice.png"
