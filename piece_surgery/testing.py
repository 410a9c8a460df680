"""Tiny random causal LMs with a real tokenizer, built offline: for tests, examples and demos."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch

from piece_surgery.errors import PieceError

TINY_ARCHITECTURES = ("llama", "gpt2", "qwen2", "gemma3")
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


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a built-in paragraph (deterministic, no download)."""
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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides):
    """A config a few hundred KB big for the given family: llama, gpt2, qwen2 or gemma3 (its text
    model; tied embeddings, as every Gemma 3)."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **special,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **special,
        )
    elif arch == "gemma3":
        config = Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=16,
            **special,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use {', '.join(TINY_ARCHITECTURES)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tiny_checkpoint(
    path: Path,
    arch: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Build, randomly initialise (seeded) and save a tiny causal LM plus tokenizer to `path`."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_model(output: Path, arch: str = "llama", *, seed: int = 0, overwrite: bool = False) -> Path:
    """The `tiny-model` recipe: a tiny checkpoint written atomically to `output`."""
    from piece_surgery.outputs import atomic_path, check_output

    if arch not in TINY_ARCHITECTURES:
        raise PieceError(f"unknown --arch '{arch}'; use {', '.join(TINY_ARCHITECTURES)}")
    from piece_surgery.options import check_seed

    check_seed(seed)
    output = check_output(output, overwrite=overwrite, kind="folder")
    with atomic_path(output, is_dir=True) as tmp:
        make_tiny_checkpoint(tmp, arch, seed=seed)
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
