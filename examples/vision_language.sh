#!/usr/bin/env bash
# A vision-language model end to end on a tiny random LLaVA and the shipped image chats, offline:
# score -> train -> inspect (entries per part) -> apply, then check that the merged model equals
# base + delta. Image paths in data/pictures.jsonl are relative to that file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-out/vision-language}"
rm -rf "$work" && mkdir -p "$work"

piece-surgery tiny-model "$work/base" --arch llava          # weights, tokenizer and processor
piece-surgery score "$work/base" --data "$here/data/pictures.jsonl" -o "$work/mask.safetensors" \
  --density 0.01 --retain "$here/data/pictures.jsonl" -q
piece-surgery inspect "$work/mask.safetensors"              # language model and projector; no vision tower
piece-surgery train "$work/base" --data "$here/data/pictures.jsonl" --mask "$work/mask.safetensors" \
  -o "$work/delta" --lr 1e-2 --epochs 3 --batch-size 2 -q
piece-surgery apply "$work/base" "$work/delta" -o "$work/merged" -q
piece-surgery diff "$work/base" "$work/merged" -o "$work/delta-again"
cmp "$work/delta/delta.safetensors" "$work/delta-again/delta.safetensors"
echo "vision-language example done: $work/merged is the tuned model, and diffing it against the base gives the delta back byte for byte"
