#!/usr/bin/env bash
# Run on a machine with a CUDA GPU and piece-surgery installed: CUDA results against the CPU's.
# Exits non-zero on any mismatch. See scripts/gpu_check.py for what is compared and the tolerances.
set -euo pipefail
exec python "$(dirname "$0")/gpu_check.py" "$@"
