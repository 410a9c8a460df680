"""What measuring N deltas costs: `eval` with the deltas switched in on one loaded base, against the
way without it, merging each delta into a folder (`apply`) and measuring the merged checkpoints
against the base. SmolLM2-135M, N = 1 and 4 deltas (0.1% of the entries each), a domain set and a
general set; every run in a fresh process (wall time and peak RSS).

Run: python benchmarks/eval_speed.py [--deltas 1 4 --dtype float32 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import (
    measure,
    require_extras,
    smollm2_folder,
    stdlib_code_lines,
    table,
    wiki_records,
    write_jsonl,
)

RESULTS = Path(__file__).parent / "results" / "eval_speed.json"


def _nudged_delta(folder: Path, out: Path, seed: int) -> None:
    """A random 0.1% of the entries, each moved by +-1%: a trained delta's size and spread."""
    import torch

    from piece_surgery.formats.delta import DeltaInfo, delta_from_values
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.recipes.score import score_checkpoint
    from piece_surgery.runtime.options import RunOptions
    from piece_surgery.scoring.options import ScoreOptions

    options = ScoreOptions(method="random", seed=seed)
    mask = score_checkpoint(str(folder), None, options, run=RunOptions(device="cpu")).mask
    checkpoint = open_checkpoint(str(folder))
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    with checkpoint.reader() as reader:
        for name, idx in mask.indices.items():
            base = reader.get(name).reshape(-1)[idx].clone()
            factor = 1 + 0.01 * torch.sign(torch.randn(idx.numel(), generator=gen))
            entries[name] = (idx, base, (base.double() * factor).to(base.dtype))
    save_delta(delta_from_values(entries, mask.shapes, DeltaInfo(checkpoint.identity)), out)


def _evaluate(base: str, candidates: list[str], data: str, general: str, threads: int) -> dict:
    import torch

    from piece_surgery.evaluation.options import EvalOptions
    from piece_surgery.recipes.evaluate import evaluate_candidates
    from piece_surgery.runtime.options import RunOptions

    torch.set_num_threads(threads)
    result = evaluate_candidates(
        base,
        candidates,
        RunOptions(device="cpu", max_length=128, quiet=True),
        data=Path(data),
        general=[Path(general)],
        options=EvalOptions(batch_size=4),
    )
    return {"drift": [c.general[Path(general).name].kl for c in result.candidates]}


def _merge(base: str, delta: str, out: str, threads: int) -> dict:
    import torch

    from piece_surgery.recipes.apply import apply

    torch.set_num_threads(threads)
    apply(base, [delta], Path(out))
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deltas", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    require_extras()
    folder = smollm2_folder(args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_jsonl(stdlib_code_lines(32, min_chars=600), work / "code.jsonl")
        biology = wiki_records("Biology and health sciences")
        prose = [r["extract"] for r in biology if len(r.get("extract", "")) > 300][:32]
        general = write_jsonl(prose, work / "general.jsonl")
        deltas = [work / f"delta-{i}" for i in range(max(args.deltas))]
        for i, d in enumerate(deltas):
            _nudged_delta(folder, d, seed=i)
        for n in args.deltas:
            chosen = [str(d) for d in deltas[:n]]
            switched = measure(_evaluate, str(folder), chosen, str(data), str(general), args.threads)
            merge_seconds = 0.0
            merged = []
            for d in chosen:
                out = work / f"merged-{Path(d).name}"
                merge_seconds += measure(_merge, str(folder), d, str(out), args.threads)["seconds"]
                merged.append(str(out))
            folders = measure(_evaluate, str(folder), merged, str(data), str(general), args.threads)
            assert folders["drift"] == switched["drift"], (folders["drift"], switched["drift"])
            for m in merged:
                import shutil

                shutil.rmtree(m)
            rows.append(
                {
                    "deltas": n,
                    "eval, switched (s)": switched["seconds"],
                    "merge each (s)": merge_seconds,
                    "eval merged folders (s)": folders["seconds"],
                    "speedup": (merge_seconds + folders["seconds"]) / switched["seconds"],
                    "peak MB, switched": switched["peak_rss_mb"],
                    "peak MB, folders": folders["peak_rss_mb"],
                    "memory ratio": folders["peak_rss_mb"] / switched["peak_rss_mb"],
                }
            )
    print(table(rows, list(rows[0])))
    RESULTS.write_text(
        json.dumps({"dtype": args.dtype, "threads": args.threads, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
