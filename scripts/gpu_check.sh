#!/usr/bin/env bash
# The GPU check of docs/gpu.md: logits parity CPU vs DEVICE, lossless greedy per drafter, and a
# quick bench of plain vs layer-skip vs ngram (vs draft-model) on DEVICE; results in OUTDIR.
#   scripts/gpu_check.sh [DEVICE=cuda] [OUTDIR=gpu-check]
#   GPU_CHECK_SHORT=1 scripts/gpu_check.sh cpu /tmp/gc      # short run, e.g. on a CPU
# Env: PYTHON (default: the repo's .venv, else python3), MODEL (default smollm2-135m), DTYPE
# (of the second model on DEVICE; default auto = bf16 on CUDA). Under 5 minutes on a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEVICE="${1:-cuda}"
OUT="${2:-gpu-check}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu visible:", torch.cuda.is_available())' | tee "$OUT/env.txt"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" --device "$DEVICE" --out "$OUT" --model "${MODEL:-smollm2-135m}" --dtype "${DTYPE:-auto}"
