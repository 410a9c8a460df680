"""Peak memory of `score` on a vision-language model against the formula in docs/distributed.md.

A random LLaVA at the sizes users meet at the small end: SmolLM2-135M's language model (30 layers x
576) and a CLIP ViT-B/32 vision tower (12 layers x 768, 224-pixel images), fp32, with SmolLM2's
tokenizer plus an `<image>` token and a LLaVA processor; image chats with generated 224x224 PNGs.
The claim checked: scoring keeps accumulators for the eligible entries only (the language model
without its embeddings, and the projector), not for the vision tower, so the two-accumulator
methods (piece-s) peak 4 E bytes above the one-accumulator method (piece-f), with E the eligible
entries, and not 4 (E + V) with V the vision tower's entries.

Run: python benchmarks/vlm_memory.py [--examples 8]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from common import require_extras, smollm2_folder
from memory import peak_mb

MB = 1e6


def build(folder: Path) -> Path:
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from piece_surgery.models.tiny import vision_language_chat_template

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder("float32"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = vision_language_chat_template("<image>")
    text = LlamaConfig.from_pretrained(smollm2_folder("float32")).to_dict()
    text["vocab_size"] = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=49,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text.get("tie_word_embeddings", True),
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    processor = LlavaProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        patch_size=32,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(folder)
    return folder


def image_chats(work: Path, n: int) -> Path:
    from piece_surgery.models.tiny import write_png

    lines = []
    for i in range(n):
        write_png(work / "img" / f"{i}.png", 224, 224, seed=i)
        chat = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": f"img/{i}.png"},
                    {"type": "text", "text": "Describe it."},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": f"Noise pattern {i}, in many colours."}],
            },
        ]
        lines.append(json.dumps({"messages": chat}))
    data = work / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=8)
    args = parser.parse_args()
    require_extras()
    cli = [sys.executable, "-m", "piece_surgery"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = build(work / "llava")
        data = image_chats(work, args.examples)
        common = ["--data", str(data), "--batch-size", "1", "-q", "--overwrite"]
        peaks, masks = {}, {}
        for method in ("piece-f", "piece-s"):
            masks[method] = work / f"{method}.safetensors"
            peaks[method] = peak_mb(
                *cli, "score", str(folder), "-o", str(masks[method]), "--method", method, *common
            )
        inspect = [*cli, "inspect", str(masks["piece-s"]), "--json"]
        info = json.loads(subprocess.run(inspect, check=True, capture_output=True, text=True).stdout)
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            sizes = {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}
    from piece_surgery.models.parts import VISION, part_of

    e = info["eligible"]
    v = sum(n for key, n in sizes.items() if part_of(key) == VISION)
    difference = peaks["piece-s"] - peaks["piece-f"]
    result = {
        "parameters": sum(sizes.values()),
        "eligible_E": e,
        "vision_tower_V": v,
        "peak_MB": {m: round(p) for m, p in peaks.items()},
        "piece_s_minus_piece_f_MB": round(difference),
        "formula_4E_MB": round(4 * e / MB),
        "if_the_tower_counted_4(E+V)_MB": round(4 * (e + v) / MB),
        "by_part_of_the_mask": info["by_part"],
    }
    print(json.dumps(result, indent=1))
    (Path(__file__).parent / "results" / "vlm_memory.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
