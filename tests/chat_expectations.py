"""The released chat templates of tests/fixtures/chat_templates and what each writes for an
assistant turn, read from the template by hand: the independent side of tests/data/test_chat_labels.py
and tests/models/test_families.py."""

from pathlib import Path

from piece_surgery.data.examples import IGNORE
from piece_surgery.models.tiny import tiny_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
# template file -> the family whose special tokens it writes (CHAT_FAMILIES)
FAMILY = {
    "llama3_1": "llama3",
    "qwen2_5": "qwen",
    "qwen3": "qwen",
    "gemma3": "gemma",
    "gemma2": "gemma",
    "phi3_5": "phi3",
    "mistral_nemo": "mistral",
    "smollm2": "smollm2",
    "deepseek_r1": "deepseek",
    "deepseek_v3": "deepseek",
    "qwen2_5_generation": "qwen",
    "qwen3_generation": "qwen",
}
EOS_DEEPSEEK = "<\uff5cend\u2581of\u2581sentence\uff5c>"
TWO_TURNS = [
    {"role": "user", "content": "What is sparse?"},
    {"role": "assistant", "content": "Few weights."},
    {"role": "user", "content": "And dense?"},
    {"role": "assistant", "content": "Every weight."},
]
# each assistant turn of TWO_TURNS as the template writes it, read from the template
EXPECTED = {
    "llama3_1": ["Few weights.<|eot_id|>", "Every weight.<|eot_id|>"],
    "qwen2_5": ["Few weights.<|im_end|>\n", "Every weight.<|im_end|>\n"],
    # the last answer gets an empty thinking block; an earlier one has none once a user turn follows
    "qwen3": ["Few weights.<|im_end|>\n", "<think>\n\n</think>\n\nEvery weight.<|im_end|>\n"],
    "gemma3": ["Few weights.<end_of_turn>\n", "Every weight.<end_of_turn>\n"],
    "gemma2": ["Few weights.<end_of_turn>\n", "Every weight.<end_of_turn>\n"],
    # end-of-text closes a chat that ends without a generation prompt
    "phi3_5": ["Few weights.<|end|>\n", "Every weight.<|end|>\n<|endoftext|>"],
    "mistral_nemo": ["Few weights.</s>", "Every weight.</s>"],
    "smollm2": ["Few weights.<|im_end|>\n", "Every weight.<|im_end|>\n"],
    "deepseek_r1": [f"Few weights.{EOS_DEEPSEEK}", f"Every weight.{EOS_DEEPSEEK}"],
    "deepseek_v3": [f"Few weights.{EOS_DEEPSEEK}", f"Every weight.{EOS_DEEPSEEK}"],
    # TRL's training variants: what their {% generation %} blocks hold
    "qwen2_5_generation": ["\nFew weights.<|im_end|>\n", "\nEvery weight.<|im_end|>\n"],
    "qwen3_generation": [
        "<think>\n\n</think>\n\nFew weights.<|im_end|>\n",
        "<think>\n\n</think>\n\nEvery weight.<|im_end|>\n",
    ],
}


def tokenizer_for(name: str):
    return tiny_tokenizer(chat_family=FAMILY[name], chat_template=(TEMPLATES / f"{name}.jinja").read_text())


def labelled_runs(example, tokenizer) -> list[str]:
    """The labelled tokens, decoded one maximal run at a time."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in [*runs, run] if r]
