"""Chat labels on the real chat templates of released models (issue 33): the loss falls on exactly
the assistant turns of the whole conversation as the template renders it, never on the start of the
next user turn, for templates that render a turn differently once later turns exist.

The expected labels are an independent computation: for each template, the text of each assistant
turn as read from the template by hand (the answer as the template writes it, then what closes the
turn), compared with the labelled tokens decoded run by run. The templates and their sources:
tests/fixtures/chat_templates/README.md."""

import pytest
from chat_expectations import (
    EOS_DEEPSEEK,
    EXPECTED,
    FAMILY,
    TEMPLATES,
    TWO_TURNS,
    labelled_runs,
    tokenizer_for,
)

from piece_surgery.data.chat_labels import SENTINEL, assistant_spans
from piece_surgery.data.shapes import as_record
from piece_surgery.data.tokenize import tokenize_record
from piece_surgery.models.tiny import tiny_tokenizer
from piece_surgery.runtime.errors import PieceError


def test_every_family_has_its_template():
    assert {p.stem for p in TEMPLATES.glob("*.jinja")} == set(FAMILY) == set(EXPECTED)
    readme = (TEMPLATES / "README.md").read_text()
    assert all(f"`{name}.jinja`" in readme for name in FAMILY)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_two_turn_chat_is_labelled_on_its_assistant_turns(name):
    tokenizer = tokenizer_for(name)
    example = tokenize_record({"messages": TWO_TURNS}, tokenizer, 512)
    assert labelled_runs(example, tokenizer) == EXPECTED[name]
    # the tokens are the whole chat as the template renders it, nothing added
    rendered = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_trl_prompt_completion_chat_trains_only_the_completion(name):
    """TRL's conversational prompt/completion: the prompt's own assistant turn (a few-shot answer)
    carries no loss; the completion's turn is labelled as in the whole chat."""
    tokenizer = tokenizer_for(name)
    row = {"prompt": TWO_TURNS[:3], "completion": TWO_TURNS[3:]}
    example = tokenize_record(as_record(row), tokenizer, 512)
    assert labelled_runs(example, tokenizer) == EXPECTED[name][1:]
    whole = tokenize_record({"messages": TWO_TURNS}, tokenizer, 512)
    assert example.input_ids == whole.input_ids


REASONED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is sparse?"},
    {"role": "assistant", "content": "<think>\nFew.\n</think>\n\nFew weights."},
    {"role": "user", "content": "And dense?"},
    {"role": "assistant", "content": "<think>\nAll.\n</think>\n\nEvery weight."},
]
# with a system message and the reasoning inline: who drops it, who keeps it
EXPECTED_REASONED = {
    "qwen3": ["Few weights.<|im_end|>\n", "<think>\nAll.\n</think>\n\nEvery weight.<|im_end|>\n"],
    "qwen2_5": [
        "<think>\nFew.\n</think>\n\nFew weights.<|im_end|>\n",
        "<think>\nAll.\n</think>\n\nEvery weight.<|im_end|>\n",
    ],
    "deepseek_r1": [f"\n\nFew weights.{EOS_DEEPSEEK}", f"\n\nEvery weight.{EOS_DEEPSEEK}"],
    "deepseek_v3": [f"\n\nFew weights.{EOS_DEEPSEEK}", f"\n\nEvery weight.{EOS_DEEPSEEK}"],
    "llama3_1": [
        "<think>\nFew.\n</think>\n\nFew weights.<|eot_id|>",
        "<think>\nAll.\n</think>\n\nEvery weight.<|eot_id|>",
    ],
    "gemma3": [
        "<think>\nFew.\n</think>\n\nFew weights.<end_of_turn>\n",
        "<think>\nAll.\n</think>\n\nEvery weight.<end_of_turn>\n",
    ],
    "smollm2": [
        "<think>\nFew.\n</think>\n\nFew weights.<|im_end|>\n",
        "<think>\nAll.\n</think>\n\nEvery weight.<|im_end|>\n",
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_REASONED))
def test_reasoning_and_a_system_message(name):
    tokenizer = tokenizer_for(name)
    example = tokenize_record({"messages": REASONED}, tokenizer, 512)
    runs = labelled_runs(example, tokenizer)
    assert runs == EXPECTED_REASONED[name]
    assert not any("Be brief" in r or "dense" in r or "sparse" in r for r in runs)


def test_qwen3_with_reasoning_content_keeps_the_last_turns_reasoning_only():
    tokenizer = tokenizer_for("qwen3")
    chat = [
        {"role": "user", "content": "What is sparse?"},
        {"role": "assistant", "content": "Few weights.", "reasoning_content": "Count them."},
        {"role": "user", "content": "And dense?"},
        {"role": "assistant", "content": "Every weight.", "reasoning_content": "All of them."},
    ]
    runs = labelled_runs(tokenize_record({"messages": chat}, tokenizer, 512), tokenizer)
    assert runs == [
        "Few weights.<|im_end|>\n",
        "<think>\nAll of them.\n</think>\n\nEvery weight.<|im_end|>\n",
    ]


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3_5", "smollm2"])
def test_a_chat_that_opens_with_the_assistant_or_ends_with_the_user(name):
    tokenizer = tokenizer_for(name)
    ends_with_user = TWO_TURNS[:3]
    runs = labelled_runs(tokenize_record({"messages": ends_with_user}, tokenizer, 512), tokenizer)
    assert runs == EXPECTED[name][:1]
    if name != "gemma3":  # Gemma's template requires the user to speak first
        opens = [{"role": "assistant", "content": "Hello."}, *TWO_TURNS[:2]]
        runs = labelled_runs(tokenize_record({"messages": opens}, tokenizer, 512), tokenizer)
        last = EXPECTED[name][1].replace("Every weight.", "Few weights.")  # it ends the chat now
        assert len(runs) == 2 and runs[0].startswith("Hello.") and runs[1] == last


def test_text_given_as_parts_and_trimmed_by_the_template():
    tokenizer = tokenizer_for("gemma3")
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "What is sparse?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "  Few weights.  "}]},
    ]
    runs = labelled_runs(tokenize_record({"messages": chat}, tokenizer, 512), tokenizer)
    assert runs == ["Few weights.<end_of_turn>\n"]


def test_mistral_nemo_drops_a_system_message_when_the_chat_ends_with_the_assistant():
    """Its template puts the system message into the last user turn only when that turn ends the
    chat: a training chat would lose it, silently. Refused in one line."""
    chat = [{"role": "system", "content": "Be brief."}, *TWO_TURNS]
    with pytest.raises(PieceError, match="drops the text of message 1"):
        tokenize_record({"messages": chat}, tokenizer_for("mistral_nemo"), 512)


def test_truncation_keeps_the_labels_of_the_tokens_kept():
    tokenizer = tokenizer_for("qwen3")
    whole = tokenize_record({"messages": TWO_TURNS}, tokenizer, 512)
    for limit in (5, 17, 30):
        cut = tokenize_record({"messages": TWO_TURNS}, tokenizer, limit)
        assert cut.input_ids == whole.input_ids[:limit] and cut.labels == whole.labels[:limit]


# ---------------------------------------------------------------- templates that cannot be trusted


def _render_with(template: str):
    from jinja2 import Environment

    compiled = Environment().from_string(template)
    return lambda messages, prompt: compiled.render(messages=messages, add_generation_prompt=prompt)


def test_a_template_that_shows_an_answer_twice_is_refused():
    render = _render_with(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if messages[-1].role == 'assistant' %}(last: {{ messages[-1].content }}){% endif %}"
    )
    with pytest.raises(PieceError, match="shows the text of message 4 \\(assistant\\) 2 times"):
        assistant_spans(TWO_TURNS, render)


def test_a_template_that_writes_a_user_turn_into_an_answer_is_refused():
    render = _render_with(
        "{% for m in messages %}{% if m.role == 'user' %}{% set ns = m.content %}<u>{% else %}"
        "<a>{{ m.content }} (you asked: {{ messages[loop.index0 - 1].content }})</s>{% endif %}{% endfor %}"
    )
    with pytest.raises(PieceError, match="writes the text of message 1 \\(user\\) into an assistant turn"):
        assistant_spans(TWO_TURNS, render)


def test_a_sentinel_never_reaches_the_tokens():
    tokenizer = tokenizer_for("qwen3")
    example = tokenize_record({"messages": TWO_TURNS}, tokenizer, 512)
    assert SENTINEL not in tokenizer.decode(example.input_ids)


def test_a_generation_template_that_marks_no_turn_is_refused():
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if false %}{% generation %}x{% endgeneration %}{% endif %}"
    )
    tokenizer = tiny_tokenizer(chat_family="qwen", chat_template=template)
    with pytest.raises(PieceError, match="none of this chat's"):
        tokenize_record({"messages": TWO_TURNS}, tokenizer, 512)
