"""The newer features under attack (issue 21): outputs spelled to reach an input, recipes that say
one thing and mean another, inputs that explode or wait forever, readers of adapters and the
environment, and messages that name the real cause before any expensive work."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_clean_failure, peft_adapter, perturb, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piece_surgery.io.outputs import MARKER, check_output, refuse_overlap
from piece_surgery.runtime.errors import PieceError

EXAMPLES = int(os.environ.get("PIECE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=5000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture
def model(tiny, tmp_path):
    return shutil.copytree(tiny("llama"), tmp_path / "model")


@pytest.fixture
def deltas(model, tmp_path, cli):
    """Two deltas made side by side from `model`."""
    out = []
    for i in (1, 2):
        tuned = perturb(model, tmp_path / f"t{i}", fraction=0.02, seed=i, hard=False)
        assert cli("diff", model, tuned, "-o", tmp_path / f"d{i}", "-q")[0] == 0
        out.append(tmp_path / f"d{i}")
    return out


# ---------------------------------------------------------------- 1. an output never touches an input


def test_an_output_spelled_through_itself_replaces_it_cleanly(model, deltas, tmp_path, cli, monkeypatch):
    """merged/../merged is merged: --overwrite replaces it (it used to move it aside and crash,
    and the next run deleted the moved copy)."""
    monkeypatch.chdir(tmp_path)
    assert cli("apply", model, deltas[0], "-o", "merged", "-q")[0] == 0
    first = snapshot(tmp_path / "merged")
    for command in (
        ("apply", model, deltas[1], "-o", "merged/../merged", "--overwrite", "-q"),
        ("apply", model, deltas[0], "-o", "./merged/", "--overwrite", "-q"),
    ):
        code, _, err = cli(*command)
        assert code == 0, err
    assert {Path(k).name for k in snapshot(tmp_path / "merged")} == {Path(k).name for k in first}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]


@pytest.mark.parametrize("spelling", ["{p}", "{p}/", "./{n}/../{n}", "{p}/.", "{p}/../{n}"])
def test_every_spelling_of_an_input_is_refused_as_output(model, deltas, tmp_path, cli, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    output = spelling.format(p=str(model), n="model")
    before = snapshot(model)
    result = cli("apply", model, deltas[0], "-o", output, "--overwrite")
    assert result[0] == 2 and "error:" in result[2]
    assert snapshot(model) == before


def test_a_recipe_writing_over_its_own_folder_is_refused(model, deltas, tmp_path, cli):
    """`output: .` with --overwrite would have deleted the recipe and everything beside it."""
    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    recipe = folder / "r.yaml"
    for output in (".", "..", str(tmp_path)):
        recipe.write_text(yaml.safe_dump({"base": str(model), "deltas": [str(deltas[0])], "output": output}))
        before = snapshot(folder)
        result = cli("apply", "--recipe", recipe, "--overwrite")
        assert result[0] == 2 and "error:" in result[2], result
        assert snapshot(folder) == before


def test_the_original_base_is_an_input(model, deltas, tmp_path, cli):
    other = perturb(model, tmp_path / "other", fraction=0.5, seed=9, hard=False)
    assert cli("diff", model, tmp_path / "t1", "-o", tmp_path / "dc", "--compact", "-q")[0] == 0
    before = snapshot(model)
    assert_clean_failure(
        cli("apply", other, tmp_path / "dc", "-o", model, "--original-base", model, "--force", "--overwrite"),
        "overlaps input",
    )
    assert snapshot(model) == before


def test_a_base_an_adapter_names_is_an_input(tiny, tmp_path, cli):
    pytest.importorskip("peft")

    base = shutil.copytree(tiny("qwen2"), tmp_path / "base")
    peft_adapter(base, tmp_path / "adapter", modules_to_save=None)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(base)
    assert_clean_failure(cli("import", tmp_path / "adapter", "-o", base / "delta"), "overlaps input")
    assert snapshot(base) == before


SPELLINGS = st.sampled_from(["{a}", "{a}/", "{a}/.", "{r}", "./{r}", "{r}/../{last}", "{link}", "~/{home}"])


def test_the_training_state_folder_never_takes_an_input(model, deltas, tmp_path, cli, code_data, monkeypatch):
    """train -o X keeps its state in X.state: an input named so (the base, a folder holding the
    data, an --avoid delta) is refused as it is for -o, with or without --overwrite, and a folder
    there that is not a training state, or a link, is never deleted."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model, "mm.state")
    (tmp_path / "q.state").mkdir()
    shutil.copy(code_data, "q.state/d.jsonl")
    shutil.copytree(deltas[0], "av.state")
    base = ["--max-steps", "1", "--density", "0.05", "-q"]
    cases = [
        (["train", "mm.state", "--data", code_data, "-o", "mm", *base], "mm.state"),
        (["train", model, "--data", "q.state/d.jsonl", "-o", "q", *base], "q.state"),
        (["train", model, "--data", code_data, "--avoid", "av.state", "-o", "av", *base], "av.state"),
    ]
    for args, victim in cases:
        before = snapshot(tmp_path / victim)
        for extra in ([], ["--overwrite"], ["--save-every", "1", "--overwrite"]):
            result = cli(*args, *extra)
            assert_clean_failure(result, "overlaps", output=tmp_path / args[args.index("-o") + 1])
            assert snapshot(tmp_path / victim) == before
    other = tmp_path / "other.state"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = cli("train", model, "--data", code_data, "-o", "other", *base, "--overwrite")
    assert_clean_failure(result, "holds something else", output=tmp_path / "other")
    assert (other / "notes.txt").read_text() == "mine"
    (tmp_path / "st").mkdir()
    os.symlink("st", "sym.state")
    result = cli("train", model, "--data", code_data, "-o", "sym", *base, "--save-every", "1", "--overwrite")
    assert_clean_failure(result, "is a link or a file", output=tmp_path / "sym")
    assert (tmp_path / "st").is_dir()


@FUZZ
@given(out=SPELLINGS, inp=SPELLINGS, inside=st.booleans())
def test_overlap_is_decided_on_the_paths_themselves(tmp_path_factory, monkeypatch, out, inp, inside):
    """Any two spellings (absolute, relative, with `.` and `..`, `~`, a symlink) of one folder, or of
    a folder and a file inside it, overlap; a sibling whose name starts the same does not."""
    root = tmp_path_factory.mktemp("spell")
    target = root / "data" / "model"
    (target / "inner").mkdir(parents=True)
    (root / "data" / "model-2").mkdir()
    (root / "link").symlink_to(target)
    monkeypatch.chdir(root / "data")
    monkeypatch.setenv("HOME", str(root))
    names = {
        "a": str(target),
        "r": "model",
        "last": "model",
        "link": str(root / "link"),
        "home": "data/model",
    }
    output = out.format(**names)
    source = inp.format(**names) + ("/inner" if inside else "")
    with pytest.raises(PieceError, match="overlaps input"):
        refuse_overlap(output, [source])
    refuse_overlap(str(root / "data" / "model-2"), [source])  # a sibling: fine


def test_only_provable_leftovers_are_removed_and_a_moved_output_comes_back(tmp_path):
    """A dead run's temporary is removed only if its marker names this output; an output a killed
    run had moved aside, with nothing in its place, is put back."""
    output = tmp_path / "merged"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    foreign = tmp_path / f".merged.{dead}.abc.tmp"
    foreign.mkdir()
    (foreign / "precious").write_text("not ours")
    other = tmp_path / f".merged.{dead}.def.tmp"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"output": str(tmp_path / "elsewhere")}))
    ours = tmp_path / f".merged.{dead}.ghi.tmp"
    ours.mkdir()
    (ours / MARKER).write_text(json.dumps({"output": str(output)}))
    moved = tmp_path / f".merged.{dead}.jkl.old"
    (moved / "merged").mkdir(parents=True)
    (moved / "merged" / "model.safetensors").write_text("the old output")
    (moved / MARKER).write_text(json.dumps({"output": str(output)}))
    check_output(output, overwrite=True)
    assert foreign.is_dir() and other.is_dir() and not ours.exists() and not moved.exists()
    assert (output / "model.safetensors").read_text() == "the old output"


# ---------------------------------------------------------------- 2. what a file says is what is used


def write_recipe(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(text)
    return folder / "r.yaml"


def test_a_recipe_path_is_never_read_from_the_current_folder(model, deltas, tmp_path, cli, monkeypatch):
    recipe = write_recipe(tmp_path / "recipes", f"base: {model}\ndeltas: [d1]\noutput: out\n")
    monkeypatch.chdir(tmp_path)  # where a d1 lies, but not beside the recipe
    line = assert_clean_failure(cli("apply", "--recipe", recipe), output=tmp_path / "recipes" / "out")
    assert "not found" in line or "not beside the recipe" in line


def test_tilde_expands_in_every_key(model, deltas, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = write_recipe(
        tmp_path / "r", "base: ~/model\ndeltas: [{path: ~/d1, scale: 1e-3}]\noutput: ~/out\n"
    )
    code, stdout, err = cli("apply", "--recipe", recipe, "--json")
    assert code == 0, err
    assert json.loads(stdout)["deltas"][0]["scale"] == 0.001  # YAML reads 1e-3 as a string
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("base: a\nbase: b\ndeltas: [d]\noutput: o\n", "appears twice"),
        ("base: a\ndeltas: [d]\noutput: o\non_conflict:\n", "'on_conflict' is empty"),
        ("base: a\ndeltas: [d]\noutput: o\nforce: null\n", "'force' is empty"),
        ("base: a\ndeltas: [{path: d, scale: }]\noutput: o\n", "empty scale"),
        ("base: a\ndeltas: [{path: d, scale: 1e-3x}]\noutput: o\n", "finite number"),
        ("base: a\n1: x\ndeltas: [d]\noutput: o\n", "not a string"),
        ("base: a\ndeltas: [d]\noutput: o\non_conflict: average\n", "use sum, mean, ties, error"),
        ("base: a\ndeltas: [d]\noutput:\n", "'output' must be"),
    ],
)
def test_recipes_are_read_strictly(tmp_path, cli, text, fragment):
    assert_clean_failure(cli("apply", "--recipe", write_recipe(tmp_path, text)), fragment)


def test_original_base_without_a_compact_delta_is_refused(model, deltas, tmp_path, cli):
    out = tmp_path / "o"
    assert_clean_failure(
        cli("apply", model, deltas[0], "-o", out, "--original-base", model), "none of these is", output=out
    )


# ---------------------------------------------------------------- 3. no explosion, no endless wait


def test_nested_aliases_do_not_explode(tmp_path, cli):
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    start = time.perf_counter()
    line = assert_clean_failure(
        cli("apply", "--recipe", write_recipe(tmp_path, laughs + "base: *i\n")), "aliases"
    )
    assert len(line) < 300 and time.perf_counter() - start < 5


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("where", ["data", "retain", "delta.json", "index", "adapter_config"])
def test_deeply_nested_json_is_one_line(model, deltas, tmp_path, cli, where, code_data):
    nested = deep(100_000)
    out = tmp_path / "o"
    if where == "data":
        (tmp_path / "d.jsonl").write_text('{"text": ' + nested + "}\n")
        result = cli("train", model, "--data", tmp_path / "d.jsonl", "-o", out)
    elif where == "retain":
        (tmp_path / "g.jsonl").write_text(nested + "\n")
        result = cli(
            "score",
            model,
            "--data",
            code_data,
            "--retain",
            tmp_path / "g.jsonl",
            "-o",
            tmp_path / "m.safetensors",
        )
    elif where == "delta.json":
        (deltas[0] / "delta.json").write_text(nested)
        result = cli("apply", model, deltas[0], "-o", out)
    elif where == "index":
        (model / "model.safetensors.index.json").write_text('{"weight_map": ' + nested + "}")
        result = cli("apply", model, deltas[0], "-o", out)
    else:
        pytest.importorskip("peft")
        (tmp_path / "ad").mkdir()
        (tmp_path / "ad" / "adapter_config.json").write_text(nested)
        torch_file = tmp_path / "ad" / "adapter_model.safetensors"
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, torch_file)
        result = cli("import", tmp_path / "ad", "--base", model, "-o", out)
    assert_clean_failure(result, "nested")


def run_cli(*args, env=None, timeout=60):
    """The console script in its own process (the environment is the point)."""
    script = Path(sys.executable).parent / "piece-surgery"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=environment
    )


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='2'"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "LOCAL_RANK",
        ),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "MASTER_PORT"),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1",
                "PIECE_DIST_TIMEOUT": "nan",
            },
            "PIECE_DIST_TIMEOUT",
        ),
    ],
)
def test_malformed_launch_variables_are_one_line(model, tmp_path, env, fragment):
    result = run_cli("score", model, "--method", "magnitude", "-o", tmp_path / "m.safetensors", env=env)
    assert_clean_failure((result.returncode, result.stdout, result.stderr), fragment)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_alone_says_so_within_the_rendezvous_timeout(model, tmp_path, rank):
    from piece_surgery.models.tiny import free_port

    env = {
        "WORLD_SIZE": "2",
        "RANK": rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PIECE_RENDEZVOUS_TIMEOUT": "2",
    }
    start = time.perf_counter()
    result = run_cli("score", model, "--method", "magnitude", "-o", tmp_path / "m.safetensors", env=env)
    fragment = "waited 2 s" if rank == "0" else "could not reach rank 0"
    assert_clean_failure((result.returncode, result.stdout, result.stderr), fragment)
    assert time.perf_counter() - start < 40


ENV_VALUES = st.one_of(
    st.none(),
    # what an environment can hold: no NUL, no lone surrogate (the OS refuses to set either)
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
    st.integers(-5, 70_000).map(str),
    st.sampled_from(["nan", "inf", "-1", "1e3", " 2 ", "0x10", "１"]),
)


@FUZZ
@given(
    values=st.fixed_dictionaries(
        {
            k: ENV_VALUES
            for k in (
                "WORLD_SIZE",
                "RANK",
                "LOCAL_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "PIECE_DIST_TIMEOUT",
                "PIECE_RENDEZVOUS_TIMEOUT",
            )
        }
    )
)
def test_the_launch_environment_is_read_or_refused_in_one_line(monkeypatch, values):
    from piece_surgery.runtime import distributed

    for key, value in values.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    try:
        if distributed.launched():
            launch = distributed.launch_environment()
            assert 0 <= launch.rank < launch.size and 1 <= launch.port <= 65535 and launch.timeout > 0
    except PieceError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400


# ---------------------------------------------------------------- 4. one line, never a traceback


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_a_corrupt_adapter_file_is_one_line(tiny, tmp_path, cli, content):
    pytest.importorskip("peft")

    base = tiny("qwen2")
    peft_adapter(base, tmp_path / "ad", modules_to_save=None)
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(content)
    assert_clean_failure(
        cli("import", tmp_path / "ad", "--base", base, "-o", tmp_path / "o"), output=tmp_path / "o"
    )


def test_an_adapter_with_tensors_of_the_wrong_type_is_one_line(tiny, tmp_path, cli):
    pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    base = tiny("qwen2")
    peft_adapter(base, tmp_path / "ad", modules_to_save=None)
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    save_file({k: torch.zeros(3, dtype=torch.int8) for k in load_file(weights)}, weights)
    assert_clean_failure(
        cli("import", tmp_path / "ad", "--base", base, "-o", tmp_path / "o"), "PEFT cannot load"
    )


CONFIGS = st.dictionaries(
    st.sampled_from(
        ["peft_type", "r", "target_modules", "base_model_name_or_path", "task_type", "lora_alpha", "x"]
    ),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.text(max_size=6),
        st.lists(st.text(max_size=4), max_size=3),
    ),
    max_size=6,
)


@settings(FUZZ, max_examples=min(EXAMPLES, 25))
@given(config=CONFIGS | st.sampled_from([[], "LORA", 3, None]))
def test_any_adapter_config_is_read_or_refused_in_one_line(tiny, tmp_path_factory, config):
    """Whatever adapter_config.json holds: a delta, or a one-line refusal."""
    pytest.importorskip("peft")
    from piece_surgery.recipes.import_adapter import import_peft

    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
        folder / "adapter_model.safetensors",
    )
    try:
        import_peft(str(folder), folder.parent / f"{folder.name}-out", base_ref=str(tiny("qwen2")))
    except PieceError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(
    text=st.text(max_size=300)
    | st.builds(
        yaml.safe_dump,
        st.dictionaries(
            st.sampled_from(["base", "deltas", "output", "scale", "force", "on_conflict"]),
            st.none()
            | st.integers()
            | st.floats()
            | st.text(max_size=5)
            | st.lists(
                st.text(max_size=5)
                | st.dictionaries(st.sampled_from(["path", "scale"]), st.text(max_size=4) | st.floats()),
                max_size=3,
            ),
        ),
    )
)
def test_any_recipe_is_read_or_refused_in_one_line(tmp_path_factory, text):
    from piece_surgery.formats.merge_recipe import load_recipe

    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    try:
        recipe = load_recipe(path)
        assert recipe.deltas and all(isinstance(scale, float) for _, scale in recipe.deltas)
    except PieceError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 500


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--shard-size", "infGB"), "not a size"),
        (("--shard-size", "nanMB"), "not a size"),
        (("--shard-size", "-1"), "not a size"),
    ],
)
def test_absurd_numbers_are_one_line(model, deltas, tmp_path, cli, args, fragment):
    assert_clean_failure(
        cli("apply", model, deltas[0], "-o", tmp_path / "o", *args), fragment, output=tmp_path / "o"
    )


@pytest.mark.parametrize("command", ["score", "train", "eval"])
@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"vocab_size": -5}, "negative dimension"),  # torch's RuntimeError building the model
        ({"num_attention_heads": 0}, "modulo by zero"),  # a ZeroDivisionError in the config's checks
        ({"hidden_size": "a"}, "hidden_size"),  # transformers 5's strict config: no ValueError
    ],
)
def test_a_config_no_model_can_be_built_from_is_one_line(
    model, tmp_path, cli, command, code_data, edit, fragment
):
    """A hand-edited config.json of sizes no model can have, or of the wrong type: each was a
    traceback (the errors transformers raises as ValueError, KeyError or TypeError were one line)."""
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **edit}))
    out = tmp_path / ("m.safetensors" if command == "score" else "o")
    args = {
        "score": ("score", model, "--method", "magnitude", "-o", out),
        "train": ("train", model, "--data", code_data, "-o", out, "--max-steps", "1"),
        "eval": ("eval", model, model, "--data", code_data),
    }[command]
    assert_clean_failure(cli(*args), fragment, output=out)


@pytest.mark.parametrize("command", ["score", "train", "tiny-model"])
def test_a_seed_past_64_bits_is_one_line(model, tmp_path, cli, command, code_data):
    seed = str(2**64)
    out = tmp_path / "o"
    if command == "tiny-model":
        result = cli("tiny-model", out, "--seed", seed)
    elif command == "score":
        out = tmp_path / "m.safetensors"
        result = cli("score", model, "--method", "random", "-o", out, "--seed", seed)
    else:
        result = cli("train", model, "--data", code_data, "-o", out, "--seed", seed)
    assert_clean_failure(result, "--seed", output=out)


def test_sampled_labels_from_a_broken_model_is_one_line(model, tmp_path, cli, code_data):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "m.safetensors"
    args = (
        "score",
        model,
        "--data",
        code_data,
        "--retain",
        code_data,
        "--retain-labels",
        "sampled",
        "-o",
        out,
    )
    assert_clean_failure(cli(*args), "probabilities are nan or inf", output=out)


# ---------------------------------------------------------------- 5. the real cause, before the work


def test_a_penalty_that_overflows_says_so(model, tmp_path, cli, code_data):
    out = tmp_path / "d"
    assert_clean_failure(
        cli("train", model, "--data", code_data, "-o", out, "--retain-weight", "1e300"),
        "retain penalty overflowed",
        output=out,
    )


def test_a_mask_is_named_as_readers_read_it(model, tmp_path, cli):
    out = tmp_path / "mask.st"
    assert_clean_failure(cli("score", model, "--method", "magnitude", "-o", out), ".safetensors", output=out)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a model is loaded: what is checked here must be checked before."""
    import piece_surgery.models.checkpoint as checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(checkpoint, "load_causal_lm", refuse)


def test_options_a_method_cannot_serve_are_refused_before_loading(
    model, tmp_path, cli, code_data, no_model_loading
):
    out = tmp_path / "d"
    assert_clean_failure(
        cli("train", model, "--data", code_data, "-o", out, "--method", "piece-s", "--retain-weight", "10"),
        "need a mask that carries the retain Fisher",
        output=out,
    )


def test_avoiding_every_entry_is_refused_before_loading(model, tmp_path, cli, code_data):
    full = tmp_path / "all.safetensors"
    assert cli("score", model, "--method", "magnitude", "--density", "1.0", "-o", full, "-q")[0] == 0
    import piece_surgery.models.checkpoint as checkpoint

    real = checkpoint.load_causal_lm
    try:
        checkpoint.load_causal_lm = lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
        out = tmp_path / "m.safetensors"
        assert_clean_failure(
            cli("score", model, "--data", code_data, "--method", "piece-s", "--avoid", full, "-o", out),
            "--avoid leaves 0",
            output=out,
        )
    finally:
        checkpoint.load_causal_lm = real


def test_export_holds_the_identity_rule_of_apply(tiny, tmp_path, cli, code_data):
    """A delta made on the bf16 copy of a base, exported against the fp32 base: refused like apply."""
    pytest.importorskip("peft")
    bf16 = tiny("llama", dtype=torch.bfloat16)
    mask, delta = tmp_path / "m.safetensors", tmp_path / "d"
    assert cli("score", bf16, "--method", "magnitude", "--density", "0.01", "-o", mask, "-q")[0] == 0
    assert cli("train", bf16, "--data", code_data, "--mask", mask, "-o", delta, "--lr", "1e-2", "-q")[0] == 0
    fp32 = tiny("llama")
    out = tmp_path / "adapter"
    assert_clean_failure(cli("apply", fp32, delta, "-o", tmp_path / "m2"), "bfloat16 in the delta")
    assert_clean_failure(cli("export", delta, "--base", fp32, "-o", out), "bfloat16 in the delta", output=out)


# ---------------------------------------------------------------- 6. what a new user hits


def test_ctrl_c_says_so_and_writes_nothing(model, tmp_path, code_data):
    script = Path(sys.executable).parent / "piece-surgery"
    out = tmp_path / "d"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        str(script),
        "train",
        str(model),
        "--data",
        str(code_data),
        "-o",
        str(out),
        "--epochs",
        "10000",
        "--json",
    ]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(8)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "error: interrupted; nothing was written" in stderr
    assert json.loads(stdout) == {"error": "interrupted; nothing was written", "exit_code": 130}
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".d.")]


def test_messages_are_printed_without_markup(model, tmp_path, cli):
    out = tmp_path / "runs[red]" / "m.safetensors"
    line = assert_clean_failure(cli("score", model, "--method", "magnitude", "-o", out))
    assert "runs[red]" in line


def test_help_names_values_and_finishes_its_sentences(cli):
    import re

    from piece_surgery.cli import ORDER

    code, top, _ = cli("--help")
    assert code == 0
    for command in ORDER:
        summary = next(line for line in top.splitlines() if line.strip().startswith(command + " "))
        assert summary.rstrip().endswith("."), summary  # not cut mid-sentence
        code, text, _ = cli(command, "--help")
        assert code == 0 and not re.search(r"<(str|int|float|path|list\[str\])>", text), (command, text)
    _, score, _ = cli("score", "--help")
    _, apply, _ = cli("apply", "--help")
    flat = lambda text: " ".join(text.split())  # noqa: E731 - help wraps at 80 columns
    assert "[required unless magnitude/random]" in flat(score) and "required unless --recipe" in flat(apply)


def test_the_card_shows_only_commands_that_run(model, deltas):
    from piece_surgery.formats.artifacts import open_delta
    from piece_surgery.formats.delta_folder import delta_card

    card = delta_card(open_delta(deltas[0]))
    assert "pip install piece-surgery" not in card


def test_a_benchmark_without_its_extras_says_what_to_install():
    sys.path.insert(0, str(Path(__file__).parent.parent.parent / "benchmarks"))
    from common import require_extras

    with pytest.raises(SystemExit) as stop:
        require_extras("not-a-package-anyone-has")
    assert "not-a-package-anyone-has" in str(stop.value) and "pip install" in str(stop.value)
