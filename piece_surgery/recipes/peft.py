"""Deltas and PEFT adapters: `export --to peft` writes a SHiRA adapter (PEFT's sparse adapter) that
stock PEFT loads with PeftModel.from_pretrained; `import` turns an adapter that merges into its base
(SHiRA, LoRA, ...) back into a delta, by comparing the merged weights with the base's.

SHiRA holds, per adapted linear layer, r x (in + out) entries (one r for every layer), padded with
entries that change nothing. The export picks the r, and the few busiest layers to save whole in
`modules_to_save` instead, that make the smallest file. Norm gains (vectors) go into
`modules_to_save` too (the whole vector, a few KB). Anything else (embedding tables, GPT-2's
Conv1D, weights two modules share, biases) has no place in SHiRA: the export refuses, naming it.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.formats.artifacts import open_artifact
from piece_surgery.formats.delta import (
    Delta,
    DeltaInfo,
    DiffProvenance,
    TensorDelta,
    delta_from_values,
    save_delta,
)
from piece_surgery.io.hub import resolve
from piece_surgery.io.outputs import atomic_path, check_output, refuse_overlap
from piece_surgery.merging.merge import TensorPart, merge_one, model_tensors
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel, open_checkpoint, stored_names, tied_names
from piece_surgery.runtime.dtypes import same_bits
from piece_surgery.runtime.errors import PieceError, first_line
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.records import read_json
from piece_surgery.training.sparse_grad import is_gain_module, owners

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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


@dataclass(frozen=True)
class Imported:
    """What `import` wrote: the delta, and the bytes of tensor data its folder holds."""

    delta: Delta
    tensor_bytes: int

    def to_json(self, *, adapter: str, output: Path, seconds: float) -> dict:
        """What `import --json` prints (schema in docs/cli.md)."""
        return {
            "output": str(output),
            "adapter": adapter,
            "entries": self.delta.count,
            "tensors": len(self.delta.tensors),
            "seconds": round(seconds, 3),
        }


@contextmanager
def _quiet_libraries():
    """PEFT and transformers warn each other about deprecations: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise PieceError("PEFT is not installed: pip install 'piece-surgery[peft]'") from exc
    if not hasattr(peft, "ShiraConfig"):
        raise PieceError(f"PEFT {peft.__version__} has no SHiRA adapters: pip install -U 'peft>=0.17'")
    return peft


def export_peft(
    delta_ref: str,
    output: Path,
    *,
    base_ref: str | None = None,
    overwrite: bool = False,
    run: RunOptions | None = None,
) -> Exported:
    """Write the delta as a SHiRA adapter folder that PeftModel.from_pretrained loads onto its base."""
    peft = _peft()
    output = check_output(output, overwrite=overwrite, inputs=(delta_ref, base_ref))
    delta = open_artifact(delta_ref, want="delta").delta
    base_ref = base_ref or (delta.info.base.repo_id if delta.info.base else None)
    if base_ref is None:
        raise PieceError("the delta's base was a local folder: name it with --base")
    refuse_overlap(output, [base_ref])  # the base a delta names is an input too
    checkpoint, model = _load_base(base_ref, run)
    plan = _shira_plan(model.module, delta)
    config = peft.ShiraConfig(
        r=plan.r,
        target_modules=sorted(plan.linear),
        modules_to_save=sorted(plan.saved) or None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=checkpoint.identity.repo_id or checkpoint.identity.name,
        init_weights=True,
    )
    with _quiet_libraries():
        adapted = peft.get_peft_model(model.module, config)
    padding = 0
    with torch.no_grad():
        for module_name, (tensor_name, _) in plan.linear.items():
            layer = adapted.get_submodule(f"base_model.model.{module_name}")
            padding += _fill_shira(layer, plan.tensors[tensor_name], plan.r)
        for module_name, tensor_names in plan.saved.items():
            copy = adapted.get_submodule(f"base_model.model.{module_name}").modules_to_save["default"]
            for attr, tensor_name in tensor_names:
                t = plan.tensors[tensor_name]
                getattr(copy, attr).view(-1)[t.indices] = t.tuned.to(getattr(copy, attr).dtype)
    with atomic_path(output, is_dir=True) as tmp, _quiet_libraries():
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


def _load_base(base_ref: str, run: RunOptions | None) -> tuple[Checkpoint, LoadedModel]:
    """The base, loaded as the run options say (device, dtype, trust); on the CPU by default."""
    run = run or RunOptions(device="cpu")
    if run.fsdp or run.max_samples is not None or run.max_length != RunOptions().max_length:
        raise PieceError("--fsdp, --max-length and --max-samples are for score and train; leave them out")
    checkpoint = open_checkpoint(base_ref, what="base", trust_remote_code=run.trust_remote_code)
    loaded = checkpoint.load_model(
        device=run.device, dtype=run.dtype, quiet=run.quiet, attn_implementation=run.attn_implementation
    )
    return checkpoint, loaded


@dataclass
class _ShiraPlan:
    r: int
    linear: dict[str, tuple[str, torch.nn.Linear]]  # module name -> (tensor name, layer)
    saved: dict[str, list[tuple[str, str]]]  # modules saved whole: name -> [(attribute, tensor name)]
    tensors: dict[str, TensorDelta]  # the delta's tensors, checked against the base (base values known)


def _shira_plan(model: torch.nn.Module, delta: Delta) -> _ShiraPlan:
    """Which tensors go where; checks each against the model's weights (the delta's base)."""
    module_names = {id(m): name for name, m in model.named_modules()}
    holders = owners(model)
    linear, saved, tensors = {}, {}, {}
    for tensor_name, (_, param) in model_tensors(model, delta).items():
        t = delta.tensors[tensor_name]
        current = param.detach().view(-1)[t.indices].cpu()
        # the identity rule of apply: dtype and every entry's base value, or a one-line refusal
        part = TensorPart(t, 1.0, "the delta", force_hint="", refused_as="the base is not the delta's base")
        tensors[tensor_name], _, _ = merge_one(tensor_name, current, part, force=False)
        held = holders.get(id(param), [])
        module, attr = held[0] if len(held) == 1 else (None, None)
        if module is not None and type(module) is torch.nn.Linear and attr == "weight":
            linear[module_names[id(module)]] = (tensor_name, module)
        elif module is not None and is_gain_module(module):
            saved.setdefault(module_names[id(module)], []).append((attr, tensor_name))
        else:
            raise PieceError(
                f"tensor '{tensor_name}' is not a linear layer's weight or a norm's gain: a SHiRA adapter "
                "cannot hold it; score without it (--exclude) to export"
            )
    counts = {name: delta.tensors[t].indices.numel() for name, (t, _) in linear.items()}
    r, whole = _cheapest_layout({name: m for name, (_, m) in linear.items()}, counts)
    for name in whole:
        tensor_name, _ = linear.pop(name)
        saved.setdefault(name, []).append(("weight", tensor_name))
    if not linear:  # PEFT refuses an adapter without a layer of its own type
        if not whole:
            raise PieceError(
                "the delta changes no linear layer (only norm gains): a SHiRA adapter needs at least one "
                "sparse linear layer; apply the delta with `piece-surgery apply` instead"
            )
        raise PieceError(
            f"every linear layer the delta changes is too dense for SHiRA ({len(whole)} saved whole would "
            "be the whole adapter; a LoRA's change touches every entry): keep the original adapter, or "
            "apply the delta with `piece-surgery apply`"
        )
    return _ShiraPlan(r, linear, saved, tensors)


# bytes per SHiRA slot as PEFT saves it: a (row, column) pair of int32 and an fp32 change
_SLOT_BYTES = 12


def _cheapest_layout(layers: dict[str, torch.nn.Linear], counts: dict[str, int]) -> tuple[int, set[str]]:
    """SHiRA gives every adapted layer r x (in + out) slots, one r for all, so a few busy layers
    would pad every other one. Choose the r, and the layers saved whole instead (modules_to_save:
    every weight, in its dtype), that make the smallest adapter."""

    def slots(m: torch.nn.Linear, r: int) -> int:
        return r * (m.in_features + m.out_features)

    def whole_bytes(m: torch.nn.Linear) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    def cost(r: int) -> tuple[int, set[str]]:
        fits = {n for n, m in layers.items() if counts[n] <= slots(m, r) <= m.in_features * m.out_features}
        size = sum(slots(layers[n], r) * _SLOT_BYTES for n in fits)
        return size + sum(whole_bytes(m) for n, m in layers.items() if n not in fits), set(layers) - fits

    needed = {math.ceil(counts[n] / (m.in_features + m.out_features)) for n, m in layers.items()} or {1}
    best = min(sorted(needed), key=lambda r: cost(r)[0])
    return best, cost(best)[1]


def _fill_shira(layer, t, r: int) -> int:
    """Set a SHiRA layer's entries to the delta's changes, padded with unchanged entries up to
    r x (in + out); returns the padding count."""
    rows_total, cols = layer.out_features, layer.in_features
    capacity = r * (rows_total + cols)
    padding = capacity - int(t.indices.numel())
    used = torch.zeros(rows_total * cols, dtype=torch.bool)
    used[t.indices] = True
    extra = torch.nonzero(~used).flatten()[:padding]  # the first free entries, deterministically
    flat = torch.cat([t.indices, extra])
    change = torch.cat([t.change().float(), torch.zeros(padding)])
    layer.shira_indices["default"] = torch.stack([flat // cols, flat % cols]).to(torch.int)
    layer.shira_weight["default"].data = change
    return padding


def import_peft(
    adapter_ref: str,
    output: Path,
    *,
    base_ref: str | None = None,
    overwrite: bool = False,
    compact: bool = False,
    run: RunOptions | None = None,
) -> Imported:
    """A delta from a PEFT adapter: its weights merged into the base, compared entry by entry with
    the base's files (adapter_as_delta), written to `output`."""
    output = check_output(output, overwrite=overwrite, inputs=(adapter_ref, base_ref))
    delta = adapter_as_delta(adapter_ref, base_ref=base_ref, run=run, output=output)
    if delta.count == 0:
        raise PieceError("the adapter changes nothing in the base: there is no delta to write")
    return Imported(delta, save_delta(delta, output, compact=compact))


def adapter_as_delta(
    adapter_ref: str,
    *,
    base_ref: str | None = None,
    run: RunOptions | None = None,
    output: Path | None = None,
) -> Delta:
    """The delta a PEFT adapter's merge makes on its base (`base_ref`, else the base its config
    names), in memory. Refused in one line: an adapter whose file lacks tensors its config needs
    (PEFT would fill them with random values) or holds others, and a merge that a delta cannot
    express (a tied weight the base stores once, trained apart from its twin). With `output`, the
    base the config names may not overlap it."""
    peft = _peft()
    source = resolve(adapter_ref, what="adapter", patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "*.md"])
    config, stored = _read_adapter(source.path, adapter_ref)
    base_ref = base_ref or config.get("base_model_name_or_path")
    if not isinstance(base_ref, str) or not base_ref:
        raise PieceError("the adapter names no base model: give --base")
    if output is not None:
        refuse_overlap(output, [base_ref])  # the base an adapter names is an input too
    checkpoint, loaded = _load_base(base_ref, run)
    model = loaded.module
    ties = tied_names(model)  # before PEFT replaces any module
    try:
        with _quiet_libraries():
            adapted = peft.PeftModel.from_pretrained(model, str(source.path))
            # an adapter may or may not save the embedding layers it targets (save_embedding_layers)
            needed = set(peft.get_peft_model_state_dict(adapted, save_embedding_layers=False))
            allowed = needed | set(peft.get_peft_model_state_dict(adapted, save_embedding_layers=True))
    except Exception as exc:  # PEFT reading a user's files: any failure is the adapter's
        raise PieceError(
            f"PEFT cannot load adapter '{adapter_ref}' onto this base: {first_line(exc)}"
        ) from exc
    _check_adapter_tensors(adapter_ref, needed, allowed, stored)
    with _quiet_libraries():
        merged = adapted.merge_and_unload()
    return _delta_against_files(checkpoint, merged, ties, source.name, loaded.twins)


def _read_adapter(folder: Path, ref: str) -> tuple[dict, set[str]]:
    """The adapter's config (a JSON object naming its PEFT type) and the names in its weights file."""
    if not (folder / ADAPTER_CONFIG).is_file():
        raise PieceError(f"adapter '{ref}' has no {ADAPTER_CONFIG}: is it a PEFT adapter folder?")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise PieceError(f"adapter '{ref}' has no {ADAPTER_WEIGHTS} (pickle weights are not read for safety)")
    config = read_json(folder / ADAPTER_CONFIG, f"adapter '{ref}': {ADAPTER_CONFIG}")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise PieceError(f"adapter '{ref}': {ADAPTER_CONFIG} must be an object with a 'peft_type' string")
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
            stored = set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise PieceError(f"adapter '{ref}': {ADAPTER_WEIGHTS} is not a readable safetensors file") from exc
    return config, stored


def _check_adapter_tensors(ref: str, needed: set[str], allowed: set[str], stored: set[str]) -> None:
    missing, unexpected = sorted(needed - stored), sorted(stored - allowed)
    if missing:
        raise PieceError(
            f"adapter '{ref}' lacks {len(missing)} of the tensors its config needs (first: '{missing[0]}'); "
            "PEFT would fill them with random values: the adapter file is incomplete"
        )
    if unexpected:
        raise PieceError(
            f"adapter '{ref}' holds {len(unexpected)} tensors its config does not use (first: "
            f"'{unexpected[0]}'): {ADAPTER_WEIGHTS} does not belong to its {ADAPTER_CONFIG}"
        )


def _delta_against_files(
    checkpoint: Checkpoint,
    merged: torch.nn.Module,
    ties: dict[str, list[str]],
    name: str,
    twins: dict[str, list[str]],
) -> Delta:
    """Every entry where the merged model's weights differ from the base checkpoint's files, under
    the names the files store. A parameter the files do not store loads as its tied twin: the merge
    must have left the two equal, or the delta (which changes stored tensors only) would load as
    another model."""
    names_stored = stored_names(merged, checkpoint.layout)
    params = dict(merged.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for pname, param in params.items():
        key = names_stored.get(pname)
        if key is not None:
            tensors.setdefault(key, param)
            continue
        twin = next((t for t in ties.get(pname, []) if t in names_stored), None)
        if twin is not None and not bool(same_bits(params[twin].detach(), param.detach()).all()):
            with checkpoint.reader() as reader:  # which of the two did the adapter train?
                stored = reader.get(names_stored[twin])
            twin_changed = not bool(same_bits(params[twin].detach().to(stored.dtype), stored).all())
            changed, kept = (twin, pname) if twin_changed else (pname, twin)
            raise PieceError(
                f"the adapter changes '{changed}' apart from '{kept}', which this base ties to it and "
                "stores once: a delta changes stored tensors only, so it cannot untie them; import onto "
                "a copy of the base whose files store both (equal, they still load tied)"
            )
    entries = {}
    with checkpoint.reader() as reader:
        for key, param in sorted(tensors.items()):
            base = reader.get(key).reshape(-1)
            tuned = param.detach().reshape(-1).to(base.dtype)
            idx = torch.nonzero(~same_bits(base, tuned)).flatten()
            if idx.numel():
                entries[key] = (idx, base[idx].clone(), tuned[idx].clone())
    shapes = {k: checkpoint.layout[k].shape for k in entries}
    fractions = {k: entries[k][0].numel() / checkpoint.layout[k].numel for k in entries}
    provenance = DiffProvenance(tuned=f"PEFT adapter {name}", changed_fraction=fractions)
    return delta_from_values(entries, shapes, DeltaInfo(checkpoint.identity, provenance), twins)
