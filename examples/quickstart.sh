#!/usr/bin/env bash
# The whole pipeline on a tiny random model and the shipped example data, offline, in seconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-out/quickstart}"
rm -rf "$work" && mkdir -p "$work"

piece-surgery tiny-model "$work/base"
piece-surgery score "$work/base" --data "$here/data/code.jsonl" -o "$work/mask.safetensors" --density 0.01 -q
piece-surgery inspect "$work/mask.safetensors"
