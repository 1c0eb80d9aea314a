#!/usr/bin/env bash
# A curated reference run: calibration plus the main suite, kept under results/reference/<name>/.
# Usage: scripts/reference_run.sh NAME [extra `compound run` flags...]
# On a GPU machine pass `--device cuda`; the environment (GPU, driver, clocks) lands in run.json.
set -euo pipefail
name=${1:?usage: scripts/reference_run.sh NAME [compound run flags]}
shift
out="results/reference/$name"
mkdir -p "$out"
compound calibrate --json "$@" > "$out/calibration.json"
compound run --results-dir results/reference --run-id "$name-run" --no-progress "$@"
echo "reference run written to results/reference/$name-run and $out/calibration.json"
