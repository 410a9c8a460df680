"""push and Hub repo ids, against a local Hub-compatible server with the real huggingface_hub client."""

import json

import pytest
import torch
from helpers import assert_clean_failure, perturb, same_checkpoint, snapshot


@pytest.fixture
def delta_dir(tiny, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02)
    assert cli("diff", base, tuned, "-o", tmp_path / "delta")[0] == 0
    return base, tmp_path / "delta"


def one_line_error(result, fragment):
    assert_clean_failure(result, fragment)


def test_push_then_apply_by_repo_id_is_bit_exact(hub, delta_dir, tmp_path, cli):
    from huggingface_hub import HfApi

    base, delta = delta_dir
    code, stdout, _ = cli("push", delta, "user/delta-exact", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["url"].endswith("/user/delta-exact") and "delta.safetensors" in result["files"]
    api = HfApi()
    api.create_repo("user/base-exact", exist_ok=True)
    api.upload_folder(folder_path=str(base), repo_id="user/base-exact")
    assert cli("apply", base, delta, "-o", tmp_path / "local", "-q")[0] == 0
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    enable_progress_bars()
    code, _, stderr = cli("apply", "user/base-exact", "user/delta-exact", "-o", tmp_path / "remote", "-q")
    assert code == 0 and stderr == "" and are_progress_bars_disabled()  # -q silences the Hub's bars too
    enable_progress_bars()
    assert same_checkpoint(tmp_path / "local", tmp_path / "remote")
    # a revision pinned with @ resolves too
    commit = result["commit"]
    assert cli("apply", base, f"user/delta-exact@{commit}", "-o", tmp_path / "pinned", "-q")[0] == 0
    assert same_checkpoint(tmp_path / "local", tmp_path / "pinned")


def test_second_push_of_unchanged_delta_uploads_nothing(hub, delta_dir, cli):
    _, delta = delta_dir
    assert cli("push", delta, "user/delta-twice")[0] == 0
    repo = hub.state.repos["user/delta-twice"]
    head, uploaded = repo.refs["main"], hub.state.uploaded_bytes
    code, stdout, _ = cli("push", delta, "user/delta-twice", "--json")
    assert code == 0 and json.loads(stdout)["commit"] == head
    assert repo.refs["main"] == head and hub.state.uploaded_bytes == uploaded


def test_card_metadata_and_user_card_kept(hub, tiny, tmp_path, cli):
    from huggingface_hub import HfApi, ModelCard

    base = tiny("llama")
    api = HfApi()
    api.create_repo("user/base-card", exist_ok=True)
    api.upload_folder(folder_path=str(base), repo_id="user/base-card")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02)
    assert cli("diff", "user/base-card", tuned, "-o", tmp_path / "delta")[0] == 0
    assert cli("push", tmp_path / "delta", "user/delta-card")[0] == 0
    card = ModelCard.load("user/delta-card")
    assert card.data.base_model == "user/base-card"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "piece-surgery"
    assert {"piece-surgery", "sparse-delta", "diff"} <= set(card.data.tags)
    assert "piece-surgery apply user/base-card user/delta-card" in card.text

    # a local base: the card names the repo given with --base-model, never a path
    assert cli("diff", base, tuned, "-o", tmp_path / "local-delta")[0] == 0
    assert cli("push", tmp_path / "local-delta", "user/delta-local", "--base-model", "org/the-base")[0] == 0
    assert ModelCard.load("user/delta-local").data.base_model == "org/the-base"
    assert str(base) not in (tmp_path / "local-delta" / "README.md").read_text()

    own = "---\nlicense: mit\n---\n# My own card\n"
    (tmp_path / "delta" / "README.md").write_text(own)
    assert cli("push", tmp_path / "delta", "user/delta-own")[0] == 0
    assert (
        hub.state.repos["user/delta-own"].commits[hub.state.repos["user/delta-own"].refs["main"]]["README.md"]
        == own.encode()
    )


def test_branch_and_pull_request(hub, delta_dir, cli):
    _, delta = delta_dir
    assert cli("push", delta, "user/delta-branch", "--revision", "exp")[0] == 0
    repo = hub.state.repos["user/delta-branch"]
    assert "delta.safetensors" in repo.commits[repo.refs["exp"]] and not repo.commits[repo.refs["main"]]
    code, stdout, _ = cli("push", delta, "user/delta-branch", "--create-pr", "--json")
    assert code == 0 and json.loads(stdout)["pr_url"].endswith("/discussions/1")


def test_mask_push_and_use_by_id(hub, tiny, code_data, tmp_path, cli):
    base = tiny("llama")
    assert cli("score", base, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")[0] == 0
    assert cli("push", tmp_path / "m.safetensors", "user/mask")[0] == 0
    code, stdout, _ = cli("inspect", "user/mask", "--json")
    assert code == 0 and json.loads(stdout)["kind"] == "mask"
    code, _, err = cli(
        "train",
        base,
        "--data",
        code_data,
        "--mask",
        "user/mask",
        "-o",
        tmp_path / "d",
        "-q",
        "--max-steps",
        "1",
    )
    assert code == 0, err


def test_push_errors_leave_the_delta_untouched(hub, delta_dir, cli, monkeypatch):
    _, delta = delta_dir
    before = snapshot(delta)
    monkeypatch.delenv("HF_TOKEN")
    one_line_error(cli("push", delta, "user/delta-err"), "no Hub token")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_error(cli("push", delta, "user/delta-err"), "refused the token (401)")
    one_line_error(cli("push", delta, "not a repo"), "not a Hub repo id")
    assert snapshot(delta) == before


def test_download_errors(hub, delta_dir, tmp_path, cli, monkeypatch):
    import huggingface_hub.constants as constants

    base, delta = delta_dir
    out = tmp_path / "out"
    one_line_error(cli("apply", base, "user/no-such-delta", "-o", out), "repository not found")
    assert cli("push", delta, "user/delta-rev")[0] == 0
    one_line_error(cli("apply", base, "user/delta-rev@no-such-branch", "-o", out), "revision not found")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    one_line_error(cli("apply", base, "user/never-downloaded", "-o", out), "not in the local cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    one_line_error(cli("apply", base, "user/never-downloaded", "-o", out), "cannot be reached")
    assert not out.exists()


def test_a_hub_cache_that_cannot_be_used_is_named_not_the_network(hub, delta_dir, tmp_path, cli, monkeypatch):
    """HF_HOME or HF_HUB_CACHE naming a file (or a folder it may not write) is a local problem; it
    read as 'cannot reach the Hub (NotADirectoryError); check the network'."""
    import huggingface_hub.constants as constants

    base, delta = delta_dir
    assert cli("push", delta, "user/delta-cache")[0] == 0
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(not_a_folder / "hub"))
    out = tmp_path / "out"
    line = assert_clean_failure(cli("apply", base, "user/delta-cache", "-o", out), "HF_HOME", output=out)
    assert "cache-file" in line and "network" not in line
