"""Vision-language checkpoints (issue 24), text records so far: LLaVA, Gemma 3 with its vision
tower, Qwen2-VL, Idefics3 and SmolVLM load as transformers loads them, stored names pair with the
loaded ones exactly (checked against the values transformers loaded), the vision tower stays out
by default, and score -> train -> apply gives the model trained in memory, bit for bit."""

import json
import warnings

import pytest
import torch
from helpers import assert_clean_failure
from safetensors.torch import load_file

from piece_surgery.artifacts import open_delta
from piece_surgery.checkpoint import open_checkpoint, read_layout, stored_names
from piece_surgery.mask import load_mask
from piece_surgery.merge import apply_to_model
from piece_surgery.parts import LANGUAGE, PROJECTOR, VISION, part_of
from piece_surgery.switcher import DeltaSwitcher
from piece_surgery.testing import VISION_LANGUAGE_ARCHITECTURES, make_tiny_vision_language_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3]])
# where each family keeps its parts, as module paths of the loaded model (the truth part_of must match)
MODULES = {
    "llava": {VISION: ["model.vision_tower"], PROJECTOR: ["model.multi_modal_projector"]},
    "gemma3_vl": {VISION: ["model.vision_tower"], PROJECTOR: ["model.multi_modal_projector"]},
    "qwen2_vl": {VISION: ["model.visual"], PROJECTOR: ["model.visual.merger"]},
    "idefics3": {VISION: ["model.vision_model"], PROJECTOR: ["model.connector"]},
    "smolvlm": {VISION: ["model.vision_model"], PROJECTOR: ["model.connector"]},
}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    cache = {}

    def build(arch, tie=False):
        if (arch, tie) not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{'tied' if tie else 'untied'}")
            cache[arch, tie] = make_tiny_vision_language_model(folder, arch, tie=tie)
        return cache[arch, tie]

    return build


def load(folder):
    """The model as users load it with transformers."""
    import transformers
    from transformers import AutoModelForImageTextToText

    transformers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForImageTextToText.from_pretrained(folder).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", VISION_LANGUAGE_ARCHITECTURES)
@pytest.mark.parametrize("layout", ["as saved", "as loaded", "tied"])
def test_stored_names_pair_as_transformers_loads_them(vlm, tmp_path, arch, layout):
    """Every parameter maps to the stored tensor transformers loaded it from: the values agree
    (random, so a wrong pairing of equal shapes shows), on the skeleton as on the loaded model."""
    folder = vlm(arch, tie=layout == "tied")
    if layout == "as loaded":  # the in-memory names, as some converted checkpoints store them
        load(folder).save_pretrained(tmp_path / "renamed", save_original_format=False)
        for item in folder.iterdir():
            if "token" in item.name:
                (tmp_path / "renamed" / item.name).write_bytes(item.read_bytes())
        folder = tmp_path / "renamed"
    model = load(folder)
    stored = load_file(folder / "model.safetensors")
    names = stored_names(model, read_layout(folder))
    params = dict(model.named_parameters(remove_duplicate=False))
    mapped = {n for n in params if n in names}
    assert {n for n in params if n not in names} <= {"lm_head.weight"}  # only a tied head unstored
    assert mapped and all(torch.equal(params[n].detach(), stored[names[n]]) for n in mapped)
    assert set(names.values()) == set(stored)
    skeleton = open_checkpoint(str(folder)).skeleton()
    assert stored_names(skeleton, read_layout(folder)) == names
    if layout == "as saved" and arch in ("llava", "gemma3_vl", "qwen2_vl"):
        assert any(names[n] != n for n in mapped)  # these families do rename on loading


@pytest.mark.parametrize("arch", VISION_LANGUAGE_ARCHITECTURES)
def test_parts_follow_each_architecture_module_tree(vlm, arch):
    model = load(vlm(arch))
    truth = {}
    for part in (VISION, PROJECTOR):  # the projector second: Qwen2-VL's merger sits in its vision module
        for path in MODULES[arch][part]:
            inside = (f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters())
            truth.update(dict.fromkeys(inside, part))
    names = stored_names(model, read_layout(vlm(arch)))
    for name, _ in model.named_parameters():
        assert part_of(names[name]) == truth.get(name, LANGUAGE), name
        assert part_of(name) == truth.get(name, LANGUAGE), name
    assert set(truth.values()) == {VISION, PROJECTOR}


@pytest.mark.parametrize("arch", VISION_LANGUAGE_ARCHITECTURES)
def test_score_train_apply_is_the_model_trained_in_memory(vlm, tmp_path, cli, code_data, arch):
    """The default mask leaves the vision tower out; only masked entries move; the merged folder,
    the delta in memory, the delta switched in and diff of the two folders agree bit for bit."""
    base = vlm(arch)
    mask = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", code_data, "-o", mask, "--density", "0.02", "-q")[0] == 0
    indices = load_mask(mask).indices
    assert indices and all(part_of(name) != VISION for name in indices)
    train = ["train", base, "--data", code_data, "--mask", mask, "-o", tmp_path / "delta", "-q"]
    assert cli(*train, "--lr", "1e-2", "--max-steps", "3", "--batch-size", "2")[0] == 0
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    before = load_file(base / "model.safetensors")
    after = load_file(tmp_path / "merged" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        moved = (before[name] != after[name]).reshape(-1).nonzero().reshape(-1)
        allowed = set(indices[name].tolist()) if name in indices else set()
        assert set(moved.tolist()) <= allowed, name
    merged = logits(load(tmp_path / "merged"))
    assert not torch.equal(merged, logits(load(base)))
    delta = open_delta(tmp_path / "delta")
    model = open_checkpoint(str(base)).load_model(device="cpu").module.eval()
    switcher = DeltaSwitcher(model)
    switcher.add("d", delta)
    with switcher.using("d"):
        assert torch.equal(logits(model), merged)
    apply_to_model(model, delta)
    assert torch.equal(logits(model), merged)
    assert cli("diff", base, tmp_path / "merged", "-o", tmp_path / "diff", "-q")[0] == 0
    again = open_delta(tmp_path / "diff")
    assert again.tensors.keys() == delta.tensors.keys()
    assert all(torch.equal(again.tensors[n].indices, t.indices) for n, t in delta.tensors.items())


def test_include_reaches_the_vision_tower_and_inspect_counts_each_part(vlm, tmp_path, cli):
    base = vlm("llava")
    mask = tmp_path / "m.safetensors"
    args = ["score", base, "-o", mask, "--method", "magnitude", "--density", "0.02"]
    assert cli(*args, "--include", "vision_tower", "--include", "language_model", "-q")[0] == 0
    parts = {part_of(name) for name in load_mask(mask).indices}
    assert VISION in parts and LANGUAGE in parts
    code, out, _ = cli("inspect", mask, "--json")
    assert code == 0
    summary = json.loads(out)
    counts = {}
    for name, idx in load_mask(mask).indices.items():
        counts[part_of(name)] = counts.get(part_of(name), 0) + idx.numel()
    assert {p: row["entries"] for p, row in summary["by_part"].items() if row["entries"]} == counts
    assert any(label.startswith("vision tower ") for label in summary["by_layer"])


def test_a_chat_record_with_an_image_is_refused_in_one_line(vlm, tmp_path, cli):
    data = tmp_path / "chat.jsonl"
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Which?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
    }
    data.write_text(json.dumps(record) + "\n")
    out = tmp_path / "m.safetensors"
    result = cli("score", vlm("llava"), "--data", data, "-o", out)
    assert_clean_failure(result, "has an image part", output=out)


def test_chat_content_as_parts_trains_the_assistant_text_only(tmp_path):
    """Content given as a list of text parts (the form vision-language templates read) renders with
    a template that reads parts; the loss covers the assistant's text only (checked against the
    tokens of that text, tokenized apart); a template that would drop the text is an error."""
    from piece_surgery.data import IGNORE, tokenize_record
    from piece_surgery.errors import PieceError
    from piece_surgery.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% for p in m['content'] %}"
        "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "add two numbers"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "def add(a, b): return a + b"}]},
        ]
    }
    example = tokenize_record(parts, tokenizer, 256)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(trained) == "def add(a, b): return a + b</s>"
    strings = {"messages": [{**m, "content": m["content"][0]["text"]} for m in parts["messages"]]}
    with pytest.raises(PieceError, match="drops the text of message 1"):
        tokenize_record(strings, tokenizer, 256)
