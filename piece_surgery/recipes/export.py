"""The `export --to peft` recipe: a delta as a SHiRA adapter folder that stock PEFT loads onto its
base with PeftModel.from_pretrained (merging/shira.py lays it out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from piece_surgery.formats.artifacts import open_artifact
from piece_surgery.formats.peft import peft_library, quiet_libraries
from piece_surgery.io.outputs import atomic_path, check_output, refuse_overlap
from piece_surgery.io.sniff import ADAPTER, ADAPTER_WEIGHTS
from piece_surgery.merging.shira import fill_shira, shira_plan
from piece_surgery.recipes.run import check_dtype_choice, load_base
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions


@dataclass(frozen=True)
class Exported:
    entries: int  # the delta's entries
    padding: int  # entries SHiRA's one-r-for-all layout adds, changing nothing
    r: int
    linear_layers: int
    saved_modules: list[str]  # modules saved whole: norms, and linear layers too busy for SHiRA
    adapter_bytes: int  # size of adapter_model.safetensors

    def to_json(self, *, delta: str, output: Path, seconds: float) -> dict:
        """What `export --json` prints (schema in docs/cli.md)."""
        return {
            "output": str(output),
            "delta": delta,
            "to": "peft",
            "entries": self.entries,
            "padding_entries": self.padding,
            "r": self.r,
            "linear_layers": self.linear_layers,
            "saved_modules": self.saved_modules,
            "adapter_bytes": self.adapter_bytes,
            "seconds": round(seconds, 3),
        }


def export_peft(
    delta_ref: str,
    output: Path,
    *,
    base_ref: str | None = None,
    overwrite: bool = False,
    run: RunOptions | None = None,
) -> Exported:
    """Write the delta as a SHiRA adapter folder that PeftModel.from_pretrained loads onto its base."""
    peft = peft_library()
    output = check_output(output, overwrite=overwrite, inputs=(delta_ref, base_ref), kind=ADAPTER)
    delta = open_artifact(delta_ref, want="delta").delta
    base_ref = base_ref or (delta.info.base.repo_id if delta.info.base else None)
    if base_ref is None:
        raise PieceError("the delta's base was a local folder: name it with --base")
    refuse_overlap(output, [base_ref])  # the base a delta names is an input too
    checkpoint, model = load_base(base_ref, run)
    check_dtype_choice(delta, checkpoint, (run or RunOptions()).dtype, f"delta '{delta_ref}'")
    plan = shira_plan(model.module, delta)
    config = peft.ShiraConfig(
        r=plan.r,
        target_modules=sorted(plan.linear),
        modules_to_save=sorted(plan.saved) or None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=checkpoint.identity.repo_id or checkpoint.identity.name,
        init_weights=True,
    )
    with quiet_libraries():
        adapted = peft.get_peft_model(model.module, config)
    padding = 0
    with torch.no_grad():
        for module_name, (tensor_name, _) in plan.linear.items():
            layer = adapted.get_submodule(f"base_model.model.{module_name}")
            padding += fill_shira(layer, plan.tensors[tensor_name], plan.r)
        for module_name, tensor_names in plan.saved.items():
            copy = adapted.get_submodule(f"base_model.model.{module_name}").modules_to_save["default"]
            for attr, tensor_name in tensor_names:
                t = plan.tensors[tensor_name]
                getattr(copy, attr).view(-1)[t.indices] = t.tuned.to(getattr(copy, attr).dtype)
    with atomic_path(output, is_dir=True) as tmp, quiet_libraries():
        # lm_head is a linear layer here: its SHiRA entries are the adapter, not the whole table
        adapted.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    return Exported(
        entries=delta.count,
        padding=padding,
        r=plan.r,
        linear_layers=len(plan.linear),
        saved_modules=sorted(plan.saved),
        adapter_bytes=(output / ADAPTER_WEIGHTS).stat().st_size,
    )
