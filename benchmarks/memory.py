"""Peak memory of `score` and `train` on SmolLM2-135M against the formulas in docs/distributed.md.

Each run is the CLI in a fresh process; its peak is the process's maximum resident set (getrusage of
the one child). The formulas: score = R + W + A + 8 E (piece-r, piece-s) or 4 E (piece-f);
train = R + W + A + 16 k. R (the runtime) is measured as a process that imports the library and
loads the tokenizer; W and E are counted; what is left of each peak is A, the activations, which
should not depend on the method (that checks the accumulator terms).

Run: python benchmarks/memory.py [--examples 16 --max-length 128]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from common import require_extras, smollm2_folder, stdlib_code_lines, table, write_jsonl

MB = 1e6


def peak_mb(*command: str) -> float:
    """Peak resident memory (MB) of `command`, run as the only child of a fresh process."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024 / MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    require_extras()
    folder = smollm2_folder("float32")
    cli = [sys.executable, "-m", "piece_surgery"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_jsonl(stdlib_code_lines(args.examples, min_chars=600), work / "code.jsonl")
        runtime = (
            "import piece_surgery.recipes.score, piece_surgery.recipes.train, transformers; "
            f"transformers.AutoTokenizer.from_pretrained({str(folder)!r})"
        )
        r = peak_mb(sys.executable, "-c", runtime)
        common = ["--data", str(data), "--max-length", str(args.max_length), "-q", "--overwrite"]
        peaks = {}
        for label, extra in (
            ("score --method piece-f", ["--method", "piece-f"]),
            ("score --method piece-s", ["--method", "piece-s"]),
            ("score --method piece-r --retain FILE", ["--method", "piece-r", "--retain", str(data)]),
            ("score (piece-r, --retain self: 64 texts)", []),
        ):
            mask = work / f"{len(peaks)}.safetensors"
            peaks[label] = peak_mb(*cli, "score", str(folder), "-o", str(mask), *common, *extra)
        mask = work / "1.safetensors"  # the piece-s mask
        info = json.loads(
            subprocess.run(
                [*cli, "inspect", str(mask), "--json"], check=True, capture_output=True, text=True
            ).stdout
        )
        train = [*cli, "train", str(folder), "--mask", str(mask), "-o", str(work / "delta"), *common]
        peaks["train --batch-size 4, 2 steps"] = peak_mb(*train, "--batch-size", "4", "--max-steps", "2")
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        sizes = {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}
    p = sum(sizes.values())
    e = sum(n for key, n in sizes.items() if "embed" not in key)
    k = info["entries"]
    w = 4 * p / MB
    rows = [{"run": "runtime R (imports + tokenizer)", "peak_MB": round(r)}]
    for label, peak in peaks.items():
        if label.startswith("train"):
            state, terms = 16 * k / MB, "16 k"
        else:
            state, terms = (4 if "piece-f" in label else 8) * e / MB, ("4 E" if "piece-f" in label else "8 E")
        rows.append(
            {
                "run": label,
                "peak_MB": round(peak),
                "R + W": round(r + w),
                "state": f"{terms} = {state:.0f}",
                "rest (activations)": round(peak - r - w - state),
            }
        )
    print(f"P = {p:,} parameters, W = {w:.0f} MB (fp32), E = {e:,} eligible, k = {k:,}")
    print(table(rows, ["run", "peak_MB", "R + W", "state", "rest (activations)"]))
    out = Path(__file__).parent / "results" / "memory.json"
    out.write_text(json.dumps({"P": p, "E": e, "k": k, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
