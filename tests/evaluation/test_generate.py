"""generate: the base and candidates answer the same prompts; a delta switched into the base answers
as the merged checkpoint `apply` writes, and greedy answers are those of a plain argmax loop."""

import json

import pytest
import torch
from helpers import assert_clean_failure, perturb


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A base, a tuned copy far from it, their delta (diff) and the delta applied (apply)."""
    from piece_surgery.recipes.diff import write_diff

    folder = tmp_path_factory.mktemp("generate")
    base = tiny("llama")
    tuned = perturb(base, folder / "tuned", fraction=0.5, seed=3, hard=False)
    write_diff(str(base), str(tuned), folder / "delta")
    return base, folder / "delta", folder


def generate(cli, *args) -> dict:
    code, stdout, err = cli("generate", *args, "--max-new-tokens", "8", "--json", "-q")
    assert code == 0, err
    return json.loads(stdout)


def answers(result: dict, prompt: int = 0) -> list[tuple[str, int]]:
    return [(a["text"], a["tokens"]) for a in result["prompts"][prompt]["answers"]]


def greedy_by_hand(folder, prompt: str, new_tokens: int, *, template: bool = True) -> str:
    """The most likely next token, one at a time, from a plain forward of the checkpoint; the
    prompt through the chat template as a user turn, or (template=False) as training reads a text:
    the tokenizer's own special tokens before it (none after: this tokenizer adds none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
        assert tokenizer.eos_token_id not in ids
    written = []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids + written])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            written.append(token)
    return tokenizer.decode(written, skip_special_tokens=True)


def test_a_delta_answers_as_the_merged_checkpoint_and_as_argmax_by_hand(models, cli):
    base, delta, folder = models
    code, _, err = cli("apply", base, delta, "-o", folder / "merged", "-q")
    assert code == 0, err
    result = generate(cli, base, delta, folder / "merged", "--prompt", "def add(a, b):", "--prompt", "Hello")
    assert result["chat_template"] and not result["sample"] and result["seed"] is None
    assert [c["kind"] for c in result["candidates"]] == ["delta", "checkpoint"]
    for prompt, text in enumerate(("def add(a, b):", "Hello")):
        base_answer, delta_answer, merged_answer = answers(result, prompt)
        assert delta_answer == merged_answer
        assert base_answer[0] == greedy_by_hand(base, text, 8)
        assert delta_answer[0] == greedy_by_hand(folder / "merged", text, 8)
    assert answers(result, 0)[0] != answers(result, 0)[1]  # the delta was switched in
    # the base, asked after the delta, is the base again
    assert answers(generate(cli, base, "--prompt", "Hello"), 0)[0] == answers(result, 1)[0]


def test_sampling_is_seeded_and_the_same_for_a_delta_and_its_merge(models, cli):
    base, delta, folder = models
    if not (folder / "merged").exists():
        assert cli("apply", base, delta, "-o", folder / "merged", "-q")[0] == 0
    args = [base, delta, folder / "merged", "--prompt", "Hello", "--sample", "--temperature", "1.5"]
    first = generate(cli, *args, "--seed", "3")
    assert first["sample"] and first["seed"] == 3
    assert answers(first) == answers(generate(cli, *args, "--seed", "3"))
    assert answers(first)[1] == answers(first)[2]
    other = generate(cli, *args, "--seed", "4")
    assert answers(other) != answers(first)


def test_prompts_come_from_data_files_in_every_shape(models, cli, tmp_path):
    base, delta, _ = models
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "an answer"}]
    rows = [
        {"prompt": "Square a number.", "completion": " x * x"},
        {"messages": chat},
        {"instruction": "Add two numbers.", "output": "a + b"},
        {"text": "def f("},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = generate(cli, base, delta, "--prompts", path, "--prompt", "first")
    prompts = [p["prompt"] for p in result["prompts"]]
    assert prompts[:3] == ["first", "Square a number.", chat[:1]]
    assert prompts[3].startswith("Below is an instruction") and prompts[3].endswith("### Response:\n")
    assert prompts[4] == "def f(" and all(len(p["answers"]) == 2 for p in result["prompts"])
    # each record as training reads it: only chats through the chat template
    assert [p["chat_template"] for p in result["prompts"]] == [True, False, True, False, False]
    for i in (1, 3, 4):
        assert answers(result, i)[0][0] == greedy_by_hand(base, prompts[i], 8, template=False)
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    raw = generate(cli, base, "--prompts", tmp_path / "p.txt", "--raw")
    assert [p["prompt"] for p in raw["prompts"]] == ["one", "two"] and not raw["chat_template"]


def test_generate_mistakes_are_one_line(models, cli, tiny, tmp_path):
    base, delta, _ = models
    assert_clean_failure(cli("generate", base, delta), "give a prompt")
    assert_clean_failure(cli("generate", base, "--prompt", "  "), "--prompt is empty")
    assert_clean_failure(cli("generate", base, "--prompt", "x", "--temperature", "0.5"), "give --sample too")
    assert_clean_failure(cli("generate", base, "--prompt", "x", "--sample", "--top-p", "0"), "--top-p")
    assert_clean_failure(cli("generate", base, delta, delta, "--prompt", "x"), "given twice")
    assert_clean_failure(cli("generate", base, tiny("gpt2"), "--prompt", "x"), "not a checkpoint of the base")
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    assert_clean_failure(
        cli("generate", base, "--prompts", tmp_path / "bad.jsonl"), "found the fields 'question'"
    )
    # an empty text prompt in a file, to a tokenizer that adds no BOS: no token to start from (it
    # was torch's RuntimeError on an empty float tensor of ids)
    for record in ('{"text": ""}', '{"prompt": "", "completion": "x"}'):
        (tmp_path / "empty.jsonl").write_text(record + "\n")
        assert_clean_failure(
            cli("generate", base, "--prompts", tmp_path / "empty.jsonl"), "prompt 1 has no token"
        )


def test_answers_stay_within_the_models_positions_and_its_embedding_table(cli, tiny, tmp_path):
    """GPT-2's 128 learned positions: an answer stops where they end (it indexed past the table); a
    prompt that fills them, or holds a token the model has no row for, is one line."""
    from transformers import AutoTokenizer

    gpt2 = tiny("gpt2")
    code, out, err = cli(
        "generate", gpt2, "--prompt", "hello there", "--max-new-tokens", "400", "--raw", "--json"
    )
    assert code == 0, err
    prompt_tokens = len(AutoTokenizer.from_pretrained(gpt2)("hello there")["input_ids"])
    assert 0 < json.loads(out)["prompts"][0]["answers"][0]["tokens"] <= 128 - prompt_tokens
    result = cli("generate", gpt2, "--prompt", "hello there " * 100, "--raw")
    assert_clean_failure(result, "prompt 1 takes")
    assert "and the model reads at most 128: shorten it" in result[2]
    folder = tmp_path / "added"
    tokenizer = AutoTokenizer.from_pretrained(tiny("llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<new>"]})
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny("llama") / name).exists():
            (folder / name).write_bytes((tiny("llama") / name).read_bytes())
    result = cli("generate", folder, "--prompt", "x <new> y", "--raw")
    assert_clean_failure(result, "prompt 1 has token id 384, but the model's embedding table has 384 rows")


def test_the_answers_table_escapes_control_characters_and_json_keeps_them(models, cli):
    from rich.console import Console

    from piece_surgery.cli.model_commands import _generate_table

    base, _, _ = models
    prompt = "title \x1b]0;pwned\x07 sep\x1c\rline one\nline two"
    result = generate(cli, base, "--prompt", prompt)
    assert result["prompts"][0]["prompt"] == prompt  # --json: the exact string
    result["prompts"][0]["answers"][0]["text"] = "answer\x1b[2J\u202eend"
    console = Console(width=200, record=True)
    console.print(_generate_table(result))
    text = console.export_text()
    assert not any(c in text for c in "\x1b\x07\x1c\r\u202e")
    for shown in ("title \\x1b]0;pwned\\x07 sep\\x1c\\rline one", "line two", "answer\\x1b[2J\\u202eend"):
        assert shown in text, shown
    assert "one\\n" not in text  # a newline stays a line break


def test_tables_outside_a_terminal_keep_names_whole_or_take_columns(models, cli, tmp_path, monkeypatch):
    import shutil

    base, delta, _ = models
    long = tmp_path / ("a-delta-in-a-folder-whose-name-is-long-" + "x" * 90)
    shutil.copytree(delta, long)
    (tmp_path / "g.txt").write_text("some general text to measure the drift on\n")
    monkeypatch.delenv("COLUMNS", raising=False)
    commands = (
        ("generate", base, long, "--prompt", "hi", "--max-new-tokens", "2", "-q"),
        ("eval", base, long, "--general", tmp_path / "g.txt", "-q"),
    )
    for args in commands:
        code, stdout, err = cli(*args)
        assert code == 0, err
        assert str(long) in stdout, args  # on one line, not folded at 80 columns
    monkeypatch.setenv("COLUMNS", "200")
    code, stdout, err = cli(*commands[1])
    assert code == 0, err
    widths = [len(line) for line in stdout.splitlines()]
    assert max(widths) == 200 and str(long) not in stdout  # the table fills COLUMNS, folding the name


def test_evals_table_shows_every_set_and_whole_candidate_names():
    from rich.console import Console

    from piece_surgery.cli.model_commands import _eval_table

    names = [f"some/long/folder/path/for/names/delta-{x}" for x in "ab"]

    def row(name, kl):
        general = [
            {"set": "g.txt", "tokens": 23, "kl": kl, "top1_changed": 0.1},
            {"set": "general", "tokens": 1000, "kl": 2 * kl, "top1_changed": 0.2},
        ]
        return {"candidate": name, "changes_outputs": True, "gain": 0.07, "tokens": 26 + 1023,
                "general": general, "seconds": 0.2}  # fmt: skip

    result = {
        "base": "m",
        "data": {"file": "d.jsonl"},
        "general": [{"file": "g.txt"}, {"file": "general"}],
        "candidates": [row(names[0], 1e-5), row(names[1], 3e-5)],
    }
    console = Console(width=80, record=True)
    console.print(_eval_table(result))
    text = console.export_text()
    column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2)
    assert names[0] in column and names[1] in column  # folded onto lines, never cut
    for value in ("1e-05", "2e-05", "3e-05", "6e-05", "1,000", " 23 ", " 26 ", " d.jsonl ", " general "):
        assert value in text, value
