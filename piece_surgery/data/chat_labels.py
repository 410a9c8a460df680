"""Where a chat's assistant turns lie in the text its template renders for the whole conversation.

Templates render a turn differently once later turns exist (Qwen3 drops an earlier answer's
reasoning and gives the last answer an empty `<think>` block; DeepSeek-V3's generation prompt opens
a `<think>` no rendered turn holds; Phi-3.5 ends a chat with end-of-text only when no generation
prompt follows; Mistral-Nemo writes the system message into a last user turn only, so a chat that
ends with an answer loses it, which tokenize.py refuses), so the turns are found in the whole
chat's text, never from renders of its first turns:

- the assistant's own text: the whole chat rendered again with that message's content replaced by
  a sentinel (a private-use character no text or markup holds); where the two renders differ is
  the text the template made of the content, whatever it did to it (trimmed it, dropped its
  reasoning). The sentinel must appear exactly once, or the template shows the message's text
  more than once (or not at all) and the record is refused;
- the turn's start: the end of the generation prompt (the text `add_generation_prompt=True` adds
  to the chat before it), found between the previous turn and the assistant's text, so what the
  model writes after that prompt (an opening `<think>` block) is the assistant's; where the prompt
  is not found there (DeepSeek's opens `<think>`, which the rendered turn does not hold; Mistral's
  is empty), the turn starts at its text;
- the turn's end: its text, then the characters the template writes after it both when the turn
  ends the chat and inside the whole chat (`<|im_end|>\\n`, `<|eot_id|>`, `<end_of_turn>\\n`,
  `</s>`, `<|end|>\\n`); the last message's turn runs to the end of the chat.

No other message's text may fall inside an assistant turn (each is found the same way), else the
record is refused: the assistant's tokens cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Callable

from piece_surgery.runtime.errors import PieceError

SENTINEL = "\ue000"
Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def assistant_spans(messages: list[dict], render: Render) -> tuple[str, list[tuple[int, int]]]:
    """The whole chat as `render` writes it and the character spans [start, end) of its assistant
    turns, in order. PieceError, naming the message, where the template shows an assistant's text
    other than once or mixes another message's text into an assistant turn."""
    full = render(messages, False)
    regions = [_region(full, render(_with_sentinel(messages, i), False)) for i in range(len(messages))]
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if regions[i] is None:
            shown = render(_with_sentinel(messages, i), False).count(SENTINEL)
            if not shown:
                raise dropped(i, message, _texts(message)[0] if _texts(message) else "")
            raise PieceError(
                f"the chat template shows the text of message {i + 1} (assistant) {shown} times, so "
                "its tokens cannot be told apart from the rest of the chat"
            )
        text_start, text_end = regions[i]
        floor = spans[-1][1] if spans else 0
        start = _turn_start(messages, i, render, full, floor, text_start)
        end = text_end + _closing(messages, i, render, full, text_end)
        spans.append((start, end))
    for j, region in enumerate(regions):
        if region is None or messages[j].get("role") == "assistant" or region[0] == region[1]:
            continue
        inside = next((k for k, (s, e) in enumerate(spans) if s < region[1] and region[0] < e), None)
        if inside is not None:
            raise PieceError(
                f"the chat template writes the text of message {j + 1} ({messages[j].get('role')}) "
                "into an assistant turn, so the assistant's tokens cannot be told apart"
            )
    return full, spans


def dropped(i: int, message: dict, text: str) -> PieceError:
    """The error for a template that leaves out the text of message i (it reads the other form)."""
    form = "a string" if isinstance(message.get("content"), str) else "a list of parts"
    return PieceError(
        f"the tokenizer's chat template drops the text of message {i + 1} ({text.strip()[:40]!r}): it "
        f"gives 'content' as {form}, so give it in the form the template reads (a string, or a list of "
        '{"type": "text", "text": ...} parts), or the template leaves that role out at that place'
    )


def _texts(message: dict) -> list[str]:
    content = message.get("content")
    return [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]


def _with_sentinel(messages: list[dict], i: int) -> list[dict]:
    content = messages[i].get("content")
    probe = SENTINEL if not isinstance(content, list) else [{"type": "text", "text": SENTINEL}]
    return [*messages[:i], {**messages[i], "content": probe}, *messages[i + 1 :]]


def _region(text: str, probe: str) -> tuple[int, int] | None:
    """Where `text` differs from `probe` (the same render with one content replaced by the
    sentinel): (start, end) in `text`; None unless the sentinel appears in `probe` exactly once."""
    if probe.count(SENTINEL) != 1:
        return None
    limit = min(len(text), len(probe))
    start = 0
    while start < limit and text[start] == probe[start]:
        start += 1
    tail = 0
    while tail < limit - start and text[-1 - tail] == probe[-1 - tail]:
        tail += 1
    return start, len(text) - tail


def _turn_start(messages: list[dict], i: int, render: Render, full: str, floor: int, text_start: int) -> int:
    """Where the assistant's turn i starts in `full`: after its generation prompt, if that lies
    between `floor` (the previous assistant turn's end) and the assistant's text; else at its text."""
    try:
        before, prompted = render(messages[:i], False), render(messages[:i], True)
    except PieceError:  # a template that cannot render the turns before (none, say): no prompt known
        return text_start
    prompt = prompted[len(before) :] if prompted.startswith(before) else ""
    at = full.rfind(prompt, floor, text_start) if prompt else -1
    return at + len(prompt) if at >= 0 else text_start


def _closing(messages: list[dict], i: int, render: Render, full: str, text_end: int) -> int:
    """How many characters after the assistant's text (at `text_end` in `full`) close its turn."""
    if i == len(messages) - 1:
        return len(full) - text_end
    alone = render(messages[: i + 1], False)
    region = _region(alone, render(_with_sentinel(messages[: i + 1], i), False))
    if region is None:
        return 0
    after, inside = alone[region[1] :], full[text_end:]
    n = 0
    while n < min(len(after), len(inside)) and after[n] == inside[n]:
        n += 1
    return n
