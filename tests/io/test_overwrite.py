"""--overwrite replaces a folder only when it holds what the command writes, or nothing: a home
folder, the current folder, a folder above it, a git repository or a folder of other files is never
removed (an `-o ~ --overwrite` once replaced a home folder with a delta)."""

import shutil
from pathlib import Path

import pytest
from helpers import assert_clean_failure, perturb, snapshot

from piece_surgery.io.outputs import atomic_path, check_output
from piece_surgery.io.sniff import CHECKPOINT, DELTA
from piece_surgery.runtime.errors import PieceError


@pytest.fixture
def work(tiny, tmp_path, cli):
    """A base, a tuned copy and a delta between them, in `tmp_path/in`."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = shutil.copytree(tiny("llama"), inputs / "base")
    tuned = perturb(base, inputs / "tuned", fraction=0.02, seed=1, hard=False)
    assert cli("diff", base, tuned, "-o", inputs / "delta", "-q")[0] == 0
    return base, tuned, inputs / "delta"


def writers(work, code_data, out):
    """Every command that writes a folder, writing to `out`."""
    base, tuned, delta = work
    train = ["--max-steps", "1", "--density", "0.05", "--batch-size", "2"]
    return {
        "diff": ["diff", base, tuned, "-o", out],
        "apply": ["apply", base, delta, "-o", out],
        "train": ["train", base, "--data", code_data, "-o", out, *train],
        "export": ["export", delta, "--base", base, "-o", out],
        "tiny-model": ["tiny-model", out],
    }


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "thesis.tex").write_text("also mine")
    return path


@pytest.mark.parametrize("command", ["diff", "apply", "train", "export", "tiny-model"])
def test_a_folder_of_other_files_is_never_replaced(work, code_data, tmp_path, cli, command):
    out = user_folder(tmp_path / "mine")
    before = snapshot(out)
    args = writers(work, code_data, out)[command]
    line = assert_clean_failure(cli(*args, "--overwrite", "-q"), "holds other files")
    assert "'notes.txt'" in line and "--overwrite only replaces" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["home", "cwd", "parent"])
def test_home_and_the_current_folder_are_never_replaced(work, code_data, tmp_path, cli, monkeypatch, where):
    """However they are spelled: `~`, `$HOME` as an absolute path, `../here`, a trailing slash."""
    home = user_folder(tmp_path / "home")
    here = user_folder(home / "project" / "inner")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    spellings = {  # home is also above the current folder: it is named as home
        "home": ["~", f"{home}/", "~/", "../../../home"],
        "cwd": [str(here), "../inner", f"{here}/"],
        "parent": [str(home / "project"), "..", "../../project"],
    }[where]
    before = snapshot(home)
    fragment = {"home": "home folder", "cwd": "current folder", "parent": "above the current one"}[where]
    for spelling in spellings:
        result = cli(*writers(work, code_data, spelling)["diff"], "--overwrite", "-q")
        if spelling in ("..", "../"):  # names no folder of its own: refused before that
            assert_clean_failure(result, "names no file or folder")
        else:
            assert_clean_failure(result, fragment)
        assert snapshot(home) == before


def test_a_git_repository_or_another_artifact_is_not_replaced(work, tmp_path, cli):
    base, tuned, delta = work
    repo = tmp_path / "clone"
    shutil.copytree(delta, repo)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = snapshot(repo)
    assert_clean_failure(cli("diff", base, tuned, "-o", repo, "--overwrite", "-q"), "is a git repository")
    assert snapshot(repo) == before
    checkpoint = shutil.copytree(base, tmp_path / "a-model")  # a checkpoint where a delta is written
    before = snapshot(checkpoint)
    line = assert_clean_failure(
        cli("diff", base, tuned, "-o", checkpoint, "--overwrite", "-q"), "holds a checkpoint"
    )
    assert "only replaces a delta" in line
    assert snapshot(checkpoint) == before


def test_what_the_command_writes_and_empty_folders_are_replaced(work, tmp_path, cli):
    base, tuned, delta = work
    out = shutil.copytree(delta, tmp_path / "out")
    (out / "stale.txt").write_text("left by hand")  # a delta folder is the delta's: all of it goes
    assert cli("diff", base, tuned, "-o", out, "--overwrite", "-q")[0] == 0
    assert (out / "delta.json").is_file() and not (out / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("apply", base, delta, "-o", empty, "--overwrite", "-q")[0] == 0
    assert (empty / "config.json").is_file()


def test_check_output_decides_on_the_folder_itself(tmp_path, monkeypatch):
    """The rule in io/outputs, against a brute-force reading of the folder."""
    monkeypatch.chdir(tmp_path)
    delta = tmp_path / "d"
    delta.mkdir()
    (delta / "delta.json").write_text("{}")
    assert check_output(delta, overwrite=True, kind=DELTA) == delta
    with pytest.raises(PieceError, match="holds a delta; --overwrite only replaces a checkpoint"):
        check_output(delta, overwrite=True, kind=CHECKPOINT)
    assert check_output(delta, overwrite=True, kind="folder") == delta
    linked = tmp_path / "link"
    linked.symlink_to(tmp_path)  # a link to the current folder is the current folder
    with pytest.raises(PieceError, match="current folder"):
        check_output(linked, overwrite=True, kind=DELTA)
    with pytest.raises(PieceError, match="mount point"):
        check_output(Path("/proc"), overwrite=True, kind=DELTA)


def test_an_output_another_command_wrote_meanwhile_is_not_replaced(tmp_path):
    """Two commands writing one output at once, neither with --overwrite: each found it absent, and
    the one that finished second replaced the first one's output, both saying 'wrote'."""
    out = tmp_path / "out"
    for is_dir in (True, False):
        shutil.rmtree(out, ignore_errors=True)
        check_output(out, overwrite=False, kind=DELTA if is_dir else "file")
        theirs = user_folder(out) / "notes.txt" if is_dir else out  # the other command's output
        theirs.write_text("theirs")
        refused = pytest.raises(PieceError, match="another command while this one ran.*--overwrite")
        with refused, atomic_path(out, is_dir=is_dir) as tmp:
            (tmp / "delta.json" if is_dir else tmp).write_text("ours")
        assert theirs.read_text() == "theirs"
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left
    check_output(out, overwrite=True, kind="file")  # with leave to replace it, it is replaced
    with atomic_path(out, is_dir=False) as tmp:
        tmp.write_text("ours")
    assert out.read_text() == "ours"
    out.unlink()
    check_output(out, overwrite=False, kind="file")
    with atomic_path(out, is_dir=False) as tmp:
        tmp.write_text("first")
    check_output(out, overwrite=True, kind="file")  # the same output written again, as asked
    with atomic_path(out, is_dir=False) as tmp:
        tmp.write_text("second")
    assert out.read_text() == "second"


def test_a_link_to_a_folder_given_as_the_output_is_replaced_by_the_output(work, tmp_path, cli):
    """`-o LINK --overwrite`, LINK a symbolic link to an empty folder: the output keeps its own name
    (output_path), so the link is replaced and the folder it named is left alone; it was a traceback
    (os.replace cannot put a folder over a link)."""
    base, _, delta = work
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, stderr = cli("apply", base, delta, "-o", link, "--overwrite", "-q")
    assert code == 0, stderr
    assert not link.is_symlink() and (link / "config.json").is_file()
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "link", "target"]  # no temporary left
