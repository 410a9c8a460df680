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


# token ids a tiny model reads: the probe of logits in the PEFT comparisons
IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3]])


def peft_adapter(base, out, *, modules_to_save, targets=("q_proj", "v_proj"), arch="qwen2"):
    """A LoRA adapter (with trained modules_to_save) as PEFT saves it, and the logits of its merge."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base)
        targets = ["c_attn"] if arch == "gpt2" else list(targets)
        adapted = get_peft_model(
            model, LoraConfig(r=2, target_modules=targets, modules_to_save=modules_to_save)
        )
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in adapted.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        adapted.save_pretrained(out)
        merged = adapted.merge_and_unload().eval()
        with torch.no_grad():
            return merged(input_ids=IDS).logits


def brute_force_scores(folder, data, method, batch_size):
    """Per-micro-batch gradients with torch.autograd.grad and explicit padding/masking."""
    from piece_surgery.data.dataset import load_dataset, load_tokenizer
    from piece_surgery.models.eligible import eligible_parameters
    from piece_surgery.models.layout import read_layout
    from piece_surgery.models.loading import load_causal_lm
    from piece_surgery.models.pairing import parameter_keys

    tokenizer = load_tokenizer(folder)
    dataset = load_dataset(data, tokenizer, max_length=512)
    model = load_causal_lm(folder, dtype=torch.float32, device=torch.device("cpu")).eval()
    keys = parameter_keys(model, read_layout(folder))
    params = eligible_parameters(model, keys)
    names = list(params)
    g1 = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    g2 = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    examples = dataset.examples
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        total_loss, total_tokens = 0.0, 0
        for e in group:  # the micro-batch loss is the mean over all its loss-bearing tokens
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(e.labels[1:])
            keep = targets != -100
            total_loss = total_loss + torch.nn.functional.cross_entropy(
                logits[keep], targets[keep], reduction="sum"
            )
            total_tokens += int(keep.sum())
        grads = torch.autograd.grad(total_loss / total_tokens, [params[n] for n in names])
        for n, g in zip(names, grads, strict=True):
            g1[n] += g.float()
            g2[n] += g.float() ** 2
    if method == "piece-f":
        return g2
    if method == "gradient":
        return {n: g1[n].abs() for n in names}
    if method == "piece-s-rel":
        mean_g2 = sum(g2[n].double().sum() for n in names) / sum(g2[n].numel() for n in names)
        return {n: g1[n].abs() / torch.sqrt(g2[n] + float(mean_g2)) for n in names}
    return {n: g1[n].abs() / torch.sqrt(g2[n] + 1) for n in names}
