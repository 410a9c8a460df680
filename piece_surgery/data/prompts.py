"""Prompts to ask a model (`generate --prompts FILE`), from any data source files.py reads, each
in the form training reads its record (shapes.py, tokenize.py), so a model trained on such records
is asked as it learned: a chat goes through the chat template, a text never does (an `AsIs`). A
.txt line is a text prompt; an object gives its prompt by the first of these rules whose fields it has:

- `prompt`: the prompt: a list of messages is a chat (TRL's conversational prompt-only and
  prompt/completion shapes), a string a text as it is (the standard shapes); a `completion` or
  `response` beside it is left out;
- `messages`: the chat up to its last assistant turn (left out: the model writes its own);
- `instruction`, optional `input` (Alpaca): the text training reads as its prompt (shapes.py);
- `text`: the text, to be continued.
"""

from __future__ import annotations

from pathlib import Path

from piece_surgery.data.files import messages_problem, read_rows
from piece_surgery.data.shapes import ShapeError, as_record
from piece_surgery.runtime.errors import PieceError

Prompt = str | list[dict]  # a text, or a chat (a list of {role, content} messages)


class AsIs(str):
    """A text prompt the model reads as it is, never through the chat template, as training reads
    the record it came from (a text record, a string prompt/completion, an Alpaca record)."""


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a data source. PieceError, one line naming where, for a row with none."""
    return [_prompt(row, where) for where, row in read_rows(Path(path)).records]


def _prompt(row, where: str) -> Prompt:
    if isinstance(row, str):
        return AsIs(row)
    if not isinstance(row, dict):
        raise PieceError(f"{where}: expected an object with 'prompt', 'messages', 'instruction' or 'text'")
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            return _chat({"messages": prompt}, where)
        if isinstance(prompt, str):
            return AsIs(prompt)
        raise PieceError(f"{where}: 'prompt' must be a string or a list of messages")
    if "messages" in row:
        messages = _chat({"messages": row["messages"]}, where)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise PieceError(f"{where}: the chat holds only assistant turns: nothing to answer")
        return messages
    if "instruction" in row:
        try:
            return AsIs(as_record({**row, "output": ""})["prompt"])
        except ShapeError as exc:
            raise PieceError(f"{where}: {exc}") from None
    if isinstance(row.get("text"), str):
        return AsIs(row["text"])
    fields = ", ".join(f"'{k}'" for k in row) or "none"
    raise PieceError(
        f"{where}: found the fields {fields}; a prompt is 'prompt', 'messages', 'instruction' or 'text'"
    )


def _chat(record: dict, where: str) -> list[dict]:
    problem = messages_problem(record)
    if problem:
        raise PieceError(f"{where}: {problem}")
    return list(record["messages"])


def check_prompt(prompt: Prompt, where: str) -> Prompt:
    """A prompt given on the command line or in Python: a non-empty string or a valid chat."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PieceError(f"{where} is empty")
        return prompt
    return _chat({"messages": prompt}, where)
