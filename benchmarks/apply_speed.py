"""apply vs a plain safetensors read+write of the same base vs transformers load+save.

Targets (issue 3): apply time at most 1.25x the plain copy; peak RSS about two shards plus the
deltas, not the whole model.  Run: python benchmarks/apply_speed.py [--big-layers 24]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import measure, require_extras, smollm2_folder, stdlib_code_lines, table, write_jsonl

from piece_surgery.options import RunOptions


def plain_copy(base: Path, out: Path) -> dict:
    """Read every shard with safetensors and write it back: the floor for any merge."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()  # imports excluded from every timing
    out.mkdir()
    for item in base.iterdir():
        if item.name.endswith(".safetensors"):
            save_file(load_file(item), out / item.name, metadata={"format": "pt"})
        else:
            shutil.copy2(item, out / item.name)
    return {"seconds": time.perf_counter() - start}


def piece_apply(base: Path, delta: Path, out: Path) -> dict:
    from piece_surgery.merge import apply

    start = time.perf_counter()
    result = apply(str(base), [str(delta)], out, overwrite=True)
    return {"seconds": time.perf_counter() - start, "entries": sum(result.touched.values())}


def transformers_roundtrip(base: Path, out: Path) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    model.save_pretrained(out)
    return {"seconds": time.perf_counter() - start}


def nudged_delta(base: Path, work: Path, label: str, entries) -> Path:
    """Copy `base`, add 0.01 to the entries `entries(name, flat_tensor)` picks (indices or None)
    in each tensor, and diff: a delta whose entries fall where the picker puts them."""
    import torch
    from safetensors.torch import load_file, save_file

    from piece_surgery.delta import diff, save_delta

    tuned = work / f"tuned-{label}"
    shutil.copytree(base, tuned)
    for file in sorted(tuned.glob("*.safetensors")):
        tensors = load_file(file)
        for name, t in tensors.items():
            idx = entries(name, t.view(-1))
            if idx is not None:
                flat = t.view(-1)
                flat[idx] = (flat[idx].to(torch.float32) + 0.01).to(t.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    delta = work / label
    save_delta(diff(str(base), str(tuned)), delta)
    shutil.rmtree(tuned)
    return delta


def make_delta(base: Path, work: Path, fraction: float = 0.001) -> Path:
    """Change `fraction` of the entries of every tensor, spread uniformly: the worst case for apply."""
    import torch

    gen = torch.Generator().manual_seed(0)

    def uniform(name, flat):
        return torch.randint(0, flat.numel(), (max(1, int(fraction * flat.numel())),), generator=gen)

    return nudged_delta(base, work, "delta", uniform)


def make_piece_delta(base: Path, work: Path) -> Path:
    """A delta on the entries a PIECE-S 0.1% mask selects on the model itself (code data): where a
    trained delta's entries really fall, unlike make_delta's uniform spread."""
    from piece_surgery.score import ScoreOptions, score_checkpoint

    data = write_jsonl(stdlib_code_lines(16, min_chars=600), work / "code.jsonl")
    options = ScoreOptions(method="piece-s", density=0.001)
    mask, _, _ = score_checkpoint(str(base), data, options, run=RunOptions(max_length=128, device="cpu"))
    return nudged_delta(base, work, "delta-piece", lambda name, flat: mask.indices.get(name))


def big_random(work: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    folder = work / "big"
    model.save_pretrained(folder, max_shard_size="300MB")
    return folder


def run(name: str, base: Path, work: Path, repeats: int, piece_delta: bool = False) -> list[dict]:
    """Each run `repeats` times, interleaved, flushing dirty pages first (a writer that follows
    another would otherwise be throttled by the kernel for the other's writes); best time kept."""
    work.mkdir(exist_ok=True)
    delta = make_delta(base, work)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    runs = [
        ("plain safetensors read+write", plain_copy, (base, work / "copy")),
        ("piece-surgery apply, 0.1% of every tensor (uniform)", piece_apply, (base, delta, work / "merged")),
        ("transformers load+save_pretrained", transformers_roundtrip, (base, work / "hf")),
    ]
    if piece_delta:
        runs.insert(
            2,
            (
                "piece-surgery apply, PIECE-S 0.1% entries",
                piece_apply,
                (base, make_piece_delta(base, work), work / "merged-piece"),
            ),
        )
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for label, fn, args in runs:
            os.sync()
            result = measure(fn, *args)
            if label not in best or result["seconds"] < best[label]["seconds"]:
                best[label] = result
            shutil.rmtree(args[-1], ignore_errors=True)
    rows = [{"model": name, "run": label, **best[label]} for label, _, _ in runs]
    for row in rows:
        row["time_ratio"] = row["seconds"] / rows[0]["seconds"]
        row["model_mb"] = size / 2**20
        row["shards"] = shards
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big-layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    require_extras()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += run("SmolLM2-135M bf16", smollm2_folder("bfloat16"), work / "small", args.repeats, True)
        (work / "bigwork").mkdir()
        rows += run(
            f"random Llama {args.big_layers}x1024 bf16",
            big_random(work / "bigwork", args.big_layers),
            work / "bigwork",
            args.repeats,
        )
    print(table(rows, ["model", "run", "model_mb", "shards", "seconds", "time_ratio", "peak_rss_mb"]))


if __name__ == "__main__":
    main()
