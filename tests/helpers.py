"""Helpers for delta tests: make 'tuned' checkpoints by changing a few entries of a base."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def perturb(base: Path, out: Path, *, fraction=0.02, seed=0, names=None, hard=True) -> Path:
    """Copy `base` to `out` and change a random `fraction` of the entries of some tensors.

    With hard=True, some changes flip signs or land on tiny values, where base + (tuned - base) in
    floating point would not give the tuned value back.
    """
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    for file in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        tensors = load_file(file)
        for name, t in tensors.items():
            if names is not None and not any(n in name for n in names):
                continue
            flat = t.view(-1)
            n = max(1, int(fraction * flat.numel()))
            idx = torch.randperm(flat.numel(), generator=gen)[:n]
            change = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
            new = flat[idx].double() + change
            if hard and n >= 4:
                new[0] = -flat[idx[0]].double() * 1e-7  # crosses zero, lands near it
                new[1] = 3e-8
                new[2] = flat[idx[2]].double() * 1e6
            flat[idx] = new.to(t.dtype)
        save_file(tensors, file, metadata=meta)
    return Path(out)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


def moved_by_brute_force(stored: dict, indices: dict, values: dict, dtype: torch.dtype) -> dict:
    """(tensor, flat index) -> the tuned value a delta must record, one entry at a time: an entry
    moved where the trained value and the stored one, each rounded alone to `dtype`, differ."""
    moved = {}
    for name, idx in indices.items():
        flat = stored[name].reshape(-1)
        for j, i in enumerate(idx.tolist()):
            trained, base = values[name][j], flat[i]
            if float(trained.to(dtype)) != float(base.to(dtype)):
                moved[(name, i)] = float(trained.to(flat.dtype))
    return moved


def delta_entries(delta) -> dict:
    """(tensor, flat index) -> the tuned value, of every entry a delta changes."""
    return {
        (name, int(i)): float(t)
        for name, td in delta.tensors.items()
        for i, t in zip(td.indices, td.tuned, strict=True)
    }


def same_checkpoint(a: Path, b: Path) -> bool:
    ta, tb = read_all(a), read_all(b)
    return ta.keys() == tb.keys() and all(bitwise_equal(ta[k], tb[k]) for k in ta)


def snapshot(*paths: Path) -> dict[str, bytes]:
    """The bytes of every file at or under `paths`, by path: compare before and after a command."""
    files = []
    for path in map(Path, paths):
        files.extend([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))
    return {str(p): p.read_bytes() for p in files}


def assert_clean_failure(result, fragment: str = "", *, output: Path | None = None, unchanged=None) -> str:
    """A user error: exit code 2, no traceback, one line on stderr starting with `error:` (and
    containing `fragment`); nothing at `output`, not even a hidden temporary beside it; and, with
    `unchanged=(snapshot_before, paths)`, the inputs byte for byte as they were. Returns the line."""
    code, _, stderr = result
    # what a terminal shows: a progress bar redraws its line with \r, so keep each line's last part
    lines = [line.split("\r")[-1] for line in stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert fragment in lines[0], lines[0]
    if output is not None:
        output = Path(output)
        assert not output.exists(), f"{output} was written"
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    if unchanged is not None:
        before, paths = unchanged
        assert snapshot(*paths) == before, "an input changed"
    return lines[0]


def brute_force_top_k(scores, k):
    """Sort every entry by (-score, tensor name, flat index) and keep the first k."""
    entries = []
    for name in sorted(scores):
        for i, value in enumerate(scores[name].flatten().tolist()):
            entries.append((-value, name, i))
    entries.sort()
    chosen = {}
    for _, name, i in entries[:k]:
        chosen.setdefault(name, []).append(i)
    return {n: sorted(v) for n, v in chosen.items()}


def as_lists(indices):
    return {n: i.tolist() for n, i in indices.items()}


def run_launcher(command: list[str], *, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run for a launcher (torchrun): on a timeout its whole process group is killed,
    so no rank it started is left running (subprocess.run kills only the launcher itself)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout} s)"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def image_chat(path: str) -> dict:
    """A one-turn chat about the image at `path` (relative to the data file), answered."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A pattern."}]},
        ]
    }
