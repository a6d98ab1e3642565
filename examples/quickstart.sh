#!/usr/bin/env bash
# End to end on the embedded defaults: sample data -> train -> evaluate (metrics table + heat-map overlays)
# for every sample category, one summary table, then the last category converted to an ONNX bundle, checked
# against PyTorch and run through EdgeDetector.
# Usage: bash examples/quickstart.sh [DATA_DIR] [RUNS_DIR] [BUNDLES_DIR]
set -euo pipefail
DATA=${1:-data/sample}
RUNS=${2:-runs}
BUNDLES=${3:-bundles}
THREADS=${AMOE_THREADS:-2}
CATEGORIES=${AMOE_CATEGORIES:-"weave washer kit"}

amoe data sample "$DATA" --categories $CATEGORIES
for category in $CATEGORIES; do
  amoe train --data "$DATA/$category" --out "$RUNS/$category" --threads "$THREADS"
  amoe eval --model "$RUNS/$category" --data "$DATA/$category" --out "$RUNS/$category/metrics.json" \
    --save-images "$RUNS/$category/overlays" --threads "$THREADS"
done
python examples/summarize_runs.py "$RUNS" $CATEGORIES

last=${CATEGORIES##* }
amoe convert --checkpoint "$RUNS/$last" --target onnx --out "$BUNDLES/$last-onnx" --threads "$THREADS"
amoe verify "$BUNDLES/$last-onnx" --data "$DATA/$last" --threads "$THREADS"
python examples/inspect_folder.py "$BUNDLES/$last-onnx" "$DATA/$last/test" --out "$BUNDLES/$last-onnx-ng" --threads "$THREADS"
