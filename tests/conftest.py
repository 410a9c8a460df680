import os
import socket
import sys
import tempfile

# The Hub client reads these when it is imported, so they are set before anything imports it:
# a local Hub-compatible server (tests/hub_server.py) on a port reserved now, a private cache,
# and no Xet (tests only; the product never disables it).
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    HUB_PORT = _s.getsockname()[1]
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="piece-surgery-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
for _name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402
import torch  # noqa: E402

from piece_surgery.models.tiny import make_tiny_checkpoint  # noqa: E402


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


@pytest.fixture(scope="session")
def hub_server():
    from http.server import ThreadingHTTPServer

    from hub_server import HubServer

    ThreadingHTTPServer.allow_reuse_address = True
    server = HubServer(port=HUB_PORT)
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, monkeypatch):
    """The local Hub with an accepted token in HF_TOKEN; state is shared by the session."""
    hub_server.state.tokens = {"hf_test_token"}
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return hub_server


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny LLaVA checkpoint with its processor (one per test module)."""
    from piece_surgery.models.tiny import make_tiny_vision_language_model

    return make_tiny_vision_language_model(tmp_path_factory.mktemp("llava"), "llava")
