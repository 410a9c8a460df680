"""A PEFT adapter that merges into its base (SHiRA, LoRA, ...) as a delta: PEFT loads it onto the
base and merges it, and every entry where the merged weights differ from the base's files is kept,
so the delta is exactly what the merge makes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from piece_surgery.formats.delta import Delta, DeltaInfo, DiffProvenance, delta_from_values
from piece_surgery.formats.peft import check_adapter_tensors, peft_library, quiet_libraries, read_adapter
from piece_surgery.io.hub import resolve
from piece_surgery.io.outputs import refuse_overlap
from piece_surgery.io.sniff import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel
from piece_surgery.models.fused import fused_parameters, fused_slices
from piece_surgery.models.pairing import stored_names, tied_names
from piece_surgery.runtime.dtypes import same_bits
from piece_surgery.runtime.errors import PieceError, first_line


def adapter_as_delta(
    adapter_ref: str,
    *,
    load_base: Callable[[str], tuple[Checkpoint, LoadedModel]],
    base_ref: str | None = None,
    output: Path | None = None,
) -> Delta:
    """The delta a PEFT adapter's merge makes on its base (`base_ref`, else the base its config
    names; `load_base(ref)` loads it), in memory. Refused in one line: an adapter whose file lacks
    tensors its config needs (PEFT would fill them with random values) or holds others, and a merge
    that a delta cannot express (a tied weight the base stores once, trained apart from its twin).
    With `output`, the base the config names may not overlap it."""
    peft = peft_library()
    source = resolve(adapter_ref, what="adapter", patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "*.md"])
    config, stored = read_adapter(source.path, adapter_ref)
    base_ref = base_ref or config.get("base_model_name_or_path")
    if not isinstance(base_ref, str) or not base_ref:
        raise PieceError("the adapter names no base model: give --base")
    if output is not None:
        refuse_overlap(output, [base_ref])  # the base an adapter names is an input too
    checkpoint, loaded = load_base(base_ref)
    model = loaded.module
    ties = tied_names(model)  # before PEFT replaces any module
    try:
        with quiet_libraries():
            adapted = peft.PeftModel.from_pretrained(model, str(source.path))
            # an adapter may or may not save the embedding layers it targets (save_embedding_layers)
            needed = set(peft.get_peft_model_state_dict(adapted, save_embedding_layers=False))
            allowed = needed | set(peft.get_peft_model_state_dict(adapted, save_embedding_layers=True))
    except Exception as exc:  # PEFT reading a user's files: any failure is the adapter's
        found = f"it has no entry {first_line(exc)}" if isinstance(exc, KeyError) else first_line(exc)
        raise PieceError(f"PEFT cannot load adapter '{adapter_ref}' onto this base: {found}") from exc
    foreign = _foreign_modules(adapted, stored - allowed)
    if foreign:
        raise PieceError(
            f"adapter '{adapter_ref}' holds tensors for modules this base does not have (first: "
            f"'{foreign[0]}'): it was made for another model; import it onto the base it was trained on"
        )
    check_adapter_tensors(adapter_ref, needed, allowed, stored)
    with quiet_libraries():
        merged = adapted.merge_and_unload()
    return _delta_against_files(checkpoint, merged, ties, source.name, loaded.twins)


def _foreign_modules(adapted: torch.nn.Module, names: set[str]) -> list[str]:
    """The modules that adapter tensors `names` ("base_model.model.<module>.<part>.<param>", PEFT's
    names) are for, where the base has no such module: an adapter of a deeper model, or of another
    architecture (a name of another shape is left to check_adapter_tensors)."""
    foreign = []
    for name in sorted(n for n in names if n.startswith("base_model.model.")):
        module = name.rsplit(".", 2)[0]  # without the adapter's own part and parameter
        try:
            adapted.get_submodule(module)
        except AttributeError:
            foreign.append(module.removeprefix("base_model.model."))
    return foreign


def _delta_against_files(
    checkpoint: Checkpoint,
    merged: torch.nn.Module,
    ties: dict[str, list[str]],
    name: str,
    twins: dict[str, list[str]],
) -> Delta:
    """Every entry where the merged model's weights differ from the base checkpoint's files, under
    the names the files store (an expert stored apart: its part of the fused weight the merge
    changed, models.fused). A parameter the files do not store loads as its tied twin: the merge
    must have left the two equal, or the delta (which changes stored tensors only) would load as
    another model."""
    tensors = _stored_tensors(checkpoint, merged, ties)
    entries = {}
    with checkpoint.reader() as reader:
        for key, held in sorted(tensors.items()):
            base = reader.get(key).reshape(-1)
            tuned = held.detach().reshape(-1).to(base.dtype)
            idx = torch.nonzero(~same_bits(base, tuned)).flatten()
            if idx.numel():
                entries[key] = (idx, base[idx].clone(), tuned[idx].clone())
    shapes = {k: checkpoint.layout[k].shape for k in entries}
    fractions = {k: entries[k][0].numel() / checkpoint.layout[k].numel for k in entries}
    provenance = DiffProvenance(tuned=f"PEFT adapter {name}", changed_fraction=fractions)
    return delta_from_values(entries, shapes, DeltaInfo(checkpoint.identity, provenance), twins)


def _stored_tensors(
    checkpoint: Checkpoint, merged: torch.nn.Module, ties: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Stored tensor name -> what the merged model holds for it: a parameter, or the part of a
    fused parameter an expert stored apart is. PieceError for a tied parameter the merge changed
    apart from its stored twin, or a parameter with no place in the files at all (whatever the
    merge did to it would be lost: refused, naming it)."""
    names_stored = stored_names(merged, checkpoint.layout)
    parts = fused_parameters(fused_slices(merged, checkpoint.layout))
    params = dict(merged.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for pname, param in params.items():
        key = names_stored.get(pname)
        if key is not None:
            tensors.setdefault(key, param)
            continue
        if pname in parts:
            tensors.update({s.name: s.of(param.detach()) for s in parts[pname]})
            continue
        twin = next((t for t in ties.get(pname, []) if t in names_stored), None)
        if twin is None:
            raise PieceError(
                f"the merged model holds '{pname}', which the base's files do not store: a delta of "
                "those files cannot carry what the adapter changes there"
            )
        if not bool(same_bits(params[twin].detach(), param.detach()).all()):
            _refuse_untied(checkpoint, params, pname, twin, names_stored[twin])
    return tensors


def _refuse_untied(checkpoint: Checkpoint, params: dict, pname: str, twin: str, stored_name: str) -> None:
    with checkpoint.reader() as reader:  # which of the two did the adapter train?
        stored = reader.get(stored_name)
    twin_changed = not bool(same_bits(params[twin].detach().to(stored.dtype), stored).all())
    changed, kept = (twin, pname) if twin_changed else (pname, twin)
    raise PieceError(
        f"the adapter changes '{changed}' apart from '{kept}', which this base ties to it and "
        "stores once: a delta changes stored tensors only, so it cannot untie them; import onto "
        "a copy of the base whose files store both (equal, they still load tied)"
    )
