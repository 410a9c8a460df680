"""Exact on the checkpoints users really have (issue 20): tied pairs in every form, layouts, stray
files, imports that are not what the adapter holds. Each case is checked against an independent
computation: the logits of the model in memory against the merged folder loaded by transformers."""

import shutil
import warnings

import pytest
import torch
from helpers import IDS, assert_clean_failure, peft_adapter, read_all
from safetensors.torch import load_file, save_file

from piece_surgery.formats.artifacts import open_delta
from piece_surgery.merging.live import apply_to_model
from piece_surgery.merging.switcher import DeltaSwitcher
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.runtime.errors import PieceError

# each tied family: (the embedding as stored, the head's name)
TIED = {
    "qwen2": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
    "gemma3": ("model.embed_tokens.weight", "lm_head.weight"),
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),  # built tied for these tests
}


def tied_model(tiny, tmp_path, arch, *, both: bool):
    """A tied checkpoint whose file stores the embedding once, or both it and the head."""
    from piece_surgery.models.tiny import make_tiny_checkpoint

    if arch == "llama":
        folder = make_tiny_checkpoint(tmp_path / "llama-tied", "llama", tie_word_embeddings=True)
    else:
        folder = shutil.copytree(tiny(arch), tmp_path / f"{arch}-tied")
    if both:
        embed, head = TIED[arch]
        tensors = load_file(folder / "model.safetensors")
        tensors[head] = tensors[embed].clone()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def logits_of(folder):
    """What transformers gives for the folder (loaded as users load it)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()  # "will NOT tie them": what the test wants
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def in_memory_logits(folder, delta):
    model = open_checkpoint(str(folder)).load_model(device="cpu").module.eval()
    apply_to_model(model, delta)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gemma3", "llama"])
@pytest.mark.parametrize("both", [True, False])
def test_a_trained_tied_embedding_is_the_same_model_in_memory_and_merged(tiny, tmp_path, cli, arch, both):
    """score --include the embedding, train, apply: when the file stores the head too, the delta
    changes both stored copies (else transformers unties them on loading and the head keeps its old
    values); the merged folder's logits are the in-memory model's, bit for bit."""
    base = tied_model(tiny, tmp_path, arch, both=both)
    embed, head = TIED[arch]
    data = tmp_path / "d.txt"
    data.write_text("def add(a, b):\n    return a + b\nimport os\nclass Model:\n    pass\n")
    mask = tmp_path / "m.safetensors"
    args = ["score", base, "-o", mask, "--method", "magnitude", "--include", embed.replace(".", r"\."), "-q"]
    assert cli(*args, "--density", "0.02")[0] == 0
    train = ["train", base, "--data", data, "--mask", mask, "-o", tmp_path / "delta", "-q"]
    assert cli(*train, "--lr", "1e-2", "--max-steps", "3", "--batch-size", "2")[0] == 0
    delta = open_delta(tmp_path / "delta")
    assert set(delta.tensors) == ({embed, head} if both else {embed})
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    merged = logits_of(tmp_path / "merged")
    assert not torch.equal(merged, logits_of(base))  # the training changed what the model says
    assert torch.equal(merged, in_memory_logits(base, delta))
    model = open_checkpoint(str(base)).load_model(device="cpu").module.eval()
    switcher = DeltaSwitcher(model)
    switcher.add("d", delta)
    with switcher.using("d"), torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, merged)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "gpt2"])
def test_an_adapter_that_trains_the_head_of_a_tied_model(tiny, tmp_path, cli, arch):
    """modules_to_save on the head of a tied model: stored twice, the import changes the head's copy
    alone and the merged folder gives PEFT's logits; stored once, a delta cannot untie the pair, and
    the import says so (it used to drop the head and exit 0)."""
    embed, head = TIED[arch]
    for both in (True, False):
        base = tied_model(tiny, tmp_path / str(both), arch, both=both)
        expected = peft_adapter(base, tmp_path / f"adapter-{both}", modules_to_save=["lm_head"], arch=arch)
        out = tmp_path / f"imported-{both}"
        result = cli("import", tmp_path / f"adapter-{both}", "--base", base, "-o", out, "-q")
        if not both:
            assert_clean_failure(result, "cannot untie them", output=out)
            continue
        assert result[0] == 0, result[2]
        assert head in open_delta(out).tensors
        assert cli("apply", base, out, "-o", tmp_path / "merged", "-q")[0] == 0
        torch.testing.assert_close(logits_of(tmp_path / "merged"), expected, rtol=0, atol=1e-5)


def test_an_adapter_file_missing_or_adding_tensors_is_refused(tiny, tmp_path, cli):
    base = tiny("qwen2")
    peft_adapter(base, tmp_path / "adapter", modules_to_save=None)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    out = tmp_path / "d"
    assert_clean_failure(
        cli("import", tmp_path / "adapter", "--base", base, "-o", out), f"first: '{name}'", output=out
    )
    save_file({**tensors, "base_model.model.stray.lora_A.weight": torch.zeros(2, 2)}, weights)
    assert_clean_failure(
        cli("import", tmp_path / "adapter", "--base", base, "-o", out),
        "holds tensors for modules this base does not have (first: 'stray')",
        output=out,
    )
    save_file({}, weights)
    assert_clean_failure(
        cli("import", tmp_path / "adapter", "--base", base, "-o", out), "lacks 8 of the tensors", output=out
    )


def legacy_gpt2(tiny, folder):
    """GPT-2 as its original checkpoints store it: names without the `transformer.` prefix, and the
    attention's causal-mask buffers stored beside the weights (loading ignores them)."""
    tensors = load_file(tiny("gpt2") / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for layer in range(2):
        legacy[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    shutil.copytree(tiny("gpt2"), folder)
    save_file(legacy, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_legacy_names_and_stored_buffers_work_as_loading_does(tiny, tmp_path, cli, code_data):
    base = legacy_gpt2(tiny, tmp_path / "legacy")
    mask, delta, merged = tmp_path / "m.safetensors", tmp_path / "delta", tmp_path / "merged"
    assert (
        cli("score", base, "--data", code_data, "-o", mask, "--method", "piece-s", "--density", "0.02", "-q")[
            0
        ]
        == 0
    )
    assert cli("train", base, "--data", code_data, "--mask", mask, "-o", delta, "--lr", "1e-2", "-q")[0] == 0
    assert all(not name.startswith("transformer.") for name in open_delta(delta).tensors)  # as stored
    assert cli("apply", base, delta, "-o", merged, "-q")[0] == 0
    assert torch.equal(logits_of(merged), in_memory_logits(base, open_delta(delta)))
    assert torch.equal(read_all(merged)["h.0.attn.bias"], read_all(base)["h.0.attn.bias"])
    # the tuned model saved by today's transformers: prefixed names, no buffers; diff pairs them
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged).save_pretrained(tmp_path / "resaved")
    again = tmp_path / "again"
    assert cli("diff", base, tmp_path / "resaved", "-o", again, "-q")[0] == 0
    assert {n: t.indices.tolist() for n, t in open_delta(again).tensors.items()} == {
        n: t.indices.tolist() for n, t in open_delta(delta).tensors.items()
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma3"])
def test_a_single_shard_with_an_index_keeps_its_index(tiny, tmp_path, cli, arch):
    """mergekit and others write model-00001-of-00001.safetensors and an index: so does apply."""
    from helpers import perturb

    from piece_surgery.io.sniff import INDEX_FILE

    base = shutil.copytree(tiny(arch), tmp_path / "base")
    names = list(load_file(base / "model.safetensors"))
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    import json

    index = {
        "metadata": {"total_size": 0},
        "weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors"),
    }
    (base / INDEX_FILE).write_text(json.dumps(index))
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    assert (tmp_path / "merged" / INDEX_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == [
        "model-00001-of-00001.safetensors"
    ]
    assert torch.equal(logits_of(tmp_path / "merged"), logits_of(tuned))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_merged_folder_holds_what_belongs_to_the_model_and_nothing_else(tiny, tmp_path, cli, arch):
    """A stale pickle, an optimizer state or a PEFT adapter's files beside the base are not copied:
    a loader could pick them up instead of the merged weights."""
    from helpers import perturb

    base = shutil.copytree(tiny(arch), tmp_path / "base")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    for stray in ("pytorch_model.bin", "optimizer.pt", "trainer_state.json", "notes.txt"):
        (base / stray).write_bytes(b"stale")
    (base / "LICENSE").write_text("the base's licence\n")
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    merged = {p.name for p in (tmp_path / "merged").iterdir()}
    assert merged == {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "LICENSE",
        "piece-surgery-recipe.yaml",
        "README.md",
    } | ({"special_tokens_map.json"} & {p.name for p in base.iterdir()}) | (
        {"chat_template.jinja"} & {p.name for p in base.iterdir()}
    )


def test_a_base_folder_that_holds_an_adapter_is_refused_before_any_work(tiny, tmp_path, cli, code_data):
    base = shutil.copytree(tiny("qwen2"), tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter", modules_to_save=None)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, base / name)
    for args in (
        ("score", base, "--data", code_data, "-o", tmp_path / "m.safetensors"),
        ("apply", base, tmp_path / "adapter", "-o", tmp_path / "merged"),
        ("diff", base, tiny("qwen2"), "-o", tmp_path / "d"),
    ):
        assert_clean_failure(cli(*args), "also holds a PEFT adapter (adapter_config.json)")


@pytest.mark.parametrize(
    "policy, arch", [("sum", "llama"), ("mean", "gemma3"), ("ties", "gpt2"), ("error", "qwen2")]
)
def test_the_conflict_policy_holds_on_another_base_with_force(tiny, tmp_path, cli, policy, arch):
    """Two deltas made side by side from one base, applied with --force onto another: the entries
    both change follow --on-conflict (it used to be the plain sum, with '0 conflicting')."""
    import json

    from helpers import perturb

    base = tiny(arch)
    t1 = perturb(base, tmp_path / "t1", fraction=0.3, seed=1, hard=False)
    t2 = perturb(base, tmp_path / "t2", fraction=0.3, seed=2, hard=False)
    other = perturb(base, tmp_path / "other", fraction=1.0, seed=3, hard=False)  # another base everywhere
    for i, t in ((1, t1), (2, t2)):
        assert cli("diff", base, t, "-o", tmp_path / f"d{i}", "-q")[0] == 0
    out = tmp_path / "merged"
    args = [
        "apply",
        other,
        tmp_path / "d1",
        tmp_path / "d2",
        "-o",
        out,
        "--force",
        "--on-conflict",
        policy,
        "--json",
    ]
    code, stdout, stderr = cli(*args)
    if policy == "error":
        assert_clean_failure((code, stdout, stderr), "choose --on-conflict sum, mean or ties", output=out)
        return
    assert code == 0, stderr
    report = json.loads(stdout)
    b, w1, w2, o, got = (read_all(f) for f in (base, t1, t2, other, out))
    conflicts = 0
    for name in b:
        c1 = (w1[name].double() - b[name].double()).view(-1)
        c2 = (w2[name].double() - b[name].double()).view(-1)
        both = (c1 != 0) & (c2 != 0)
        conflicts += int(both.sum())
        if policy == "sum":
            change = c1 + c2
        elif policy == "mean":
            change = torch.where(both, (c1 + c2) / 2, c1 + c2)
        else:  # ties: the changes that agree with the sign of their sum
            summed = c1 + c2
            agreeing = [torch.where(torch.sign(c) == torch.sign(summed), c, 0.0) for c in (c1, c2)]
            change = torch.where(both, agreeing[0] + agreeing[1], summed)
        expected = (o[name].double().view(-1) + change).to(o[name].dtype)
        assert torch.equal(got[name].view(-1), expected), name
    assert report["overlap"]["conflicts"] == conflicts > 0


@pytest.mark.parametrize("policy", ["error", "sum"])
def test_the_conflict_policy_holds_for_deltas_made_from_different_bases(tiny, tmp_path, cli, policy):
    """A delta from the base and one from another base, applied with --force: the entries both
    change are conflicts, so --on-conflict error refuses them (it used to count them and write
    their sum, exit 0) and sum adds both changes to the base."""
    import json

    from helpers import perturb

    base = tiny("llama")
    other = perturb(base, tmp_path / "other", fraction=1.0, seed=3, hard=False)
    t1 = perturb(base, tmp_path / "t1", fraction=0.3, seed=1, hard=False)
    t2 = perturb(other, tmp_path / "t2", fraction=0.3, seed=2, hard=False)
    assert cli("diff", base, t1, "-o", tmp_path / "d1", "-q")[0] == 0
    assert cli("diff", other, t2, "-o", tmp_path / "d2", "-q")[0] == 0
    out = tmp_path / "merged"
    args = ["apply", base, tmp_path / "d1", tmp_path / "d2", "-o", out, "--force", "--on-conflict", policy]
    result = cli(*args, "--json")
    if policy == "error":
        assert_clean_failure(result, "that an earlier delta also changes", output=out)
        return
    assert result[0] == 0, result[2]
    b, w1, o, w2, got = (read_all(f) for f in (base, t1, other, t2, out))
    conflicts = 0
    for name in b:
        c1 = (w1[name].double() - b[name].double()).view(-1)
        c2 = (w2[name].double() - o[name].double()).view(-1)
        conflicts += int(((c1 != 0) & (c2 != 0)).sum())
        both = (c1 != 0) & (c2 != 0)
        expected = torch.where(
            both, (b[name].double().view(-1) + c1 + c2).to(b[name].dtype), got[name].view(-1)
        )
        assert torch.equal(got[name].view(-1), expected), name
    assert json.loads(result[1])["overlap"]["conflicts"] == conflicts > 0


@pytest.mark.parametrize("command, arch", [("score", "llama"), ("train", "gpt2"), ("score", "gemma3")])
def test_a_tokenizer_larger_than_the_embedding_table_is_one_line(tiny, tmp_path, cli, command, arch):
    """Tokens added to the tokenizer, the model not resized: one line naming the largest id and the
    table's size, before the model is loaded (it used to be an IndexError traceback)."""
    from transformers import AutoTokenizer

    base = shutil.copytree(tiny(arch), tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = len(tokenizer)
    tokenizer.add_tokens(["<domain_term>"])
    tokenizer.save_pretrained(base)
    data = tmp_path / "d.txt"
    data.write_text("plain text\nwith a <domain_term> in it\n")
    out = tmp_path / ("m.safetensors" if command == "score" else "delta")
    assert_clean_failure(
        cli(command, base, "--data", data, "-o", out),
        f"has token id {rows}, but the model's embedding table has {rows} rows",
        output=out,
    )


def test_an_export_that_shira_cannot_hold_is_one_line(tiny, tmp_path, cli, code_data):
    """Only norm gains, or a LoRA's dense change (imported, then exported): a one-line refusal that
    says what to do (it used to be a PEFT traceback)."""
    base = tiny("llama")
    mask, delta = tmp_path / "m.safetensors", tmp_path / "norms"
    assert (
        cli(
            "score", base, "-o", mask, "--method", "magnitude", "--include", "norm", "--density", "0.5", "-q"
        )[0]
        == 0
    )
    assert cli("train", base, "--data", code_data, "--mask", mask, "-o", delta, "--lr", "1e-2", "-q")[0] == 0
    out = tmp_path / "adapter"
    assert_clean_failure(
        cli("export", delta, "--base", base, "-o", out),
        "changes no linear layer (only norm gains)",
        output=out,
    )
    qwen = tiny("qwen2")
    peft_adapter(qwen, tmp_path / "lora", modules_to_save=None)
    assert cli("import", tmp_path / "lora", "--base", qwen, "-o", tmp_path / "lora-delta", "-q")[0] == 0
    assert_clean_failure(
        cli("export", tmp_path / "lora-delta", "--base", qwen, "-o", out), "too dense for SHiRA", output=out
    )


def test_every_size_reported_is_the_size_written(tiny, tmp_path, cli):
    import json

    from helpers import perturb

    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01)
    for compact in (False, True):
        out = tmp_path / f"d{compact}"
        code, stdout, _ = cli("diff", base, tuned, "-o", out, "--json", *(["--compact"] if compact else []))
        report = json.loads(stdout)
        written = json.loads((out / "delta.json").read_text())["tensor_bytes"]
        on_disk = sum(t.numel() * t.element_size() for t in load_file(out / "delta.safetensors").values())
        assert code == 0 and report["tensor_bytes"] == written == on_disk
        assert report["bytes_per_entry"] == on_disk / report["entries"]
        assert report["bytes_per_entry"] < 5 if compact else report["bytes_per_entry"] == 8


@pytest.mark.parametrize("policy", ["sum", "mean", "ties"])
def test_a_stack_of_chained_and_side_by_side_deltas_is_the_same_in_any_order(tiny, tmp_path, cli, policy):
    """d1 and d2 made side by side from A, d3 made on A + d1: d3 extends d1's branch, whatever the
    order; entries several branches change get A + the policy over the branches' total changes."""
    from helpers import perturb

    base = tiny("llama")
    t1 = perturb(base, tmp_path / "t1", fraction=0.3, seed=1, hard=False)
    t2 = perturb(base, tmp_path / "t2", fraction=0.3, seed=2, hard=False)
    t3 = perturb(t1, tmp_path / "t3", fraction=0.3, seed=3, hard=False)
    for name, (a, b) in {"d1": (base, t1), "d2": (base, t2), "d3": (t1, t3)}.items():
        assert cli("diff", a, b, "-o", tmp_path / name, "-q")[0] == 0
    results = []
    for order in (("d1", "d3", "d2"), ("d1", "d2", "d3"), ("d2", "d1", "d3")):
        out = tmp_path / "-".join(order)
        code, _, err = cli(
            "apply", base, *(tmp_path / d for d in order), "-o", out, "--on-conflict", policy, "-q"
        )
        assert code == 0, err
        results.append(read_all(out))
    a, w1, w2, w3 = (read_all(f) for f in (base, t1, t2, t3))
    for name in a:
        c1 = (w1[name].double() - a[name].double()).view(-1)
        c2 = (w2[name].double() - a[name].double()).view(-1)
        c3 = (w3[name].double() - w1[name].double()).view(-1)
        chain = torch.where(c1 != 0, c1 + c3, c1)  # d3 extends d1 where d1 changed the entry
        alone3 = torch.where(c1 != 0, torch.zeros_like(c3), c3)  # else d3 is a branch of its own
        branches = torch.stack([chain, c2, alone3])
        present = torch.stack([(c1 != 0) | ((c1 != 0) & (c3 != 0)), c2 != 0, (c1 == 0) & (c3 != 0)])
        total, count = branches.sum(0), present.sum(0)
        if policy == "sum":
            change = total
        elif policy == "mean":
            change = total / count.clamp(min=1)
        else:
            agree = torch.where(torch.sign(branches) == torch.sign(total), branches, 0.0)
            change = agree.sum(0)
        single = count == 1
        last = torch.where(
            (c1 != 0) & (c3 != 0),
            w3[name].view(-1),
            torch.where(c1 != 0, w1[name].view(-1), w2[name].view(-1)),
        )
        last = torch.where((c1 == 0) & (c3 != 0), w3[name].view(-1), last)
        expected = torch.where(single, last, (a[name].double().view(-1) + change).to(a[name].dtype))
        expected = torch.where(count == 0, a[name].view(-1), expected)
        for result in results:
            assert torch.equal(result[name].view(-1), expected), name


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_a_delta_that_unties_a_pair_is_refused_in_memory(tiny, tmp_path, cli, arch):
    """An adapter that trained the head apart, imported onto a base storing both copies: the merged
    folder loads untied and matches PEFT; a tied model in memory cannot hold that, and says so."""
    base = tied_model(tiny, tmp_path, arch, both=True)
    peft_adapter(base, tmp_path / "adapter", modules_to_save=["lm_head"], arch=arch)
    assert cli("import", tmp_path / "adapter", "--base", base, "-o", tmp_path / "d", "-q")[0] == 0
    model = open_checkpoint(str(base)).load_model(device="cpu").module
    with pytest.raises(PieceError, match="load the two untied"):
        apply_to_model(model, open_delta(tmp_path / "d"))
    with pytest.raises(PieceError, match="load the two untied"):
        DeltaSwitcher(model).add("d", open_delta(tmp_path / "d"))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_a_delta_from_a_base_stored_once_changes_every_copy_of_another(tiny, tmp_path, cli, arch, code_data):
    """Trained on the tied embedding of a base storing it once, applied to the same model storing
    both copies: both change (the delta records that the head loaded as the embedding)."""
    once = tied_model(tiny, tmp_path / "once", arch, both=False)
    both = tied_model(tiny, tmp_path / "both", arch, both=True)
    embed, head = TIED[arch]
    mask, delta = tmp_path / "m.safetensors", tmp_path / "d"
    pattern = embed.replace(".", r"\.")
    assert cli("score", once, "-o", mask, "--method", "magnitude", "--include", pattern, "-q")[0] == 0
    assert cli("train", once, "--data", code_data, "--mask", mask, "-o", delta, "--lr", "1e-2", "-q")[0] == 0
    assert list(open_delta(delta).tensors) == [embed] and open_delta(delta).tensors[embed].loads_as == (head,)
    assert cli("apply", both, delta, "-o", tmp_path / "merged", "-q")[0] == 0
    merged = read_all(tmp_path / "merged")
    assert torch.equal(merged[embed], merged[head])
    assert torch.equal(logits_of(tmp_path / "merged"), in_memory_logits(once, open_delta(delta)))


def test_a_scalar_tensor_in_the_files_is_read(tiny, tmp_path, cli, code_data):
    """Buffers stored as 0-dim tensors (GPT-2's masked_bias) in a checkpoint transformers loads."""
    base = shutil.copytree(tiny("gpt2"), tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    tensors["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    mask = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", code_data, "-o", mask, "--method", "piece-s", "-q")[0] == 0
    assert cli("train", base, "--data", code_data, "--mask", mask, "-o", tmp_path / "d", "-q")[0] == 0
    assert cli("apply", base, tmp_path / "d", "-o", tmp_path / "merged", "-q")[0] == 0
    assert cli("diff", base, tmp_path / "merged", "-o", tmp_path / "again", "-q")[0] == 0
    assert float(read_all(tmp_path / "merged")["transformer.h.0.attn.masked_bias"]) == -1e4


def test_a_delta_with_legacy_names_applies_to_todays_files(tiny, tmp_path, cli, code_data):
    base = legacy_gpt2(tiny, tmp_path / "legacy")
    mask, delta = tmp_path / "m.safetensors", tmp_path / "d"
    assert (
        cli("score", base, "--data", code_data, "-o", mask, "--method", "piece-s", "--density", "0.02", "-q")[
            0
        ]
        == 0
    )
    assert cli("train", base, "--data", code_data, "--mask", mask, "-o", delta, "--lr", "1e-2", "-q")[0] == 0
    assert cli("apply", base, delta, "-o", tmp_path / "legacy-merged", "-q")[0] == 0
    assert (
        cli("apply", tiny("gpt2"), delta, "-o", tmp_path / "merged", "-q")[0] == 0
    )  # same weights, new names
    assert torch.equal(logits_of(tmp_path / "merged"), logits_of(tmp_path / "legacy-merged"))
    out = tmp_path / "avoiding.safetensors"
    assert (
        cli(
            "score",
            tiny("gpt2"),
            "--data",
            code_data,
            "-o",
            out,
            "--method",
            "piece-s",
            "--avoid",
            delta,
            "-q",
        )[0]
        == 0
    )


def test_scales_that_overflow_are_refused_in_memory_too(tiny, tmp_path):
    from helpers import perturb

    from piece_surgery.merging.diff import diff

    base = tiny("llama")
    delta = diff(str(base), str(perturb(base, tmp_path / "t", fraction=0.01)))
    model = open_checkpoint(str(base)).load_model(device="cpu").module
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PieceError, match="scales are too large"):
        apply_to_model(model, delta, scale=1e45)
    with pytest.raises(PieceError, match="scales are too large"):
        DeltaSwitcher(model).add("x", delta, scale=1e45)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # nothing was written


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_diff_pairs_a_tied_weight_stored_once_with_the_same_stored_twice(tiny, tmp_path, cli, arch):
    """Files that differ only in storing a tied pair once or twice load as the same model: diff
    pairs them, both ways; a head stored apart with other values cannot be expressed, and says so."""
    embed, head = TIED[arch]
    once = tied_model(tiny, tmp_path / "once", arch, both=False)
    both = tied_model(tiny, tmp_path / "both", arch, both=True)
    code, _, err = cli("diff", once, both, "-o", tmp_path / "d1")
    assert code == 2 and "identical" in err  # the same model: no delta
    tuned = tied_model(tiny, tmp_path / "tuned", arch, both=False)
    tensors = load_file(tuned / "model.safetensors")
    tensors[embed][3] += 0.5
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    assert cli("diff", both, tuned, "-o", tmp_path / "d2", "-q")[0] == 0
    assert set(open_delta(tmp_path / "d2").tensors) == {embed, head}  # both stored copies change
    assert cli("apply", both, tmp_path / "d2", "-o", tmp_path / "m2", "-q")[0] == 0
    assert torch.equal(logits_of(tmp_path / "m2"), logits_of(tuned))
    untied = tied_model(tiny, tmp_path / "untied", arch, both=True)
    tensors = load_file(untied / "model.safetensors")
    tensors[head][3] += 0.5
    save_file(tensors, untied / "model.safetensors", metadata={"format": "pt"})
    assert_clean_failure(cli("diff", once, untied, "-o", tmp_path / "d3"), "cannot untie them")


def test_texts_longer_than_the_context_are_cut_at_it(tiny, tmp_path, cli):
    """GPT-2's learned position table has 128 rows here: a text past it, with --max-length 512,
    is cut at 128 tokens (it used to index past the table), and the record says so."""
    import json

    from piece_surgery.formats.mask import load_mask

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 80}) + "\n")
    out = tmp_path / "m.safetensors"
    result = cli("score", tiny("gpt2"), "--data", data, "-o", out, "--method", "piece-s", "-q")
    assert result[0] == 0, result[2]
    assert load_mask(out).info.data.max_length == 128
