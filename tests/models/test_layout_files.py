"""A merged folder holds what transformers' loaders read, and nothing else (issue 33): the list in
models/layout.py and docs/formats.md against the file names transformers itself reads, and
tokenizers and processors saved in every form that load from a merged folder as from its base."""

import ast
import fnmatch
import json
import re
import shutil
from pathlib import Path

import pytest
import transformers
from helpers import perturb

from piece_surgery.io.hub import CHECKPOINT_FILES
from piece_surgery.models.layout import (
    CHAT_TEMPLATE_FILES,
    CHAT_TEMPLATE_FOLDER,
    MODEL_FILES,
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    model_files,
)
from piece_surgery.models.tiny import (
    CHAT_TEMPLATE,
    tiny_tokenizer,
    tiny_vision_language_processor,
    tiny_vision_language_tokenizer,
)

DOCS = Path(__file__).parents[2] / "docs" / "formats.md"


def transformers_vocab_files() -> set[str]:
    """Every file name a transformers tokenizer class reads (its vocab_files_names), from its
    source: the classes whose backend is not installed here count too."""
    root = Path(transformers.__file__).parent
    names = set()
    for module in [*root.glob("models/*/tokenization_*.py"), *root.glob("tokenization_*.py")]:
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Dict):
                continue
            if any(
                getattr(t, "id", None) in ("VOCAB_FILES_NAMES", "vocab_files_names") for t in node.targets
            ):
                names |= {v.value for v in node.value.values if isinstance(v, ast.Constant)}
    return names


def test_every_file_transformers_loaders_read_is_listed():
    from transformers import tokenization_utils_base as base
    from transformers import utils

    vocab = transformers_vocab_files()
    assert {"vocab.json", "merges.txt", "tokenizer.model", "spiece.model"} <= vocab  # the scan works
    assert vocab <= set(TOKENIZER_FILES)
    tokenizer = {base.TOKENIZER_CONFIG_FILE, base.FULL_TOKENIZER_FILE, base.SPECIAL_TOKENS_MAP_FILE}
    assert tokenizer | {base.ADDED_TOKENS_FILE} <= set(TOKENIZER_FILES)
    assert {utils.CHAT_TEMPLATE_FILE, utils.LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE} == set(CHAT_TEMPLATE_FILES)
    assert utils.CHAT_TEMPLATE_DIR == CHAT_TEMPLATE_FOLDER
    processor = {utils.PROCESSOR_NAME, utils.IMAGE_PROCESSOR_NAME, utils.FEATURE_EXTRACTOR_NAME}
    assert processor | {utils.VIDEO_PROCESSOR_NAME, utils.AUDIO_TOKENIZER_NAME} == set(PROCESSOR_FILES)
    assert {utils.CONFIG_NAME, utils.GENERATION_CONFIG_NAME} <= set(MODEL_FILES)


def test_the_docs_list_is_the_code_list():
    section = DOCS.read_text().split("## A merged folder", 1)[1]
    documented = set(re.findall(r"`([\w.-]+)`", section))
    assert set(MODEL_FILES) <= documented
    plain = {n for n in documented if "." in n and not n.endswith((".py", ".safetensors"))}
    assert plain - set(MODEL_FILES) <= {"model_files", "layout.py", "formats.md"}, plain - set(MODEL_FILES)
    assert f"{CHAT_TEMPLATE_FOLDER}/" in section


def test_a_hub_download_fetches_every_model_file():
    extra = ["tokenizer.model.v3", "qwen.tiktoken", "LICENSE", "NOTICE.md", "USE_POLICY.md"]
    for name in [*MODEL_FILES, *extra, f"{CHAT_TEMPLATE_FOLDER}/tool_use.jinja"]:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES), name


def _merged(tiny, tmp_path, cli, fill) -> tuple[Path, Path]:
    """A tiny Llama folder with `fill(folder)` written into it, a delta of it applied: (base, merged)."""
    base = shutil.copytree(tiny("llama"), tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    fill(base)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "-q")[0] == 0
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "merged", "-q")[0] == 0
    return base, tmp_path / "merged"


def _same_tokenizer(a, b) -> None:
    text = "<s>def add(a, b): return a + b</s>"
    assert type(a) is type(b)
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.chat_template == b.chat_template and a.special_tokens_map == b.special_tokens_map
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "import os"}]
    names = sorted(a.chat_template) if isinstance(a.chat_template, dict) else [None]
    for name in names if a.chat_template else []:
        assert a.apply_chat_template(chat, tokenize=False, chat_template=name) == b.apply_chat_template(
            chat, tokenize=False, chat_template=name
        )


TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _tokenizer_json_and_templates(folder: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = {"default": CHAT_TEMPLATE, "tool_use": TOOL_TEMPLATE}
    tokenizer.save_pretrained(folder)
    assert (folder / CHAT_TEMPLATE_FOLDER / "tool_use.jinja").is_file()


def _vocab_merges_and_legacy_template(folder: Path) -> None:
    """The slow forms: vocab.json + merges.txt (no tokenizer.json), the template inside
    tokenizer_config.json, and a special_tokens_map.json."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    tokenizer.backend_tokenizer.model.save(str(folder))
    (folder / "tokenizer.json").unlink()
    config = (folder / "tokenizer_config.json").read_text()
    config = config.replace('"tokenizer_class": "TokenizersBackend"', '"tokenizer_class": "GPT2Tokenizer"')
    (folder / "tokenizer_config.json").write_text(config)
    (folder / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


@pytest.mark.parametrize("fill", [_tokenizer_json_and_templates, _vocab_merges_and_legacy_template])
def test_a_tokenizer_saved_in_each_form_loads_from_the_merged_folder(tiny, tmp_path, cli, fill):
    from transformers import AutoTokenizer

    base, merged = _merged(tiny, tmp_path, cli, fill)
    _same_tokenizer(AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(merged))
    copied = {p.relative_to(merged) for p in model_files(merged)} - {Path("README.md")}  # the recipe's card
    assert copied == {p.relative_to(base) for p in model_files(base)}


def _second_tokenizer(folder: Path) -> None:
    """A processor with a second tokenizer in its own folder (InstructBLIP's qformer_tokenizer/)
    and an image processor config (preprocessor_config.json, as older processors saved it)."""
    image = transformers.BlipImageProcessorPil(size={"height": 16, "width": 16})
    processor = transformers.InstructBlipProcessor(
        image_processor=image,
        tokenizer=tiny_tokenizer(),
        qformer_tokenizer=tiny_tokenizer(),
        num_query_tokens=4,
    )
    processor.save_pretrained(folder)
    image.save_pretrained(folder)
    assert (folder / "qformer_tokenizer" / "tokenizer.json").is_file()


def _legacy_processor_template(folder: Path) -> None:
    """A LLaVA processor whose chat template is in the legacy chat_template.json."""
    tokenizer = tiny_vision_language_tokenizer("llava")
    tiny_vision_language_processor("llava", tokenizer).save_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))


@pytest.mark.parametrize("fill", [_second_tokenizer, _legacy_processor_template])
def test_a_processor_saved_in_each_form_loads_from_the_merged_folder(tiny, tmp_path, cli, fill):
    from transformers import AutoProcessor

    base, merged = _merged(tiny, tmp_path, cli, fill)
    a, b = AutoProcessor.from_pretrained(base), AutoProcessor.from_pretrained(merged)
    assert type(a) is type(b) and type(a).__name__.endswith("Processor")
    assert a.chat_template == b.chat_template
    assert a.image_processor.to_dict() == b.image_processor.to_dict()
    for name in ("tokenizer", "qformer_tokenizer"):
        if hasattr(a, name):
            _same_tokenizer(getattr(a, name), getattr(b, name))
    if fill is _legacy_processor_template:
        assert a.chat_template is not None and (merged / "chat_template.json").is_file()


def test_nothing_else_is_copied(tiny, tmp_path, cli):
    def strays(folder: Path) -> None:
        _tokenizer_json_and_templates(folder)
        for name in ("pytorch_model.bin", "optimizer.pt", "trainer_state.json", "notes.jinja", "run.py"):
            (folder / name).write_text("stale")
        (folder / CHAT_TEMPLATE_FOLDER / "notes.txt").write_text("stale")
        (folder / "checkpoint-100").mkdir()
        (folder / "checkpoint-100" / "tokenizer.json").write_text("{}")
        (folder / "LICENSE").write_text("the licence")

    base, merged = _merged(tiny, tmp_path, cli, strays)
    found = {str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file()}
    assert found == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        f"{CHAT_TEMPLATE_FOLDER}/tool_use.jinja",
        "LICENSE",
        "README.md",
        "piece-surgery-recipe.yaml",
    }
