#!/usr/bin/env bash
# Whole-image inference of one large image with its rows split over N processes
# (spatial parallelism; docs/spatial_parallel.md):
#   bash tools/dist_infer_large.sh CONFIG CHECKPOINT IMAGE N [infer_large.py options]
#   bash tools/dist_infer_large.sh CONFIG none "" 2 --synthetic 8192 8192 --out mask.png
# On a CPU-only machine the processes use the gloo backend.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
IMAGE=$3
NPROC=$4
PORT=${PORT:-29510}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-"$ROOT/.venv/bin/python"}
[ -x "$PYTHON" ] || PYTHON=python
ARGS=("$CONFIG" "$CHECKPOINT")
[ -n "$IMAGE" ] && ARGS+=("$IMAGE")

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$ROOT/tools/infer_large.py" "${ARGS[@]}" "${@:5}"
