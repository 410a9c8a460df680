"""`inspect`: summaries of masks and deltas, whichever the path holds."""

from __future__ import annotations

from piece_surgery.errors import PieceError
from piece_surgery.hub import resolve


def describe(ref: str) -> dict:
    source = resolve(ref, what="mask or delta", patterns=["*.safetensors", "*.json", "*.md"])
    path = source.path
    if path.is_file() and path.suffix == ".safetensors":
        from piece_surgery.mask import load_mask, mask_summary

        mask = load_mask(path)
        summary = mask_summary(mask)
        summary["headline"] = [
            f"mask {ref}: {mask.k:,} of {mask.eligible:,} eligible entries "
            f"({summary['method']}, density {summary['density']})",
            f"{summary['tensors_touched']} tensors touched; norm weights hold {summary['norm_share']:.1%}",
            f"size on disk {path.stat().st_size:,} bytes",
        ]
        return summary
    if path.is_dir() and (path / "delta.json").is_file():
        from piece_surgery.delta import delta_summary, load_delta

        delta = load_delta(path)
        summary = delta_summary(delta)
        summary["headline"] = [
            f"delta {ref}: {summary['selected']:,} changed entries in {summary['tensors_touched']} tensors",
            f"{summary['tensor_bytes']:,} bytes of tensor data, "
            f"{summary['bytes_per_entry']:.2f} bytes per changed entry",
        ]
        return summary
    if path.is_dir() and (path / "mask.safetensors").is_file():
        return describe(str(path / "mask.safetensors"))
    raise PieceError(f"'{ref}' is neither a mask (.safetensors) nor a delta folder (with delta.json)")
