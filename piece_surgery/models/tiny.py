"""Tiny random causal LMs with a real tokenizer, built offline: for tests, examples and demos."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch

from piece_surgery.models.loading import check_experts_supported
from piece_surgery.runtime.errors import PieceError

# mixture-of-experts families: 4 experts, 2 per token, in both layers (DeepSeek-V3: its first layer
# dense, as its first_k_dense_replace keeps the first layers of the real model)
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")
# how a mixture-of-experts checkpoint stores its experts: one tensor per expert and projection (the
# Hub layout, what save_pretrained writes), or as the model holds them (one 3-D tensor per kind)
EXPERT_LAYOUTS = ("per-expert", "fused")
_TOKENIZER_TEXT = """
The quick brown fox jumps over the lazy dog. Sparse updates keep general ability.
def add(a, b):\n    return a + b\nimport os\nclass Model:\n    pass\n
Importance estimation ranks weight entries by their gradients on the domain data.
Mathematics studies numbers, shapes and structure; biology studies living things.
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# The special tokens each family's chat template writes, and its BOS and EOS (None: it has none),
# as its tokenizer names them: tiny_tokenizer(chat_family=...) adds them, so the family's real template
# (tests/fixtures/chat_templates/) renders to the tokens the family's model reads.
CHAT_FAMILIES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "qwen": (None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>", "<think>", "</think>"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "mistral": (
        "<s>",
        "</s>",
        ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"],
    ),
    "smollm2": ("<|im_start|>", "<|im_end|>", ["<|endoftext|>"]),
    "deepseek": (
        "<\uff5cbegin\u2581of\u2581sentence\uff5c>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<think>", "</think>"],
    ),
}


def tiny_tokenizer(
    vocab_size: int = 384, *, chat_family: str | None = None, chat_template: str | None = None
):
    """A byte-level BPE tokenizer trained on a built-in paragraph (deterministic, no download), with
    CHAT_TEMPLATE, or `chat_template` with the special tokens, BOS and EOS of `chat_family`
    (CHAT_FAMILIES) added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer)
    if chat_family is None:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
        )
    else:
        if chat_family not in CHAT_FAMILIES:
            raise ValueError(f"unknown chat family {chat_family!r}; use {', '.join(CHAT_FAMILIES)}")
        bos, eos, extra = CHAT_FAMILIES[chat_family]
        named = [t for t in (bos, eos) if t is not None]
        tok.add_special_tokens([t for t in [*named, *extra] if tok.token_to_id(t) is None])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=bos,
            eos_token=eos,
            pad_token="<pad>",
            additional_special_tokens=extra,
        )
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast


# A decoder a few hundred KB big: two layers of width 32, four heads sharing two key/value heads.
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# family -> (transformers config class, its fields): what each family's tiny model is made of. A row
# is a family; tests/models/test_families.py runs the whole pipeline on each.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, **_NO_DROPOUT)),
    "qwen2": ("Qwen2Config", dict(_DECODER, tie_word_embeddings=True)),
    # Gemma 3's text model; tied embeddings, as every Gemma 3
    "gemma3": ("Gemma3TextConfig", dict(_DECODER, head_dim=8, sliding_window=16)),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=16, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=8, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(_DECODER, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)),
    # fused projections: qkv_proj, gate_up_proj
    "phi3": ("Phi3Config", dict(_DECODER, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0)),
    "olmo2": ("Olmo2Config", dict(_DECODER, tie_word_embeddings=False)),
    # fused query_key_value, parallel residual, partial rotary
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(_DECODER, rotary_pct=0.5, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
    ),
}
TINY_ARCHITECTURES = (*TINY_CONFIGS, *MOE_ARCHITECTURES)  # MoE configs: _moe_config


def tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides):
    """A config a few hundred KB big for a family of TINY_CONFIGS (llama, gpt2, qwen2, gemma3,
    mistral, qwen3, gemma2, phi3, olmo2, gpt_neox, falcon) or a mixture-of-experts family
    (MOE_ARCHITECTURES); `overrides` set fields after."""
    import transformers

    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch in MOE_ARCHITECTURES:
        config = _moe_config(arch, vocab_size, special)
    elif arch in TINY_CONFIGS:
        name, fields = TINY_CONFIGS[arch]
        config = getattr(transformers, name)(vocab_size=vocab_size, **fields, **special)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use {', '.join(TINY_ARCHITECTURES)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _moe_config(arch: str, vocab_size: int, special: dict):
    """The mixture-of-experts families' tiny configs: 4 experts of 16 hidden units, 2 per token."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
        **special,
    )
    if arch == "mixtral":
        return transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
    if arch == "gpt_oss":
        rope = {"rope_type": "default", "rope_theta": 10000.0}  # not its YaRN, made for 128k positions
        return transformers.GptOssConfig(
            intermediate_size=16,
            num_local_experts=4,
            head_dim=8,
            sliding_window=16,
            rope_parameters=rope,
            **common,
        )
    if arch == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=16, num_experts=4, **common)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=16, num_experts=4, head_dim=8, **common
        )
    if arch == "qwen2_moe":  # a shared expert beside the routed ones, behind a sigmoid gate
        return transformers.Qwen2MoeConfig(
            intermediate_size=64,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=4,
            **common,
        )
    common["num_key_value_heads"] = 4  # its latent attention has as many key-value heads as heads
    return transformers.DeepseekV3Config(  # deepseek_v3: a shared expert, grouped routing, MLA attention
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **common,
    )


def make_tiny_checkpoint(
    path: Path,
    arch: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    tokenizer=None,
    experts: str = "per-expert",
    **config_overrides,
) -> Path:
    """Build, randomly initialise (seeded) and save a tiny causal LM plus tokenizer (tiny_tokenizer()
    unless given; the config takes its size and special tokens) to `path`.

    A mixture-of-experts model's `experts` (EXPERT_LAYOUTS) are saved `per-expert`, one tensor per
    expert and projection, as save_pretrained writes them (gpt_oss, whose Hub layout is fused, has
    no other), or `fused`: the tensors the model holds, under its own names (one file)."""
    import transformers
    from transformers import AutoModelForCausalLM

    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {experts!r}; use {', '.join(EXPERT_LAYOUTS)}")
    if arch in MOE_ARCHITECTURES:
        check_experts_supported(arch)
    transformers.utils.logging.disable_progress_bar()
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config_overrides = {**ids, "pad_token_id": tokenizer.pad_token_id, **config_overrides}
    tokenizer = tokenizer or tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    if arch in MOE_ARCHITECTURES:
        with torch.no_grad():  # routers and expert biases may start at zero; exact tests need values
            for param in model.parameters():
                if not param.abs().sum():
                    param.copy_(torch.randn(param.shape) * 0.02)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if arch in MOE_ARCHITECTURES and experts == "fused":
        _save_as_held(model, path)
    tokenizer.save_pretrained(path)
    return path


def _save_as_held(model: torch.nn.Module, path: Path) -> None:
    """Replace the saved weights with the tensors the model holds, under its own names, in one file."""
    from safetensors.torch import save_file

    for old in [*path.glob("*.safetensors"), *path.glob("*.safetensors.index.json")]:
        old.unlink()
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


VISION_LANGUAGE_ARCHITECTURES = (
    "llava",
    "gemma3_vl",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
)
# the special tokens each family's processor and config name (image placeholders and markup)
_TILES = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]  # Idefics3's image splitting
_VL_TOKENS = {
    "llava": ["<image>"],
    "gemma3_vl": ["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen3_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_TILES],
    "smolvlm": [
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        *_TILES,
        "<video>",
    ],
}
# what one image part of a chat renders to (the processor expands it into the image's tokens)
_IMAGE_MARKUP = {
    "llava": "<image>",
    "gemma3_vl": "<start_of_image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
}
# families whose processor in transformers 5 also needs a video processor, hence torchvision
NEEDS_TORCHVISION = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm")


def tiny_vision_language_config(arch: str, tokenizer, *, tie: bool = False):
    """A vision-language config of a few hundred KB: a 2-layer vision tower on 16x16 images, its
    projector and a 2-layer language model, for llava, gemma3_vl (Gemma 3 with its vision tower),
    qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3 or smolvlm. `tokenizer` must hold the family's special
    tokens (tiny_vision_language_tokenizer)."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    family = next((f for names, f in _VISION_LANGUAGE_CONFIGS.items() if arch in names), None)
    if family is None:
        raise ValueError(
            f"unknown vision-language architecture {arch!r}; use {VISION_LANGUAGE_ARCHITECTURES}"
        )
    return family(arch, tokenizer.convert_tokens_to_ids, text, vision, tie)


def _llava(arch, ids, text, vision, tie):
    import transformers

    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision, image_size=16, patch_size=8, projection_dim=32),
        text_config=transformers.LlamaConfig(**text),
        image_token_index=ids("<image>"),
        image_seq_length=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=tie,
    )


def _gemma3_vl(arch, ids, text, vision, tie):
    import transformers

    text.update(head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
    text["layer_types"] = ["sliding_attention", "full_attention"]
    return transformers.Gemma3Config(
        text_config=text,
        vision_config=dict(
            model_type="siglip_vision_model", **vision, image_size=16, patch_size=4, vision_use_head=False
        ),
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=tie,
    )


def _qwen_vl(arch, ids, text, vision, tie):
    import transformers

    qwen_ids = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie,
    )
    qwen_vision = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_heads=4, depth=2)
    text_rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = text_rope
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16)
        vision.update(fullatt_block_indexes=[1], tokens_per_second=2, **qwen_vision)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen_ids)
    if arch == "qwen3_vl":
        text.update(head_dim=8, rope_parameters={**text_rope, "mrope_interleaved": True})
        vision = dict(hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16)
        vision.update(deepstack_visual_indexes=[0], **qwen_vision)
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **qwen_ids)
    text["rope_parameters"] = text_rope
    vision = dict(embed_dim=32, hidden_size=32, mlp_ratio=2, **qwen_vision)
    return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **qwen_ids)


def _idefics3(arch, ids, text, vision, tie):
    import transformers

    config_class = transformers.Idefics3Config if arch == "idefics3" else transformers.SmolVLMConfig
    return config_class(
        text_config=dict(model_type="llama", **text),
        vision_config=dict(**vision, image_size=16, patch_size=4),
        scale_factor=2,
        image_token_id=ids("<image>"),
        tie_word_embeddings=tie,
        pad_token_id=0,
    )


_VISION_LANGUAGE_CONFIGS = {
    ("llava",): _llava,
    ("gemma3_vl",): _gemma3_vl,
    ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"): _qwen_vl,
    ("idefics3", "smolvlm"): _idefics3,
}


def vision_language_chat_template(image_markup: str) -> str:
    """CHAT_TEMPLATE for content as a string or as a list of text and image parts."""
    return (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}" + image_markup + "{% elif p['type'] == 'text' %}{{ p['text'] }}"
        "{% endif %}{% endfor %}{% endif %}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def tiny_vision_language_tokenizer(arch: str):
    """tiny_tokenizer with the family's image tokens added as special tokens (Gemma 3's processor
    reads them by name) and a chat template that renders image parts."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": _VL_TOKENS[arch]})
    if arch == "gemma3_vl":
        named = {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        }
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer._tokenizer,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            extra_special_tokens=named,
        )
    tokenizer.chat_template = vision_language_chat_template(_IMAGE_MARKUP[arch])
    return tokenizer


def tiny_vision_language_processor(arch: str, tokenizer):
    """The family's processor for 16x16-pixel images (Pillow image processors), or None where it
    needs torchvision and torchvision is not installed (NEEDS_TORCHVISION), and for Qwen2.5-VL and
    Qwen3-VL (none built)."""
    import transformers
    from transformers.utils import is_torchvision_available

    if arch in ("qwen2_5_vl", "qwen3_vl"):  # not built here: their text records are what is tested
        return None
    if arch in NEEDS_TORCHVISION and not is_torchvision_available():
        return None
    template = tokenizer.chat_template
    backend = "" if is_torchvision_available() else "Pil"
    if arch == "llava":
        image = getattr(transformers, "CLIPImageProcessor" + backend)(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        )
        return transformers.LlavaProcessor(
            image_processor=image,
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
            chat_template=template,
        )
    if arch == "gemma3_vl":
        image = getattr(transformers, "Gemma3ImageProcessor" + backend)(
            size={"height": 16, "width": 16}, do_pan_and_scan=False
        )
        return transformers.Gemma3Processor(
            image_processor=image, tokenizer=tokenizer, image_seq_length=4, chat_template=template
        )
    if arch in ("idefics3", "smolvlm"):
        name = "Idefics3" if arch == "idefics3" else "SmolVLM"
        image = getattr(transformers, f"{name}ImageProcessor" + backend)(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True
        )
        kwargs = {"image_seq_len": 4, "chat_template": template}
        if arch == "smolvlm":
            kwargs["video_processor"] = transformers.SmolVLMVideoProcessor()
        return getattr(transformers, f"{name}Processor")(image_processor=image, tokenizer=tokenizer, **kwargs)
    if arch == "qwen2_vl":
        sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
        return transformers.Qwen2VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessor(
                size={"shortest_edge": 64, "longest_edge": 576}, **sizes
            ),
            tokenizer=tokenizer,
            video_processor=transformers.Qwen2VLVideoProcessor(**sizes),
            chat_template=template,
        )
    raise ValueError(f"unknown vision-language architecture {arch!r}; use {VISION_LANGUAGE_ARCHITECTURES}")


def make_tiny_vision_language_model(
    path: Path, arch: str = "llava", *, seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32
) -> Path:
    """Build, randomly initialise (seeded) and save a tiny vision-language model, its tokenizer and
    its processor (where tiny_vision_language_processor can build one) to `path`, as transformers
    saves them (the stored names, not the loaded ones)."""
    import transformers
    from transformers import AutoModelForImageTextToText

    transformers.utils.logging.disable_progress_bar()
    tokenizer = tiny_vision_language_tokenizer(arch)
    config = tiny_vision_language_config(arch, tokenizer, tie=tie)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).to(dtype)
    with torch.no_grad():  # some families zero-fill their projector at init; an exact test needs values
        for param in model.parameters():
            if not param.abs().sum():
                param.copy_(torch.randn(param.shape) * 0.02)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor = tiny_vision_language_processor(arch, tokenizer)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def write_png(path: Path, width: int = 40, height: int = 30, *, seed: int = 0) -> Path:
    """A small seeded RGB PNG (noise), written with Pillow, for image records in tests and examples."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy(), "RGB").save(path)
    return Path(path)


def expert_layout(arch: str, experts: str | None) -> str | None:
    """How `tiny-model` stores a mixture-of-experts `arch`'s experts: `experts` (EXPERT_LAYOUTS),
    else the family's Hub layout (fused for gpt_oss, which has no other; else per-expert); None for
    a dense `arch`. PieceError for an unknown layout, one a family does not have, or any for a dense
    model."""
    if experts is not None and experts not in EXPERT_LAYOUTS:
        raise PieceError(f"unknown --experts '{experts}'; use {' or '.join(EXPERT_LAYOUTS)}")
    if arch not in MOE_ARCHITECTURES:
        if experts is not None:
            raise PieceError(f"--experts is for a mixture-of-experts --arch ({', '.join(MOE_ARCHITECTURES)})")
        return None
    if arch == "gpt_oss":  # its Hub checkpoints store the fused tensors the model holds
        if experts == "per-expert":
            raise PieceError("gpt_oss stores its experts fused (it has no per-expert layout): drop --experts")
        return "fused"
    return experts or "per-expert"


def write_tiny_model(
    output: Path, arch: str = "llama", *, seed: int = 0, overwrite: bool = False, experts: str | None = None
) -> Path:
    """The `tiny-model` recipe: a tiny checkpoint (a causal LM, or a vision-language model) written
    atomically to `output`; a mixture-of-experts model's experts stored as expert_layout says."""
    from piece_surgery.io.outputs import atomic_path, check_output
    from piece_surgery.io.sniff import CHECKPOINT

    if arch not in TINY_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES:
        choices = ", ".join(TINY_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES)
        raise PieceError(f"unknown --arch '{arch}'; use {choices}")
    experts = expert_layout(arch, experts) or "per-expert"
    from piece_surgery.runtime.options import check_seed

    check_seed(seed)
    output = check_output(output, overwrite=overwrite, kind=CHECKPOINT)
    with atomic_path(output, is_dir=True) as tmp:
        if arch in VISION_LANGUAGE_ARCHITECTURES:
            make_tiny_vision_language_model(tmp, arch, seed=seed)
        else:
            make_tiny_checkpoint(tmp, arch, seed=seed, experts=experts)
    return Path(output)


if __name__ == "__main__":
    import sys

    out = make_tiny_checkpoint(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "llama")
    print(out)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_torchrun(ranks: int) -> list[str]:
    """The command that starts `ranks` processes on this machine under torchrun, on a free local
    port (add the script or `-m module` and its arguments)."""
    port = free_port()
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
    ]
