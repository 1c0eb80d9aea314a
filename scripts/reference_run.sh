#!/usr/bin/env bash
# A curated reference run: the main suite plus a calibration, kept under results/reference/.
# Usage: scripts/reference_run.sh NAME [extra `compound run` flags...]
#   CALIBRATE_FLAGS="--device cuda --budget 120" scripts/reference_run.sh gpu-small --device cuda
# `compound run` gets the extra flags; `compound calibrate` gets $CALIBRATE_FLAGS (its flags
# differ). On a GPU machine pass `--device cuda` to both; the environment lands in run.json.
set -euo pipefail
name=${1:?usage: scripts/reference_run.sh NAME [compound run flags]}
shift
compound run --results-dir results/reference --run-id "$name" --no-progress "$@"
# shellcheck disable=SC2086  # word splitting of the flag list is intended
compound calibrate --json ${CALIBRATE_FLAGS:-} > "results/reference/$name/calibration.json"
gzip -9 "results/reference/$name/samples.jsonl"  # raw samples exceed the 5 MB file limit
echo "reference run written to results/reference/$name (samples.jsonl.gz: gunzip -k to reanalyse)"
