"""The `generate` recipe: the base and each candidate answer the same prompts, side by side.

Candidates are told apart as `eval` tells them (candidates.py): deltas and PEFT adapters are
switched in and out of the one loaded base (DeltaSwitcher, exact), a merged checkpoint is loaded
beside it, one at a time. evaluation/generation.py writes each answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from piece_surgery.data.prompts import Prompt, check_prompt, read_prompts
from piece_surgery.evaluation.generation import GenerateOptions, check_prompt_ids, prompt_ids, write_answer
from piece_surgery.merging.switcher import DeltaSwitcher
from piece_surgery.recipes.candidates import adapter_delta, identify, load_beside
from piece_surgery.recipes.run import Run
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.progress import Progress


@dataclass
class Generated:
    """What `generate` wrote: per prompt, every model's answer (the base's first)."""

    base: str
    candidates: list[tuple[str, str]]  # (as given, kind: delta, adapter or checkpoint)
    prompts: list[Prompt]
    options: GenerateOptions
    templated: list[bool]  # per prompt: whether it went through the chat template
    # per model (the base, then each candidate, in order): per prompt {text, tokens}
    answers: list[list[dict]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def chat_template(self) -> bool:
        """Whether any prompt went through the chat template."""
        return any(self.templated)

    def to_json(self) -> dict:
        """What `generate --json` prints (schema in docs/cli.md)."""
        models = [self.base, *(ref for ref, _ in self.candidates)]
        by_model = list(zip(models, self.answers, strict=True))
        return {
            "base": self.base,
            "candidates": [{"candidate": ref, "kind": kind} for ref, kind in self.candidates],
            "chat_template": self.chat_template,
            "sample": self.options.sample,
            "seed": self.options.seed if self.options.sample else None,
            "max_new_tokens": self.options.max_new_tokens,
            "prompts": [
                {
                    "prompt": prompt,
                    "chat_template": self.templated[i],
                    "answers": [{"model": m, **answers[i]} for m, answers in by_model],
                }
                for i, prompt in enumerate(self.prompts)
            ],
            "seconds": round(self.seconds, 3),
        }


def generate_answers(
    base_ref: str,
    candidates: Sequence[str],
    prompts: Sequence[Prompt] = (),
    *,
    prompts_file: Path | None = None,
    options: GenerateOptions | None = None,
    run: RunOptions | None = None,
) -> Generated:
    """Each prompt (given, and those of `prompts_file`, each in the form training reads its record:
    data/prompts.py) answered by the base and by
    every candidate (a delta, a PEFT adapter or a merged checkpoint of the base's architecture).
    PieceError, one line, for no prompt, an empty one, a candidate of another base (naming the
    first mismatch), or a launcher (generate runs in one process)."""
    options = options or GenerateOptions()
    start = time.perf_counter()
    asked = [check_prompt(p, f"--prompt {i}") for i, p in enumerate(prompts, 1)]
    if prompts_file is not None:
        asked += read_prompts(prompts_file)
    if not asked:
        raise PieceError("give a prompt: --prompt TEXT (repeatable) or --prompts FILE")
    repeated = next((ref for i, ref in enumerate(candidates) if ref in candidates[:i]), None)
    if repeated is not None:
        raise PieceError(f"candidate '{repeated}' is given twice; give each once")
    session = Run(run)
    if session.world is not None and session.world.size > 1:
        raise PieceError("generate runs in one process: run it without torchrun or another launcher")
    checkpoint = session.open(base_ref, what="base")
    found = [(ref, *identify(ref)) for ref in candidates]
    tokenizer = checkpoint.load_tokenizer()
    rendered = [prompt_ids(p, tokenizer, raw=options.raw) for p in asked]
    rows, context = checkpoint.vocab_size(), checkpoint.context_length()
    for i, (ids, _) in enumerate(rendered):
        check_prompt_ids(ids, rows=rows, context=context, what=f"prompt {i + 1}")
    base = session.load_model(checkpoint)
    module = base.module.eval()
    switcher = DeltaSwitcher(module)
    for ref, kind, _, delta in found:
        if kind != "checkpoint":
            switcher.add(ref, delta if delta is not None else adapter_delta(ref, base_ref, session.options))
    generated = Generated(
        base_ref, [(ref, kind) for ref, kind, _, _ in found], asked, options, [t for _, t in rendered]
    )

    def answer_all(model: torch.nn.Module, bar) -> list[dict]:
        answers = []
        for ids, _ in rendered:
            new = write_answer(model, ids, options, pad_id=checkpoint.pad_id, eos_id=tokenizer.eos_token_id)
            answers.append({"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new)})
            bar.advance(1)
        return answers

    with Progress(len(asked) * (1 + len(found)), "generating", quiet=session.quiet) as bar:
        generated.answers.append(answer_all(module, bar))
        for ref, kind, _, _ in found:
            if kind == "checkpoint":
                other = load_beside(ref, checkpoint, session)
                generated.answers.append(answer_all(other, bar))
                del other
            else:
                with switcher.using(ref):
                    generated.answers.append(answer_all(module, bar))
    generated.seconds = time.perf_counter() - start
    return generated
