#!/usr/bin/env bash
# The whole pipeline on a tiny random model and the shipped example data, offline, in seconds:
# score -> train -> inspect -> apply, then check that the merged model equals base + delta.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-out/quickstart}"
rm -rf "$work" && mkdir -p "$work"

piece-surgery tiny-model "$work/base"
piece-surgery score "$work/base" --data "$here/data/code.jsonl" -o "$work/mask.safetensors" --density 0.01 -q
piece-surgery inspect "$work/mask.safetensors"
piece-surgery train "$work/base" --data "$here/data/code.jsonl" --mask "$work/mask.safetensors" \
  -o "$work/delta" --lr 1e-2 --epochs 5 --batch-size 2 -q
piece-surgery inspect "$work/delta"
piece-surgery apply "$work/base" "$work/delta" -o "$work/merged" -q
piece-surgery diff "$work/base" "$work/merged" -o "$work/delta-again"
cmp "$work/delta/delta.safetensors" "$work/delta-again/delta.safetensors"
echo "quickstart done: $work/merged is the tuned model, and diffing it against the base gives the delta back byte for byte"
