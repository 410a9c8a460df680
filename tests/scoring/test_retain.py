"""Retain-aware selection (piece-r), --retain self, --avoid, and the O(k) drift estimate, against
independent brute-force computations."""

import json
import math
import shutil

import pytest
import torch
from helpers import as_lists, assert_clean_failure, brute_force_scores, brute_force_top_k
from hypothesis import given, settings
from hypothesis import strategies as st

from piece_surgery.formats.mask import load_mask, save_mask
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.models.eligible import eligible_parameters
from piece_surgery.recipes.score import score_checkpoint
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.importance import quantile
from piece_surgery.scoring.options import ScoreOptions

TINY = torch.finfo(torch.float32).tiny


@pytest.fixture
def general_data(tmp_path):
    """The retain set: text unlike the code data."""
    path = tmp_path / "general.txt"
    path.write_text(
        "Mathematics studies numbers, shapes and structure.\n"
        "Biology studies living things and how they grow.\n"
        "The quick brown fox jumps over the lazy dog.\n"
        "Sparse updates keep general ability.\n"
    )
    return path


def per_batch_gradients(folder, data, *, sampled_seed=None):
    """torch.autograd.grad of each micro-batch's (size 1) mean token loss, on the data's labels or
    on labels drawn from the model (one seeded generator, draws in micro-batch order); also each
    micro-batch's loss-bearing tokens."""
    checkpoint = open_checkpoint(folder)
    dataset = checkpoint.load_data(data)
    loaded = checkpoint.load_model(device="cpu", dtype="float32")
    model = loaded.module.eval()
    params = eligible_parameters(model, loaded.keys)
    generator = torch.Generator().manual_seed(sampled_seed) if sampled_seed is not None else None
    grads, tokens = [], []
    for example in dataset.examples:
        ids = torch.tensor([example.input_ids])
        logits = model(input_ids=ids).logits[0].float()
        targets = torch.tensor(example.labels[1:])
        if generator is not None:
            drawn = torch.multinomial(
                torch.softmax(logits[:-1].detach(), -1), 1, generator=generator
            ).flatten()
            targets = torch.where(targets != -100, drawn, targets)
        keep = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep])
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
        tokens.append(int(keep.sum()))
    return grads, tokens


def brute_force_piece_r(folder, data, retain, damping, labels):
    domain, _ = per_batch_gradients(folder, data)
    retained, tokens = per_batch_gradients(folder, retain, sampled_seed=0 if labels == "sampled" else None)
    names = list(domain[0])
    g = {n: sum(b[n] for b in domain) for n in names}
    fisher = {n: sum(b[n] ** 2 for b in retained) for n in names}
    everything = torch.cat([fisher[n].flatten() for n in names]).sort().values
    delta = max(float(everything[math.floor(damping * (everything.numel() - 1))]), TINY)
    scores = {n: g[n] ** 2 / (fisher[n] + delta) for n in names}
    return scores, fisher, delta, 1.0 / sum(1.0 / t for t in tokens)


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
@pytest.mark.parametrize("damping", [0.1, 0.9])
def test_piece_r_matches_brute_force(tiny, code_data, general_data, labels, damping):
    folder = tiny("llama")
    options = ScoreOptions(method="piece-r", density=0.02, retain_labels=labels, retain_damping=damping)
    mask, _, _ = score_checkpoint(
        str(folder), code_data, options, retain=[general_data], run=RunOptions(device="cpu")
    )
    scores, fisher, delta, scale = brute_force_piece_r(folder, code_data, general_data, damping, labels)
    assert mask.info.retain.damping_value == pytest.approx(delta, rel=1e-5)
    assert as_lists(mask.indices) == brute_force_top_k(scores, mask.k)
    for name, idx in mask.indices.items():  # the mask carries the per-token Fisher of its entries
        torch.testing.assert_close(
            mask.fisher[name], fisher[name].flatten()[idx] * scale, rtol=1e-4, atol=1e-12
        )
    record = mask.info.retain
    assert record.labels == labels and record.damping == damping
    assert record.sources[0].file == "general.txt" and record.sources[0].examples == 4


def test_sampled_and_empirical_labels_differ(tiny, code_data, general_data):
    folder = str(tiny("llama"))
    masks = [
        score_checkpoint(
            folder,
            code_data,
            ScoreOptions(method="piece-r", density=0.02, retain_labels=lab),
            retain=[general_data],
        ).mask
        for lab in ("empirical", "sampled")
    ]
    assert masks[0].info.retain.damping_value != masks[1].info.retain.damping_value


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 1e-30, 1e-8, 0.5, 0.5, 2.0, 3e38]) | st.floats(0, 10), min_size=1, max_size=40
    ),
    q=st.floats(0, 1),
    split=st.integers(0, 40),
)
def test_quantile_matches_sorting(values, q, split):
    t = torch.tensor(values, dtype=torch.float32)
    tensors = {"a": t[:split], "b": t[split:]}
    expected = float(t.sort().values[math.floor(q * (t.numel() - 1))])
    assert quantile(tensors, q) == expected


def test_self_text_is_seeded_and_recorded(tiny, code_data, tmp_path):
    from piece_surgery.scoring.retain import sample_self

    checkpoint = open_checkpoint(tiny("llama"))
    model, tokenizer = (
        checkpoint.load_model(device="cpu", dtype="float32").module,
        checkpoint.load_tokenizer(),
    )
    a, b, c = (sample_self(model, tokenizer, samples=5, length=7, seed=seed) for seed in (3, 3, 4))
    assert [e.input_ids for e in a.examples] == [e.input_ids for e in b.examples]
    assert [e.input_ids for e in a.examples] != [e.input_ids for e in c.examples]
    assert len(a.examples) == 5 and all(len(e.input_ids) == 8 for e in a.examples)
    assert a.sha256 == b.sha256 != c.sha256
    options = ScoreOptions(method="piece-r", density=0.02, self_samples=5, self_length=7, seed=3)
    out = tmp_path / "m.safetensors"
    score_checkpoint(
        str(tiny("llama")), code_data, options, retain=["self"], output=out, run=RunOptions(device="cpu")
    )
    record = load_mask(out).info.retain
    assert record.self_sampling == {"seed": 3, "samples": 5, "length": 7}
    assert record.sources[0].file == "self" and record.sources[0].sha256 == a.sha256


def test_chat_text_is_the_models_answers_seeded_and_recorded(tiny, code_data, tmp_path, cli):
    """--retain chat: the model's own answers to the shipped instructions, through its chat
    template, with the loss on the answers; the same for the same seed; recorded in the mask."""
    from piece_surgery.data.examples import IGNORE
    from piece_surgery.scoring.retain import instructions, sample_chat

    checkpoint = open_checkpoint(tiny("llama"))
    model, tokenizer = (
        checkpoint.load_model(device="cpu", dtype="float32").module,
        checkpoint.load_tokenizer(),
    )
    a, b, c = (sample_chat(model, tokenizer, length=6, seed=seed, max_length=256) for seed in (3, 3, 4))
    asked = [json.loads(line)["instruction"] for line in instructions().read_text().splitlines()]
    assert a.read == len(asked) == 64 and a.sha256 == b.sha256 != c.sha256
    assert len(a.examples) == 64 and a.skipped == 0
    found = []
    for example in a.examples:  # each asks one instruction, outside the loss, and answers it
        text = tokenizer.decode(example.input_ids)
        found += [instruction for instruction in asked if instruction in text]
        answer = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
        assert answer and not any(instruction in tokenizer.decode(answer) for instruction in asked)
    assert sorted(found) == sorted(asked)
    out = tmp_path / "m.safetensors"
    args = ["score", tiny("llama"), "--data", code_data, "-o", out, "-q", "--retain", "chat", "--seed", "3"]
    assert cli(*args, "--self-length", "6", "--max-length", "64")[0] == 0
    record = load_mask(out).info.retain
    assert record.chat_sampling == {"seed": 3, "instructions": 64, "length": 6}
    at_64 = sample_chat(model, tokenizer, length=6, seed=3, max_length=64)  # as the CLI ran it
    assert record.sources[0].file == "chat" and record.sources[0].sha256 == at_64.sha256
    assert record.sources[0].examples == len(at_64.examples) < 64  # the longest instructions leave no room
    no_template = shutil.copytree(tiny("llama"), tmp_path / "plain")
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "plain.txt").write_text("def f(x):\n    return x + 1\n")  # data that needs no template
    args[1], args[3], args[5] = no_template, tmp_path / "plain.txt", tmp_path / "n.safetensors"
    assert_clean_failure(
        cli(*args), "needs a tokenizer with a chat template", output=tmp_path / "n.safetensors"
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_answers_written_in_a_batch_are_those_written_one_by_one(tiny, family):
    """--retain chat writes answers a batch at a time, left-padded: greedy, each answer is the one
    the model writes to its prompt alone (a plain generate per prompt), cut at its first stop token."""
    from transformers import GenerationConfig

    from piece_surgery.scoring.retain import _prompt_ids, _stop_ids, generate_answers

    checkpoint = open_checkpoint(tiny(family))
    model = checkpoint.load_model(device="cpu", dtype="float32").module.eval()
    tokenizer = checkpoint.load_tokenizer()
    stops = _stop_ids(model, tokenizer)
    asked = ["Hi.", "Name three rivers of Europe and the seas they flow into.", "Why?"]
    prompts = [_prompt_ids(tokenizer, text) for text in asked]
    assert len({len(p) for p in prompts}) == 3  # padding is exercised
    config = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=checkpoint.pad_id)
    config.eos_token_id = sorted(stops)
    with torch.no_grad():
        batched = generate_answers(model, prompts, config, checkpoint.pad_id, stops)
        for prompt, answer in zip(prompts, batched, strict=True):
            ids = torch.tensor([prompt])
            alone = [
                int(t)
                for t in model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[
                    0, len(prompt) :
                ]
            ]
            cut = next((j for j, t in enumerate(alone) if t in stops), len(alone))
            assert answer == alone[:cut] and not stops & set(answer)


@pytest.mark.parametrize(
    ("family", "template", "closer"), [("gemma", "gemma3", "<end_of_turn>"), ("phi3", "phi3_5", "<|end|>")]
)
def test_an_answer_stops_at_the_templates_end_of_turn(family, template, closer):
    """A base model's config may name only EOS: the special token the chat template closes an
    assistant turn with stops an answer too."""
    from pathlib import Path

    from piece_surgery.models.tiny import tiny_tokenizer
    from piece_surgery.scoring.retain import _stop_ids

    fixture = Path(__file__).parent.parent / "fixtures" / "chat_templates" / f"{template}.jinja"
    tokenizer = tiny_tokenizer(chat_family=family, chat_template=fixture.read_text())
    closing = tokenizer.convert_tokens_to_ids(closer)
    assert closing != tokenizer.eos_token_id
    assert _stop_ids(torch.nn.Linear(1, 1), tokenizer) == {tokenizer.eos_token_id, closing}


def test_chat_answers_fit_the_context_and_max_length_or_fail_in_one_line(tiny, code_data, tmp_path, cli):
    """GPT-2's 128 absolute positions: an answer is cut to what its instruction leaves (it used to
    index past the position table); a --max-length no instruction fits in is one line, not a mask
    of no retain text that inspect and train then refuse."""
    out = tmp_path / "m.safetensors"
    code, _, err = cli("score", tiny("gpt2"), "--data", code_data, "-o", out, "-q", "--retain", "chat")
    assert code == 0, err
    record = load_mask(out).info.retain
    assert record.sources[0].examples > 0 and math.isfinite(record.fisher_scale)
    for length in ("8", "32"):
        args = ["score", tiny("llama"), "--data", code_data, "-o", tmp_path / f"m{length}.safetensors"]
        result = cli(*args, "--retain", "chat", "--max-length", length)
        assert_clean_failure(result, f"--retain chat: no answer fits in {length} tokens", output=args[-1])


def test_a_pad_token_past_the_embedding_table_pads_with_one_inside_it(tiny, code_data, tmp_path, cli):
    """A pad token added to the tokenizer of a model not resized: padded positions are masked out,
    so batches pad with EOS instead of indexing past the table (score, train, --retain chat)."""
    from transformers import AutoTokenizer

    folder = shutil.copytree(tiny("llama"), tmp_path / "padded")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "<newpad>"})
    tokenizer.save_pretrained(folder)
    assert tokenizer.pad_token_id >= open_checkpoint(folder).vocab_size()
    assert open_checkpoint(folder).pad_id == tokenizer.eos_token_id
    out = tmp_path / "m.safetensors"
    retain = ["--retain", "chat", "--retain", "general", "--batch-size", "2"]
    code, _, err = cli("score", folder, "--data", code_data, "-o", out, "-q", *retain)
    assert code == 0, err
    code, _, err = cli(
        "train", folder, "--data", code_data, "--mask", out, "-o", tmp_path / "d", "--max-steps", "1", "-q"
    )
    assert code == 0, err


def test_the_default_is_piece_r_keeping_the_shipped_general_text(tiny, code_data, tmp_path, cli):
    """Without --method or --retain, score and train select with piece-r on the shipped general set
    (every example of it, whatever the model's context); with --retain self, a text is never
    longer than the model's context (GPT-2's 128 positions) or --max-length."""
    import hashlib

    from piece_surgery.scoring.methods import DEFAULT_METHOD
    from piece_surgery.scoring.retain import general_text

    assert DEFAULT_METHOD == ScoreOptions().method == "piece-r"
    out = tmp_path / "m.safetensors"
    assert cli("score", tiny("gpt2"), "--data", code_data, "-o", out, "-q")[0] == 0
    info = load_mask(out).info
    shipped = general_text().read_bytes()
    assert info.method == "piece-r" and [s.file for s in info.retain.sources] == ["general"]
    assert info.retain.sources[0].sha256 == hashlib.sha256(shipped).hexdigest()
    assert info.retain.sources[0].examples == len(shipped.splitlines()) == 128
    assert info.retain.self_sampling is None
    self_text = ["--retain", "self", "--self-samples", "2", "--overwrite"]
    assert cli("score", tiny("gpt2"), "--data", code_data, "-o", out, "-q", *self_text)[0] == 0
    info = load_mask(out).info
    assert info.retain.sources[0].file == "self"
    assert info.retain.self_sampling == {"seed": 0, "samples": 2, "length": 127}  # 128 positions
    short = ["--max-length", "32", *self_text]
    assert cli("score", tiny("llama"), "--data", code_data, "-o", out, "-q", *short)[0] == 0
    assert load_mask(out).info.retain.self_sampling["length"] == 31
    delta = tmp_path / "delta"
    code, report, _ = cli(
        "train", tiny("llama"), "--data", code_data, "-o", delta, "--max-steps", "1", "--json"
    )
    report = json.loads(report)
    assert code == 0 and report["method"] == "piece-r"
    hyper = json.loads((delta / "delta.json").read_text())["provenance"]["hyperparameters"]
    assert hyper["lr"] == 1e-3  # piece-r's default learning rate; PIECE-S masks train at 1e-4
    assert hyper["retain_weight"] == 100.0  # the mask carries the retain Fisher: the penalty is on
    assert (
        cli(
            "score", tiny("llama"), "--data", code_data, "-o", out, "-q", "--method", "piece-s", "--overwrite"
        )[0]
        == 0
    )
    assert (
        cli(
            "train",
            tiny("llama"),
            "--data",
            code_data,
            "-o",
            delta,
            "--mask",
            out,
            "--max-steps",
            "1",
            "-q",
            "--overwrite",
        )[0]
        == 0
    )
    hyper = json.loads((delta / "delta.json").read_text())["provenance"]["hyperparameters"]
    assert hyper["lr"] == 1e-4 and hyper["retain_weight"] == 0.0  # no Fisher, no penalty


def test_avoid_excludes_exactly_the_avoided_entries(tiny, code_data, tmp_path, cli):
    folder = tiny("llama")
    first = tmp_path / "first.safetensors"
    assert cli("score", folder, "--data", code_data, "-o", first, "--density", "0.01", "-q")[0] == 0
    avoided = load_mask(first).indices
    options = ScoreOptions(method="piece-s", density=0.01)
    mask, _, _ = score_checkpoint(
        str(folder), code_data, options, avoid=[str(first)], run=RunOptions(device="cpu")
    )
    scores = brute_force_scores(folder, code_data, "piece-s", batch_size=1)
    for name, idx in avoided.items():
        scores[name].view(-1)[idx] = -1.0  # below every real score: never among the top k
    assert as_lists(mask.indices) == brute_force_top_k(scores, mask.k)
    for name, idx in mask.indices.items():
        assert not set(idx.tolist()) & set(avoided.get(name, torch.tensor([])).tolist())
    assert mask.info.avoid[0].kind == "mask" and mask.info.avoid[0].entries == sum(
        i.numel() for i in avoided.values()
    )
    assert mask.info.avoid[0].name == "first.safetensors"  # the file, not one of its tensors
    second = tmp_path / "second.safetensors"
    assert cli("score", folder, "--data", code_data, "-o", second, "-q", "--avoid", first)[0] == 0
    code, shown, err = cli("inspect", second)
    assert code == 0, err
    assert f"avoided: first.safetensors (mask, {mask.info.avoid[0].entries:,} entries)" in shown
    code, shown, _ = cli("inspect", second, "--json")
    assert json.loads(shown)["avoid"] == [mask.info.avoid[0].to_json()]
    (tmp_path / "sub").mkdir()
    for again in (first, f"{tmp_path}/sub/../first.safetensors"):  # the same file, however spelled
        result = cli(
            "score",
            folder,
            "--data",
            code_data,
            "-o",
            tmp_path / "third.safetensors",
            "--avoid",
            first,
            "--avoid",
            again,
        )
        assert_clean_failure(result, "is the same file as --avoid", output=tmp_path / "third.safetensors")


def piece_r_mask(folder, code_data, general_data, path):
    options = ScoreOptions(method="piece-r", density=0.05)
    score_checkpoint(
        str(folder), code_data, options, retain=[general_data], output=path, run=RunOptions(device="cpu")
    )
    return load_mask(path)


def test_predicted_drift_is_half_sum_of_fisher_times_squared_change(
    tiny, code_data, general_data, tmp_path, cli
):
    from piece_surgery.formats.delta_folder import load_delta

    folder = tiny("llama")
    mask = piece_r_mask(folder, code_data, general_data, tmp_path / "m.safetensors")
    code, stdout, err = cli(
        "train", folder, "--data", code_data, "--mask", tmp_path / "m.safetensors", "-o", tmp_path / "d",
        "--lr", "1e-2", "--max-steps", "4", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    delta = load_delta(tmp_path / "d")
    expected = 0.0
    for name, t in delta.tensors.items():
        fisher = mask.fisher[name][torch.searchsorted(mask.indices[name], t.indices)]
        expected += 0.5 * float((fisher.double() * t.change() ** 2).sum())
    reported = json.loads(stdout)["predicted_drift"]
    assert expected > 0 and reported == pytest.approx(expected, rel=1e-5)
    assert delta.info.provenance.predicted_drift == pytest.approx(expected, rel=1e-5)


def test_drift_budget_stops_training(tiny, code_data, general_data, tmp_path, cli):
    folder = tiny("llama")
    piece_r_mask(folder, code_data, general_data, tmp_path / "m.safetensors")
    common = [
        "--data",
        code_data,
        "--mask",
        tmp_path / "m.safetensors",
        "--lr",
        "1e-2",
        "--batch-size",
        "1",
        "-q",
    ]
    code, stdout, _ = cli("train", folder, *common, "-o", tmp_path / "full", "--max-steps", "10", "--json")
    full = json.loads(stdout)
    assert code == 0 and full["steps"] == 10 and not full["stopped_by_drift_budget"]
    budget = full["predicted_drift"] / 3
    code, stdout, _ = cli(
        "train",
        folder,
        *common,
        "-o",
        tmp_path / "cut",
        "--max-steps",
        "10",
        "--json",
        "--drift-budget",
        str(budget),
        "--budget-on",
        "predicted",
    )
    cut = json.loads(stdout)
    assert code == 0 and cut["stopped_by_drift_budget"] and cut["steps"] < 10
    # the last step within the budget is kept; the next one passed it
    assert cut["predicted_drift"] <= budget < cut["drift_budget_passed"]["drift"]
    assert cut["drift_budget_passed"]["step"] == cut["steps"] + 1


def test_retain_weight_adds_its_gradient_and_drifts_less(tiny, code_data, general_data, tmp_path):
    from piece_surgery.training.budget import DriftEstimate
    from piece_surgery.training.sparse_grad import SparseParameters

    params = {"w": torch.nn.Parameter(torch.zeros(4, 3))}
    sparse = SparseParameters(params, {"w": torch.tensor([1, 4, 10])})
    drift = DriftEstimate(sparse, {"w": torch.tensor([2.0, 0.5, 3.0])})
    with torch.no_grad():
        sparse.values["w"] += torch.tensor([0.1, -0.2, 0.3])
    drift.add_penalty_gradient(4.0)
    torch.testing.assert_close(
        sparse.values["w"].grad, 4.0 * torch.tensor([2.0, 0.5, 3.0]) * torch.tensor([0.1, -0.2, 0.3])
    )
    assert drift.value() == pytest.approx(0.5 * (2.0 * 0.01 + 0.5 * 0.04 + 3.0 * 0.09))

    from piece_surgery.recipes.train import train_checkpoint
    from piece_surgery.training.config import TrainConfig

    folder = tiny("llama")
    piece_r_mask(folder, code_data, general_data, tmp_path / "m.safetensors")
    runs = {}
    for weight in (0.0, 1e4):
        config = TrainConfig(lr=1e-2, max_steps=4, batch_size=2, retain_weight=weight)
        runs[weight] = train_checkpoint(
            str(folder), code_data, tmp_path / f"d{weight}", config, mask_ref=str(tmp_path / "m.safetensors")
        ).result.predicted_drift
    assert runs[1e4] < runs[0.0]


def test_the_fisher_travels_in_the_mask_file(tiny, code_data, general_data, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    mask = piece_r_mask(tiny("llama"), code_data, general_data, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert {f"{n}::fisher" for n in mask.indices} <= keys
    save_mask(mask, tmp_path / "again.safetensors")
    again = load_mask(tmp_path / "again.safetensors")
    assert all(torch.equal(again.fisher[n], mask.fisher[n]) for n in mask.indices)
    tensors["model.norm.weight::a-future-extra"] = torch.zeros(3)  # extras a reader does not know
    save_file(tensors, tmp_path / "extra.safetensors", metadata=meta)
    assert as_lists(load_mask(tmp_path / "extra.safetensors").indices) == as_lists(mask.indices)


def test_bad_retain_input(tiny, code_data, general_data, tmp_path, cli):
    folder = tiny("llama")
    out = tmp_path / "m.safetensors"
    base = ["score", folder, "--data", code_data, "-o", out, "-q", "--method", "piece-r"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_clean_failure(cli(*base, "--retain", tmp_path / "missing.txt"), "not found", output=out)
    assert_clean_failure(cli(*base, "--retain", empty), "has no examples", output=out)
    for damping in ("-0.1", "1.5", "nan"):
        result = cli(*base, "--retain", general_data, f"--retain-damping={damping}")
        assert_clean_failure(result, "is a quantile: give a number in [0, 1]", output=out)
    other = ["score", folder, "--data", code_data, "-o", out, "-q", "--method", "piece-s"]
    for extra in (["--retain", general_data], ["--retain-damping", "0.5"], ["--self-samples", "4"]):
        assert_clean_failure(cli(*other, *extra), "is for --method piece-r (got piece-s)", output=out)
    for retain in (["--retain", general_data], []):  # a file, or the default (the shipped set)
        result = cli(*base, *retain, "--self-samples", "4")
        assert_clean_failure(result, "--self-samples is for --retain self: add --retain self", output=out)
        result = cli(*base, *retain, "--self-length", "4")
        assert_clean_failure(result, "--self-length is for --retain self or --retain chat", output=out)
    result = cli(*base, "--retain", "chat", "--self-samples", "4")
    assert_clean_failure(result, "--self-samples is for --retain self", output=out)
    assert cli("score", tiny("gpt2"), "--data", code_data, "-o", tmp_path / "g.safetensors", "-q")[0] == 0
    result = cli(*base, "--retain", general_data, "--avoid", tmp_path / "g.safetensors")
    assert_clean_failure(result, "which this model does not have", output=out)
    (general_data.parent / "sub").mkdir()
    spelled = general_data.parent / "sub" / ".." / general_data.name  # the same file, spelled otherwise
    from piece_surgery.scoring.retain import general_text

    shipped = ["general", general_text()]  # the shipped set by name and by path
    for twice in (["chat", "chat"], ["general", "general"], [general_data, spelled], shipped):
        result = cli(*base, "--retain", twice[0], "--retain", twice[1])
        assert_clean_failure(result, "is the same set as --retain", output=out)


def test_defaults_fill_only_what_was_not_given():
    from piece_surgery.training.config import DEFAULT_RETAIN_WEIGHT, TrainConfig

    filled = TrainConfig().for_mask("piece-r", carries_fisher=True)
    assert (filled.lr, filled.retain_weight) == (1e-3, DEFAULT_RETAIN_WEIGHT)
    assert TrainConfig().for_mask("piece-r", carries_fisher=False).retain_weight == 0.0
    assert TrainConfig().for_mask("piece-s", carries_fisher=False).lr == 1e-4
    given = TrainConfig(lr=5e-3, retain_weight=0.0).for_mask("piece-r", carries_fisher=True)
    assert (given.lr, given.retain_weight) == (5e-3, 0.0)


def test_the_shipped_general_text_is_a_retain_set(tiny, code_data):
    """--retain general reads the set shipped in the package, and the mask records it by name and
    by the file's sha256 (every text of it, none cut by --max-samples)."""
    from piece_surgery.runtime.json_files import file_sha256
    from piece_surgery.scoring.retain import general_text

    options = ScoreOptions(method="piece-r", density=0.02)
    mask = score_checkpoint(
        str(tiny("llama")),
        code_data,
        options,
        RunOptions(device="cpu", max_length=64, max_samples=2),
        retain=["general"],
    ).mask
    (source,) = mask.info.retain.sources
    lines = [line for line in general_text().read_text().splitlines() if line.strip()]
    assert source.file == "general" and source.sha256 == file_sha256(general_text())
    assert source.examples == len(lines) == 128 and mask.info.retain.self_sampling is None
