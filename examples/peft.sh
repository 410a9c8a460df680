#!/usr/bin/env bash
# A delta as a PEFT adapter and back, offline on a tiny model (needs: pip install 'piece-surgery[peft]'):
# train a delta, export it as a SHiRA adapter, load that with stock PEFT, then import the adapter
# (any PEFT adapter that merges into its base, LoRA included) back into a delta.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-out/peft}"
rm -rf "$work" && mkdir -p "$work"

piece-surgery tiny-model "$work/base" -q
piece-surgery score "$work/base" -o "$work/mask.safetensors" --method magnitude --density 0.02 -q
piece-surgery train "$work/base" --data "$here/data/code.jsonl" --mask "$work/mask.safetensors" \
  -o "$work/delta" --lr 1e-2 --epochs 3 --batch-size 2 -q
piece-surgery export "$work/delta" --to peft --base "$work/base" -o "$work/adapter"
python - "$work" <<'PY'
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

work = sys.argv[1]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{work}/base"), f"{work}/adapter")
print("PEFT loaded", type(model.base_model).__name__, "with", model.peft_config["default"].peft_type)
PY
piece-surgery import "$work/adapter" --base "$work/base" -o "$work/delta-again"
piece-surgery inspect "$work/delta-again" -q
echo "peft example done: $work/adapter is a SHiRA adapter; $work/delta-again is it as a delta again"
