"""Record shapes: each shape people keep training data in, mapped onto the three records the trainer
reads (text, prompt + response, messages) by one rule, and any other shape refused in one line that
names the fields found.

The first rule whose fields a record has applies; other fields (`id`, `source`, ...) are ignored:

- `text` (a string): a text record, loss on every token.
- `messages` (a chat): a chat record, loss on every assistant turn.
- `prompt` + `response` (strings): a prompt/response record, loss on the response.
- `prompt` + `completion` (TRL): two strings are a prompt/response record; two lists of messages are
  one chat, the prompt's messages then the completion's, with loss on the completion's assistant
  turns only (as TRL's completion-only loss). With a `label` beside them it is TRL's unpaired
  preference shape (KTO), which says whether an answer is good, and is refused.
- `instruction` + `output`, with an optional `input` (Alpaca): a prompt/response record whose prompt
  is Stanford Alpaca's template filled with the instruction (and the input when it is not empty)
  and whose response is the output.
"""

from __future__ import annotations

from typing import Any

# Stanford Alpaca's prompt templates (with and without an input), as its data was trained with.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)

# A chat record mapped from TRL's conversational prompt/completion: the index of the first message
# of the completion (assistant turns before it carry no loss). Only the mapping sets it: a record's
# own fields never reach the trainer unmapped.
COMPLETION_FROM = "completion_from"

# The fields that decide a record's shape (a table's other columns are never read).
SHAPE_FIELDS = (
    "text",
    "messages",
    "prompt",
    "response",
    "completion",
    "label",
    "instruction",
    "input",
    "output",
)

EXPECTED = (
    "expected 'text', 'messages', 'prompt'+'response', 'prompt'+'completion' (TRL) or "
    "'instruction'+'output' (Alpaca)"
)


class ShapeError(ValueError):
    """What is wrong with a record's shape, in one line (the reader adds where it is)."""


def as_record(row: Any) -> dict:
    """The record a row of data maps to: {"text"}, {"prompt", "response"} or {"messages"} (with
    COMPLETION_FROM for a conversational prompt/completion), by the first rule above whose fields
    the row has. ShapeError, one line naming the fields found, for anything else."""
    if not isinstance(row, dict):
        raise ShapeError(f"expected an object with fields, got {_kind(row)}; {EXPECTED}")
    if "text" in row:
        return {"text": _string(row, "text")}
    if "messages" in row:
        return {"messages": row["messages"]}
    if "prompt" in row and "response" in row:
        return {"prompt": _string(row, "prompt"), "response": _string(row, "response")}
    if "prompt" in row and "completion" in row:
        return _prompt_completion(row)
    if "instruction" in row and "output" in row:
        return _alpaca(row)
    if not row:
        raise ShapeError(f"the record has no fields (in a table: every column is null there); {EXPECTED}")
    fields = ", ".join(f"'{k}'" for k in row)
    hint = " (preference data: train on the chosen answers as prompt+completion)" if "chosen" in row else ""
    raise ShapeError(f"found the fields {_cut(fields)}{hint}; {EXPECTED}")


def _prompt_completion(row: dict) -> dict:
    if "label" in row:
        raise ShapeError(
            "'prompt'+'completion'+'label' is TRL's unpaired preference shape (KTO), which marks answers "
            "good or bad; give supervised records (leave out 'label', keep the good answers only)"
        )
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        if not completion:
            raise ShapeError("'completion' is an empty list of messages")
        return {"messages": [*prompt, *completion], COMPLETION_FROM: len(prompt)}
    raise ShapeError("'prompt' and 'completion' must both be strings or both lists of messages")


def _alpaca(row: dict) -> dict:
    instruction, output = _string(row, "instruction"), _string(row, "output")
    given = row.get("input")
    if given is not None and not isinstance(given, str):
        raise ShapeError("'input' must be a string")
    if given and given.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=given)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return {"prompt": prompt, "response": output}


def _string(row: dict, key: str) -> str:
    if not isinstance(row[key], str):
        raise ShapeError(f"'{key}' must be a string, not {_kind(row[key])}")
    return row[key]


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def without_nulls(value: Any) -> Any:
    """A table's row as the record it stores: a table gives every row every column and every struct
    every field, so a null there means the field is absent (dropped, in objects at any depth)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
