import sys

import pytest
import torch

from piece_surgery.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Build tiny checkpoints once per session: tiny(arch, dtype=..., shards=...) -> folder."""
    cache = {}

    def build(arch="llama", dtype=torch.float32, max_shard_size=None, seed=0):
        key = (arch, dtype, max_shard_size, seed)
        if key not in cache:
            name = f"{arch}-{str(dtype).split('.')[-1]}-{max_shard_size or 'single'}-{seed}"
            cache[key] = make_tiny_checkpoint(
                tmp_path_factory.mktemp(name), arch, dtype=dtype, max_shard_size=max_shard_size, seed=seed
            )
        return cache[key]

    return build


@pytest.fixture
def code_data(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"text": "def add(a, b):\\n    return a + b"}',
                '{"prompt": "Square a number.", "response": "def square(x):\\n    return x * x"}',
                '{"text": "import os\\nclass Model:\\n    pass"}',
                '{"messages": [{"role": "user", "content": "hi"}, '
                '{"role": "assistant", "content": "def f(): pass"}]}',
                '{"text": "for i in range(10):\\n    print(i)"}',
            ]
        )
        + "\n"
    )
    return path


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the real entry point in-process: returns (exit code, stdout, stderr)."""
    from piece_surgery.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["piece-surgery", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
