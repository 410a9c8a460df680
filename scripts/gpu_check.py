"""GPU check: score, train (bf16 weights; fp32 weights under bf16 autocast), apply, and a
2-process torchrun (NCCL) run on CUDA, each compared with the same run on the CPU, on tiny models.
Exits 1 on any mismatch, 0 when everything matches (or when there is no GPU: it says so).

Tolerances: masks must select the same entries (at most 1% may differ: GPU sums round in another
order, which can swap near-ties); trained values must match the CPU's within 1e-4 relative in fp32,
within 2 bf16 ulps for bf16 weights, and within 5e-2 under autocast; apply must be bit-exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

FAILURES: list[str] = []
# GPU_CHECK_DEVICE=cpu runs the "GPU" side on the CPU: to test this script itself on a machine
# without a GPU (every comparison then holds by construction)
GPU = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def cli(*args, env=None) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "piece_surgery", *map(str, args), "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if run.returncode:
        FAILURES.append(f"piece-surgery {' '.join(map(str, args))}: {run.stderr.strip()[-500:]}")


def torchrun(ranks: int, *args) -> None:
    from piece_surgery.models.tiny import local_torchrun

    run = subprocess.run(
        [*local_torchrun(ranks), "-m", "piece_surgery", *map(str, args), "-q"], capture_output=True, text=True
    )
    if run.returncode:
        FAILURES.append(f"torchrun piece-surgery {' '.join(map(str, args))}: {run.stderr.strip()[-800:]}")


def entries(path: Path) -> set:
    return {(n, int(i)) for n, t in load_file(path).items() if "::" not in n for i in t}


def same_mask(what: str, cpu: Path, gpu: Path) -> None:
    if not (cpu.exists() and gpu.exists()):
        return
    a, b = entries(cpu), entries(gpu)
    differing = len(a ^ b) / 2 / max(len(a), 1)
    print(f"{what}: {len(a)} entries, {differing:.2%} differ")
    if differing > 0.01:
        FAILURES.append(f"{what}: {differing:.2%} of the mask differs from the CPU's")


def close_values(what: str, cpu: Path, gpu: Path, dtype: torch.dtype, rtol: float, atol: float) -> None:
    if not ((cpu / "delta.safetensors").exists() and (gpu / "delta.safetensors").exists()):
        return
    a, b = load_file(cpu / "delta.safetensors"), load_file(gpu / "delta.safetensors")
    worst = 0.0
    for key in (k for k in a if k.endswith("::indices")):
        name = key[: -len("::indices")]
        if key not in b or not torch.equal(a[key], b[key]):
            FAILURES.append(f"{what}: '{name}' changes other entries than on the CPU")
            continue
        x, y = a[f"{name}::tuned"].view(dtype).float(), b[f"{name}::tuned"].view(dtype).float()
        worst = max(worst, float(((x - y).abs() / (atol + rtol * x.abs())).max()))
    print(f"{what}: worst difference {worst:.2f} of the tolerance")
    if worst > 1.0:
        FAILURES.append(f"{what}: trained values differ from the CPU's beyond the tolerance ({worst:.2f}x)")


def check_apply(dtype: str, base: Path, delta: Path, merged: Path) -> None:
    """The merged checkpoint (apply, on files) equals the delta applied to the model on the GPU."""
    import transformers
    from transformers import AutoModelForCausalLM

    from piece_surgery import apply_to_model, load_delta

    transformers.utils.logging.disable_progress_bar()
    cli("apply", base, delta, "-o", merged)
    if not merged.exists():
        return
    files = load_file(merged / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(GPU)
    apply_to_model(model, load_delta(delta))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    differ = [k for k in files if not torch.equal(files[k], state[k])]
    print(f"apply ({dtype}): {'bit-exact' if not differ else f'{len(differ)} tensors differ'}")
    if differ:
        FAILURES.append(f"apply ({dtype}): '{differ[0]}' differs between the files and the model on {GPU}")


def main() -> int:
    if GPU == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing was checked (SKIPPED)")
        return 0
    name = torch.cuda.get_device_name(0) if GPU == "cuda" else "the CPU (GPU_CHECK_DEVICE=cpu)"
    print(f"gpu_check on {name} ({torch.cuda.device_count()} GPU(s)), torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = work / "data.txt"
    data.write_text(
        "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}".replace("\n", " ") for i in range(24)) + "\n"
    )
    for dtype in ("float32", "bfloat16"):
        base = work / f"base-{dtype}"
        cli("tiny-model", base)
        if dtype == "bfloat16":  # a bf16 checkpoint: convert the tiny model's weights
            from safetensors.torch import save_file

            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(base / "model.safetensors").items()}
            save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        for side, device in (("cpu", "cpu"), ("gpu", GPU)):
            cli(
                "score",
                base,
                "--data",
                data,
                "-o",
                work / f"mask-{dtype}-{side}.safetensors",
                "--density",
                "0.05",
                "--retain",  # not self: its text is drawn by each device's own random generator
                data,
                "--device",
                device,
                "--dtype",
                "float32",
            )
        same_mask(
            f"score ({dtype} checkpoint, fp32 compute)",
            work / f"mask-{dtype}-cpu.safetensors",
            work / f"mask-{dtype}-gpu.safetensors",
        )
        mask = work / f"mask-{dtype}-cpu.safetensors"
        for side, device in (("cpu", "cpu"), ("gpu", GPU)):
            cli(
                "train",
                base,
                "--data",
                data,
                "--mask",
                mask,
                "-o",
                work / f"delta-{dtype}-{side}",
                "--lr",
                "1e-3",
                "--max-steps",
                "4",
                "--batch-size",
                "2",
                "--device",
                device,
            )
        if dtype == "bfloat16":
            close_values(
                "train, bf16 weights",
                work / "delta-bfloat16-cpu",
                work / "delta-bfloat16-gpu",
                torch.bfloat16,
                2**-7,
                1e-6,
            )
        else:  # fp32 weights on a bf16 GPU run under bf16 autocast
            close_values(
                "train, fp32 weights under bf16 autocast",
                work / "delta-float32-cpu",
                work / "delta-float32-gpu",
                torch.float32,
                5e-2,
                1e-3,
            )
        check_apply(dtype, base, work / f"delta-{dtype}-gpu", work / f"merged-{dtype}")
    base = work / "base-float32"
    if torch.cuda.device_count() >= 2:
        torchrun(
            2,
            "score",
            base,
            "--data",
            data,
            "-o",
            work / "mask-nccl.safetensors",
            "--density",
            "0.05",
            "--retain",  # not self: its text is drawn by each device's own random generator
            data,
            "--dtype",
            "float32",
        )
        same_mask(
            "score, 2 ranks (NCCL)", work / "mask-float32-cpu.safetensors", work / "mask-nccl.safetensors"
        )
        mask = work / "mask-float32-cpu.safetensors"
        torchrun(
            2,
            "train",
            base,
            "--data",
            data,
            "--mask",
            mask,
            "-o",
            work / "delta-nccl",
            "--lr",
            "1e-3",
            "--max-steps",
            "4",
            "--batch-size",
            "1",
            "--dtype",
            "float32",
        )
        cli(
            "train",
            base,
            "--data",
            data,
            "--mask",
            mask,
            "-o",
            work / "delta-cpu-accum",
            "--lr",
            "1e-3",
            "--max-steps",
            "4",
            "--batch-size",
            "1",
            "--grad-accum",
            "2",
            "--device",
            "cpu",
        )
        close_values(
            "train, 2 ranks (NCCL, autocast)",
            work / "delta-cpu-accum",
            work / "delta-nccl",
            torch.float32,
            5e-2,
            1e-3,
        )
    else:
        print(f"torchrun with NCCL: needs 2 GPUs, this machine has {torch.cuda.device_count()} (SKIPPED)")
    print(json.dumps({"failures": FAILURES}, indent=2))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
