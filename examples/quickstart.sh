#!/usr/bin/env bash
# End to end on the embedded defaults, the way a plant uses it: one detector trained over the whole sample
# product range, evaluated per product (metrics table + heat-map overlays), then one static folded ONNX bundle per
# product, the last one checked against the dense PyTorch model and run through EdgeDetector.
# Usage: bash examples/quickstart.sh [DATA_DIR] [RUNS_DIR] [BUNDLES_DIR]
set -euo pipefail
DATA=${1:-data/sample}
RUNS=${2:-runs}
BUNDLES=${3:-bundles}
THREADS=${AMOE_THREADS:-2}
CATEGORIES=${AMOE_CATEGORIES:-"weave washer kit leather pins vial"}

amoe data sample "$DATA" --categories $CATEGORIES
amoe train --data "$DATA" --out "$RUNS/range" --threads "$THREADS"
amoe info "$RUNS/range" | sed -n '/^products:/,/^prototypes:/p'
amoe eval --model "$RUNS/range" --data "$DATA" --out "$RUNS/range/metrics.json" --save-images "$RUNS/range/overlays" \
  --threads "$THREADS"

last=${CATEGORIES##* }
amoe convert --checkpoint "$RUNS/range" --target onnx --routing folded --all-products --out "$BUNDLES/range-folded" \
  --threads "$THREADS"
amoe verify "$BUNDLES/range-folded/$last" --data "$DATA/$last" --threads "$THREADS"
python examples/inspect_folder.py "$BUNDLES/range-folded/$last" "$DATA/$last/test" --out "$BUNDLES/$last-folded-ng" \
  --threads "$THREADS"
