"""apply vs a plain safetensors read+write of the same base vs transformers load+save.

Targets (issues 3 and 25): on a multi-GB checkpoint (generated: a random bf16 Llama of 24 layers x
2560, 3.85 GiB in 6 shards), apply at most 1.0x a plain safetensors read+write for a delta spread
uniformly over every tensor, and at most 0.7x for one whose entries cluster in runs as importance
masks' do; `cp -r` of the folder is the floor; median of --repeats fresh processes each, files in the
page cache, dirty pages flushed before each run; peak RSS about two shards plus the deltas.
Run: python benchmarks/apply_speed.py [--big-layers 24] [--multi-gb-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import measure, require_extras, smollm2_folder, stdlib_code_lines, table, write_jsonl

from piece_surgery.runtime.options import RunOptions

RESULTS = Path(__file__).parent / "results" / "apply_speed.json"


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
    from piece_surgery.recipes.apply import apply

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

    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.merging.diff import diff

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
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.scoring.options import ScoreOptions

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


def _command(argv: list[str]) -> dict:
    """Run a command in a fresh process: its wall time and its peak RSS (the largest child's)."""
    import resource
    import subprocess

    start = time.perf_counter()
    subprocess.run(argv, check=True)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "child_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


# plain_copy as a standalone script: importing this module would add piece_surgery's imports to
# the plain copy's time
_PLAIN = """
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
base, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
for item in base.iterdir():
    if item.name.endswith(".safetensors"):
        save_file(load_file(item), out / item.name, metadata={"format": "pt"})
    else:
        shutil.copy2(item, out / item.name)
"""


def copy_tree(base: Path, out: Path) -> dict:
    """`cp -r`: the kernel's copy of every byte, the floor for any tool that writes a new folder."""
    return _command(["cp", "-r", str(base), str(out)])


def imports_only(out: Path) -> dict:
    """What a fresh Python process pays before any byte: starting and importing torch, safetensors."""
    return _command([sys.executable, "-c", "import torch, safetensors.torch"])


def plain_copy_command(base: Path, out: Path) -> dict:
    """plain_copy as a command: a fresh process, imports included, as apply's are."""
    return _command([sys.executable, "-c", _PLAIN, str(base), str(out)])


def piece_apply_command(base: Path, deltas: list[Path], out: Path) -> dict:
    """`piece-surgery apply` as a user runs it: a fresh process, imports included."""
    argv = [sys.executable, "-m", "piece_surgery", "apply", str(base), *map(str, deltas)]
    return _command([*argv, "-o", str(out), "-q"])


def big_llama(work: Path) -> Path:
    """A random bf16 Llama, 24 layers x 2560 (intermediate 6912, vocab 32000, untied): 3.85 GiB in
    6 shards, written tensor by tensor (no model is built)."""
    import json as _json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = work / "big-llama"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2560,
        intermediate_size=6912,
        num_hidden_layers=24,
        num_attention_heads=20,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).state_dict().items()]
    total = sum(math.prod(shape) * 2 for _, shape in shapes)
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        if shards[-1] and size + math.prod(shape) * 2 > total / 5:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += math.prod(shape) * 2
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(_json.dumps(index))
    return folder


def direct_delta(base: Path, out: Path, kind: str, seed: int = 0) -> Path:
    """0.1% of every tensor's entries moved by 0.01, built from the base's values directly (no
    tuned copy): `uniform` spreads them at random, the worst case for apply; `clustered` puts them
    in runs of 64 consecutive entries (row segments), where importance masks put theirs."""
    import torch

    from piece_surgery.formats.delta import DeltaInfo, delta_from_values
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.models.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(str(base))
    gen = torch.Generator().manual_seed(seed)
    entries, shapes = {}, {}
    with checkpoint.reader() as reader:
        for name, info in checkpoint.layout.items():
            flat = reader.get(name).reshape(-1)
            n, k = flat.numel(), max(1, flat.numel() // 1000)
            if kind == "uniform":
                idx = torch.unique(torch.randint(0, n, (k,), generator=gen))
            else:
                starts = torch.randint(0, max(1, n - 64), (max(1, k // 64),), generator=gen)
                idx = torch.unique((starts[:, None] + torch.arange(64)).reshape(-1).clamp(max=n - 1))
            values = flat[idx].clone()
            entries[name] = (idx, values, (values.float() + 0.01).to(values.dtype))
            shapes[name] = tuple(info.shape)
    save_delta(delta_from_values(entries, shapes, DeltaInfo(checkpoint.identity)), out)
    return out


def multi_gb(work: Path, repeats: int) -> list[dict]:
    """Issue 25's case: medians of `repeats` fresh runs each, interleaved, on a 3.85 GiB base."""
    import statistics

    base = big_llama(work)
    uniform = [direct_delta(base, work / f"uniform-{i}", "uniform", seed=i) for i in range(4)]
    clustered = direct_delta(base, work / "clustered", "clustered")
    for file in base.glob("*.safetensors"):  # into the page cache, as for every run after the first
        file.read_bytes()
    out = work / "out"
    runs = [
        ("cp -r of the folder", copy_tree, (base, out)),
        ("python importing torch and safetensors only", imports_only, (out,)),
        ("plain safetensors read+write", plain_copy_command, (base, out)),
        (
            "apply, clustered 0.1% (runs of 64)",
            piece_apply_command,
            (base, [clustered], out),
        ),
        ("apply, 0.1% of every tensor (uniform)", piece_apply_command, (base, uniform[:1], out)),
        ("apply, 4 uniform deltas stacked", piece_apply_command, (base, uniform, out)),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for label, fn, args in runs:
            os.sync()
            result = measure(fn, *args)
            times[label].append(result["seconds"])
            peaks[label] = max(peaks.get(label, 0.0), result["child_peak_mb"])
            shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    plain = statistics.median(times["plain safetensors read+write"])
    rows = []
    for label, _, _ in runs:
        median = statistics.median(times[label])
        rows.append(
            {
                "model": f"random Llama 24x2560 bf16, {size / 2**30:.2f} GiB",
                "run": label,
                "median_s": median,
                "min_s": min(times[label]),
                "max_s": max(times[label]),
                "vs_plain": median / plain,
                "peak_rss_mb": peaks[label],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big-layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--multi-gb-repeats", type=int, default=5)
    parser.add_argument("--multi-gb-only", action="store_true", help="only the 3.85 GiB case")
    args = parser.parse_args()
    require_extras()
    with tempfile.TemporaryDirectory(dir=os.environ.get("PIECE_BENCH_TMP")) as tmp:
        big = multi_gb(Path(tmp), args.multi_gb_repeats)
    columns = ["model", "run", "median_s", "min_s", "max_s", "vs_plain", "peak_rss_mb"]
    print(table(big, columns))
    RESULTS.write_text(json.dumps({"multi_gb": big}, indent=1) + "\n")
    if args.multi_gb_only:
        return
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
