"""Serving several domains from one base: switching deltas with DeltaSwitcher against PEFT's LoRA
adapters of about the same trainable count, on SmolLM2-135M; and what a delta costs on disk and in
memory (format 1, compact format 2, a SHiRA export).

- ms per swap: DeltaSwitcher.activate between two resident deltas (PIECE-S 0.1% masks of two
  domains); PEFT set_adapter between two LoRA r=2 q,v adapters (nothing is written: the adapter
  runs beside the weights in every forward); PEFT merge_adapter/unmerge_adapter (LoRA merged in);
- forward time with the delta or adapter active (batch 4 x 128), against the bare base;
- memory per resident delta or adapter; bytes per entry on disk.

Run: python benchmarks/swap_speed.py [--swaps 50 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import require_extras, smollm2_folder, stdlib_code_lines, table, wiki_records, write_jsonl

from piece_surgery.runtime.options import RunOptions


def _delta_on_mask(folder: Path, data: Path, work: Path, label: str, dtype: str) -> Path:
    """A PIECE-S 0.1% mask scored on `data`, its entries nudged by +-1% (a trained delta's shape)."""
    import torch

    from piece_surgery.formats.delta import DeltaInfo, delta_from_values
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.scoring.options import ScoreOptions

    options = ScoreOptions(method="piece-s")  # where trained entries fall; swap time depends on k
    mask = score_checkpoint(str(folder), data, options, run=RunOptions(max_length=128, device="cpu")).mask
    checkpoint = open_checkpoint(str(folder))
    gen = torch.Generator().manual_seed(len(label))
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in mask.indices.items():
            base = reader.get(name).reshape(-1)[idx].clone()
            factor = 1 + 0.01 * torch.sign(torch.randn(idx.numel(), generator=gen))
            entries[name] = (idx, base, (base.double() * factor).to(base.dtype))
    delta = delta_from_values(entries, mask.shapes, DeltaInfo(checkpoint.identity))
    save_delta(delta, work / label)
    save_delta(delta, work / f"{label}-compact", format_version=2)
    return work / label


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from piece_surgery.formats.delta_folder import load_delta
    from piece_surgery.merging.switcher import DeltaSwitcher

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    require_extras()
    torch.manual_seed(0)
    folder = smollm2_folder(args.dtype)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        code = write_jsonl(stdlib_code_lines(16, min_chars=600), work / "code.jsonl")
        math_text = [r["extract"] for r in wiki_records("Mathematics") if len(r.get("extract", "")) > 300][
            :16
        ]
        maths = write_jsonl(math_text, work / "math.jsonl")
        deltas = {"code": _delta_on_mask(folder, code, work, "code", args.dtype)}
        deltas["math"] = _delta_on_mask(folder, maths, work, "math", args.dtype)
        sizes = {}
        for path in deltas.values():
            for variant in (path, Path(f"{path}-compact")):
                info = json.loads((variant / "delta.json").read_text())
                sizes[variant.name] = info["tensor_bytes"] / info["count"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids}

        def forward():
            with torch.no_grad():
                model(**batch, use_cache=False)

        rows = [{"run": "base model, no delta", "forward_ms": statistics.median(_timed(forward, 5))}]
        switcher = DeltaSwitcher(model)
        loaded = {name: load_delta(path) for name, path in deltas.items()}
        for name, delta in loaded.items():
            switcher.add(name, delta)
        order = ["code", "math"] * (args.swaps // 2)
        swaps = _timed(lambda: switcher.activate(order.pop()), args.swaps - 1)
        switcher.activate("code")
        rows.append(
            {
                "run": "DeltaSwitcher.activate (PIECE-S 0.1% deltas)",
                "trainable": loaded["code"].count,
                "swap_ms": statistics.median(swaps),
                "resident_MB": switcher.resident_bytes("code") / 2**20,
                "forward_ms": statistics.median(_timed(forward, 5)),
            }
        )
        switcher.activate(None)
        lora = get_peft_model(
            model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        lora.add_adapter(
            "math",
            LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        trainable = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and ".default." in n)
        lora_bytes = sum(
            p.numel() * p.element_size()
            for n, p in lora.named_parameters()
            if "lora_" in n and ".default." in n
        )
        names = ["default", "math"] * (args.swaps // 2)
        set_times = _timed(lambda: lora.set_adapter(names.pop()), args.swaps - 1)
        lora.set_adapter("default")

        def lora_forward():
            with torch.no_grad():
                lora(**batch, use_cache=False)

        rows.append(
            {
                "run": "PEFT LoRA r=2 q,v set_adapter (unmerged)",
                "trainable": trainable,
                "swap_ms": statistics.median(set_times),
                "resident_MB": lora_bytes / 2**20,
                "forward_ms": statistics.median(_timed(lora_forward, 5)),
            }
        )
        current = ["default"]

        def merge_swap():
            lora.unmerge_adapter()
            current[0] = "math" if current[0] == "default" else "default"
            lora.set_adapter(current[0])
            lora.merge_adapter()

        lora.merge_adapter()
        merge_times = _timed(merge_swap, args.swaps - 1)
        rows.append(
            {
                "run": "PEFT LoRA r=2 q,v unmerge + merge",
                "trainable": trainable,
                "swap_ms": statistics.median(merge_times),
                "resident_MB": lora_bytes / 2**20,
                "forward_ms": statistics.median(_timed(lora_forward, 5)),
            }
        )
        from piece_surgery.recipes.export import export_peft

        exported = export_peft(str(deltas["code"]), work / "adapter", base_ref=str(folder))
        sizes["code as a SHiRA adapter"] = exported.adapter_bytes / exported.entries
        shira = {
            "r": exported.r,
            "padding_entries": exported.padding,
            "entries": exported.entries,
            "linear_layers_in_shira": exported.linear_layers,
            "modules_saved_whole": len(exported.saved_modules),
            "adapter_MB": exported.adapter_bytes / 1e6,
        }
    print(f"SmolLM2-135M {args.dtype}, CPU, median of {args.swaps - 1} swaps, forward batch 4 x 128")
    print(table(rows, ["run", "trainable", "swap_ms", "resident_MB", "forward_ms"]))
    print("bytes of tensor data per entry on disk:", json.dumps({k: round(v, 2) for k, v in sizes.items()}))
    print("SHiRA export:", json.dumps(shira))


if __name__ == "__main__":
    main()
