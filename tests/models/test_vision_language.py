"""Vision-language checkpoints (issue 24): LLaVA, Gemma 3 with its vision tower, Qwen2-VL, Idefics3
and SmolVLM load as transformers loads them, stored names pair with the loaded ones exactly (checked
against the values transformers loaded), the vision tower stays out by default, and score -> train
-> apply gives the model trained in memory, bit for bit, on text and on image chats (the families
whose processor builds without torchvision where it is not installed)."""

import json
import warnings

import pytest
import torch
from helpers import assert_clean_failure
from safetensors.torch import load_file

from piece_surgery.data.images import open_image
from piece_surgery.formats.artifacts import open_delta
from piece_surgery.formats.mask import load_mask
from piece_surgery.merging.live import apply_to_model
from piece_surgery.merging.switcher import DeltaSwitcher
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.models.layout import read_layout
from piece_surgery.models.pairing import stored_names
from piece_surgery.models.parts import LANGUAGE, PROJECTOR, VISION, part_of
from piece_surgery.models.tiny import (
    NEEDS_TORCHVISION,
    VISION_LANGUAGE_ARCHITECTURES,
    make_tiny_vision_language_model,
    write_png,
)


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 7, 3]])
# where each family keeps its parts, as module paths of the loaded model (the truth part_of must match)
MODULES = {
    "llava": {VISION: ["model.vision_tower"], PROJECTOR: ["model.multi_modal_projector"]},
    "gemma3_vl": {VISION: ["model.vision_tower"], PROJECTOR: ["model.multi_modal_projector"]},
    "qwen2_vl": {VISION: ["model.visual"], PROJECTOR: ["model.visual.merger"]},
    "qwen2_5_vl": {VISION: ["model.visual"], PROJECTOR: ["model.visual.merger"]},
    "qwen3_vl": {
        VISION: ["model.visual"],
        PROJECTOR: ["model.visual.merger", "model.visual.deepstack_merger_list"],
    },
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
    if layout == "as saved" and arch in ("llava", "gemma3_vl", "qwen2_vl", "qwen2_5_vl"):
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


def test_chat_content_as_parts_trains_the_assistant_text_only(tmp_path):
    """Content given as a list of text parts (the form vision-language templates read) renders with
    a template that reads parts; the loss covers the assistant's text only (checked against the
    tokens of that text, tokenized apart); a template that would drop the text is an error."""
    from piece_surgery.data.examples import IGNORE
    from piece_surgery.data.tokenize import tokenize_record
    from piece_surgery.models.tiny import tiny_tokenizer
    from piece_surgery.runtime.errors import PieceError

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


# ---------------------------------------------------------------- image records

WITH_PROCESSOR = [
    a
    for a in VISION_LANGUAGE_ARCHITECTURES
    if (a not in NEEDS_TORCHVISION or has_torchvision()) and a not in ("qwen2_5_vl", "qwen3_vl")
]


def image_chat(path: str, answer: str, question: str = "What is in the picture?") -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "path": path}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


@pytest.fixture
def image_data(tmp_path):
    """Image chats (two images of different sizes, so tiled families tile them differently) and a
    text record, in one file; image paths relative to it."""
    write_png(tmp_path / "img" / "wide.png", 40, 24, seed=1)
    write_png(tmp_path / "img" / "tall.png", 18, 44, seed=2)
    records = [
        image_chat("img/wide.png" if i % 2 else "img/tall.png", f"Pattern number {i}.") for i in range(4)
    ]
    records.insert(2, {"text": "def add(a, b):\n    return a + b"})
    data = tmp_path / "images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


@pytest.mark.parametrize("arch", WITH_PROCESSOR)
def test_image_records_train_the_assistant_tokens_only(vlm, image_data, arch):
    """The labels of an image chat are exactly the assistant's text and end of turn, tokenized
    apart (an independent computation); no image token is ever a label; the pixel inputs are the
    processor's own for that image."""
    from piece_surgery.data.examples import IGNORE

    checkpoint = open_checkpoint(str(vlm(arch)))
    dataset = checkpoint.load_data(image_data, max_length=256)
    tokenizer = checkpoint.load_tokenizer()
    images = [e for e in dataset.examples if e.model_inputs]
    assert len(images) == 4 and len(dataset.examples) == 5
    image_ids = checkpoint.image_chats().image_token_ids
    for i, example in enumerate(images):
        labelled = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]
        assert labelled == tokenizer(f"Pattern number {i}.</s>", add_special_tokens=False)["input_ids"]
        assert image_ids & set(example.input_ids) and not image_ids & set(labelled)
    processor = checkpoint.image_chats().processor
    expected = processor(images=[[open_image(image_data.parent / "img" / "tall.png")]], return_tensors="pt")
    assert torch.equal(images[0].model_inputs["pixel_values"], expected["pixel_values"])


@pytest.mark.parametrize("arch", WITH_PROCESSOR)
def test_a_micro_batch_of_image_records_is_what_the_processor_batches(vlm, image_data, arch):
    """collate() joins the examples' pixel inputs as the processor does for a batch of chats."""
    from piece_surgery.data.batches import collate

    checkpoint = open_checkpoint(str(vlm(arch)))
    dataset = checkpoint.load_data(image_data, max_length=256)
    first, second = [e for e in dataset.examples if e.model_inputs][:2]
    batch = collate([first, second], 0)
    processor = checkpoint.image_chats().processor
    records = [json.loads(line) for line in image_data.read_text().splitlines()][:2]
    texts = [
        processor.apply_chat_template(
            [
                {**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                for m in r["messages"]
            ],
            tokenize=False,
        )
        for r in records
    ]
    pictures = [[open_image(image_data.parent / r["messages"][0]["content"][0]["path"])] for r in records]
    processor.tokenizer.padding_side = "right"
    expected = processor(
        text=texts, images=pictures, padding=True, add_special_tokens=False, return_tensors="pt"
    )
    assert torch.equal(
        batch["input_ids"] * batch["attention_mask"], expected["input_ids"] * expected["attention_mask"]
    )
    for key in set(expected) - {"input_ids", "attention_mask"}:
        assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize("arch", WITH_PROCESSOR)
def test_trained_on_images_the_merged_folder_is_the_model_in_memory(vlm, tmp_path, cli, image_data, arch):
    """score -> train on image chats (micro-batches mixing images and text) -> apply: the merged
    folder, loaded by transformers, gives the in-memory model's logits on an image batch, bit for bit."""
    from piece_surgery.data.batches import collate

    base = vlm(arch)
    mask = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", image_data, "-o", mask, "--density", "0.02", "-q")[0] == 0
    train = ["train", base, "--data", image_data, "--mask", mask, "-o", tmp_path / "delta", "-q"]
    assert cli(*train, "--lr", "1e-2", "--max-steps", "2", "--batch-size", "3")[0] == 0
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    checkpoint = open_checkpoint(str(base))
    batch = collate(checkpoint.load_data(image_data, max_length=256).examples[:3], 0)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        merged = load(tmp_path / "merged")(**inputs).logits
        original = load(base)(**inputs).logits
        model = checkpoint.load_model(device="cpu").module.eval()
        apply_to_model(model, open_delta(tmp_path / "delta"))
        assert torch.equal(model(**inputs).logits, merged)
    assert not torch.equal(merged, original)


def test_the_data_digest_covers_the_images(vlm, image_data):
    checkpoint = open_checkpoint(str(vlm("llava")))
    before = checkpoint.load_data(image_data).sha256
    write_png(image_data.parent / "img" / "wide.png", 40, 24, seed=9)
    assert checkpoint.load_data(image_data).sha256 != before


def test_bad_image_records_fail_in_one_line(vlm, tiny, tmp_path, cli, image_data):
    """Each a one-line error, exit 2, nothing written: a missing image, a file that is no image, a
    decompression bomb, a URL part, more placeholders than images, an image record for a text-only
    model, image tokens past --max-length, a checkpoint without its processor."""
    import shutil

    from PIL import Image

    base = vlm("llava")
    (tmp_path / "img" / "not.png").write_text("not an image")
    Image.new("1", (12000, 12000)).save(tmp_path / "img" / "bomb.png")  # 144M pixels, a few KB
    cases = {
        "missing.png": "not found",
        "not.png": "cannot be read as an image",
        "bomb.png": "too large to decode safely",
    }
    out = tmp_path / "m.safetensors"
    for name, message in cases.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text(json.dumps(image_chat(f"img/{name}", "x")) + "\n")
        line = assert_clean_failure(cli("score", base, "--data", data, "-o", out), message, output=out)
        assert f"{data}:1" in line and name in line
    url = tmp_path / "url.jsonl"
    record = image_chat("img/wide.png", "x")
    record["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    url.write_text(json.dumps(record) + "\n")
    assert_clean_failure(cli("score", base, "--data", url, "-o", out), "image_url", output=out)
    extra = tmp_path / "extra.jsonl"  # a placeholder typed into the text: more placeholders than images
    extra.write_text(json.dumps(image_chat("img/wide.png", "x", question="and this <image>?")) + "\n")
    assert_clean_failure(cli("score", base, "--data", extra, "-o", out), "processor refused", output=out)
    assert_clean_failure(
        cli("score", tiny("llama"), "--data", image_data, "-o", out), "text-only", output=out
    )
    long = ["score", base, "--data", image_data, "-o", out, "--max-length", "6"]
    assert_clean_failure(cli(*long), "raise --max-length", output=out)
    bare = shutil.copytree(base, tmp_path / "bare")
    (bare / "processor_config.json").unlink()
    assert_clean_failure(
        cli("score", bare, "--data", image_data, "-o", out), "no processor config", output=out
    )


def test_a_command_never_writes_over_the_images_its_data_names(vlm, tmp_path, cli, image_data):
    """The images of a data file are inputs: an output on one, or on their folder, is refused."""
    base = vlm("llava")
    image = image_data.parent / "img" / "wide.png"
    odd = image_data.parent / "img" / "odd.safetensors"  # an image under any name is still an input
    odd.write_bytes(image.read_bytes())
    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps(image_chat("img/odd.safetensors", "x")) + "\n")
    before = image.read_bytes()
    delta = tmp_path / "delta"
    assert cli("train", base, "--data", image_data, "-o", delta, "--max-steps", "1", "-q")[0] == 0
    for args in (
        ["train", base, "--data", image_data, "--max-steps", "1", "--overwrite", "-o", image.parent],
        ["score", base, "--data", data, "--overwrite", "-o", odd],
        ["eval", base, delta, "--data", image_data, "--overwrite", "--plot", image],
    ):
        assert_clean_failure(cli(*args), "overlaps input")
    assert image.read_bytes() == before and odd.read_bytes() == before


def test_apply_refuses_an_output_where_the_base_files_point(vlm, tiny, tmp_path, cli, code_data):
    """A base whose files are links (a Hub cache snapshot's point into its blobs): writing the
    output where they point would rewrite the base; refused."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for item in tiny("llama").iterdir():
        (blobs / item.name).write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(blobs / item.name)
    mask = tmp_path / "m.safetensors"
    assert cli("score", snapshot, "-o", mask, "--method", "magnitude", "-q")[0] == 0
    delta = tmp_path / "delta"
    assert (
        cli("train", snapshot, "--data", code_data, "--mask", mask, "-o", delta, "--max-steps", "1", "-q")[0]
        == 0
    )
    before = (blobs / "model.safetensors").read_bytes()
    assert_clean_failure(cli("apply", snapshot, delta, "-o", blobs, "--overwrite"), "overlaps input")
    assert (blobs / "model.safetensors").read_bytes() == before


def test_vision_tower_alone_on_text_is_one_line(vlm, tmp_path, cli, code_data):
    out = tmp_path / "m.safetensors"
    args = ["score", vlm("llava"), "--data", code_data, "-o", out, "--include", "vision_tower"]
    assert_clean_failure(cli(*args), "they are all in the vision tower, which only image records", output=out)


@pytest.mark.parametrize("arch, pattern", [("llava", "multi_modal_projector"), ("qwen2_vl", "merger")])
def test_a_projector_on_text_records_is_refused_with_its_cause(vlm, tmp_path, cli, code_data, arch, pattern):
    """Projector entries on text data: score and train say, in one line, that only image records
    reach the projector (train used to say the model detaches it or uses it elsewhere)."""
    base, mask = vlm(arch), tmp_path / "m.safetensors"
    out = tmp_path / "s.safetensors"
    line = assert_clean_failure(
        cli("score", base, "--data", code_data, "--method", "piece-f", "-o", out, "--include", pattern),
        "they are all in the projector, which only image records reach",
        output=out,
    )
    assert "vision tower" not in line
    assert (
        cli("score", base, "-o", mask, "--method", "magnitude", "--density", "0.05", "--include", pattern)[0]
        == 0
    )
    out = tmp_path / "delta"
    line = assert_clean_failure(
        cli("train", base, "--data", code_data, "--mask", mask, "-o", out, "--max-steps", "1"),
        "gets no gradient: it is in the projector, which only image records reach",
        output=out,
    )
    assert "elsewhere" not in line and "detaches" not in line


def test_a_micro_batch_that_reaches_no_trained_entry_trains_on(vlm, tmp_path, cli, image_data):
    """A projector-only mask and a text record alone in its micro-batch: that micro-batch adds
    no gradient (it used to crash backward), and one micro-batch of all gives the same values."""
    base = vlm("llava")
    mask = ["score", base, "-o", tmp_path / "m.safetensors", "--method", "magnitude", "--density", "0.05"]
    assert cli(*mask, "--include", "multi_modal_projector", "-q")[0] == 0
    common = ["train", base, "--data", image_data, "--mask", tmp_path / "m.safetensors", "--lr", "1e-2", "-q"]
    assert (
        cli(*common, "-o", tmp_path / "split", "--batch-size", "1", "--grad-accum", "5", "--max-steps", "1")[
            0
        ]
        == 0
    )
    assert cli(*common, "-o", tmp_path / "whole", "--batch-size", "5", "--max-steps", "1")[0] == 0
    split, whole = open_delta(tmp_path / "split").tensors, open_delta(tmp_path / "whole").tensors
    assert split.keys() == whole.keys() and all(part_of(n) == PROJECTOR for n in split)
    for name, t in split.items():
        assert torch.equal(t.indices, whole[name].indices) and not torch.equal(t.tuned, t.base)
        assert torch.allclose(t.tuned, whole[name].tuned, rtol=0, atol=1e-7)


def test_inspect_splits_a_language_only_delta_of_a_vision_language_model(vlm, tmp_path, cli, code_data):
    base = vlm("llava")
    out = tmp_path / "delta"
    assert (
        cli("train", base, "--data", code_data, "-o", out, "--max-steps", "1", "--density", "0.02", "-q")[0]
        == 0
    )
    summary = json.loads(cli("inspect", out, "--json")[1])
    assert (
        set(summary["by_part"]) == {LANGUAGE}
        and summary["by_part"][LANGUAGE]["entries"] == summary["entries"]
    )


def test_tiny_model_says_when_it_wrote_no_processor(tmp_path, cli):
    code, out, _ = cli("tiny-model", tmp_path / "q", "--arch", "qwen2_5_vl", "--json")
    assert code == 0 and json.loads(out)["processor"] is False
    code, out, _ = cli("tiny-model", tmp_path / "q2", "--arch", "qwen2_5_vl")
    assert "no processor written" in out
    code, out, _ = cli("tiny-model", tmp_path / "l", "--arch", "llava", "--json")
    assert json.loads(out)["processor"] is True
