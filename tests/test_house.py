"""The shared pieces: one table of scoring methods, one JSON path for records, one set of run
options that every command loading a model takes."""

from pathlib import Path

import pytest

from piece_surgery.formats.mask import MaskInfo
from piece_surgery.runtime.errors import PieceError
from piece_surgery.runtime.options import RunOptions
from piece_surgery.runtime.records import AvoidRecord, CheckpointIdentity, DataRecord, RetainRecord
from piece_surgery.scoring.methods import METHODS, markdown_table, method_named
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.training.config import TrainConfig

README = Path(__file__).parent.parent / "README.md"


def test_the_readme_method_table_is_the_library_table():
    assert markdown_table() in README.read_text()
    assert len(markdown_table().splitlines()) == 2 + len(METHODS)


def test_what_a_method_needs_follows_from_what_it_keeps():
    for method in METHODS.values():
        assert method.needs_data == (method.keeps_sum or method.keeps_squares)
        assert method.source in ("PIECE", "baseline", "ours")
        assert not method.uses_retain or method.keeps_sum  # piece-r's numerator is the sum
    assert {m.name for m in METHODS.values() if m.source == "PIECE"} == {"piece-s", "piece-f"}
    with pytest.raises(PieceError, match="unknown method 'piece-x'; choose one of piece-r"):
        method_named("piece-x")


def test_records_read_back_what_they_wrote():
    retain = RetainRecord(
        sources=[DataRecord("g.txt", "ab" * 32, 3), DataRecord("self", "cd" * 32, 2, max_length=9)],
        labels="empirical",
        damping=0.01,
        damping_value=1e-9,
        fisher_scale=0.5,
        self_sampling={"seed": 0, "samples": 2, "length": 8},
    )
    info = MaskInfo(
        method="piece-r",
        density=0.001,
        options=ScoreOptions().to_json(),
        data_pass={"batches": 3},
        model=CheckpointIdentity("m", "u/m", None, "f"),
        retain=retain,
        avoid=[AvoidRecord("a", "mask", 4)],
    )
    as_json = info.to_json()
    assert as_json["pass"] == {"batches": 3} and as_json["retain"]["delta"] == 1e-9  # the file's keys
    assert MaskInfo.from_json(as_json) == info
    for record in (TrainConfig(lr=3e-4, betas=(0.8, 0.9)), ScoreOptions(method="piece-s"), RunOptions()):
        assert type(record).from_json(record.to_json()) == record
    assert "quiet" not in RunOptions().to_json()  # how a run prints is not what it did


def test_a_delta_records_the_config_that_made_it(tiny, code_data, tmp_path):
    from piece_surgery.formats.artifacts import open_delta
    from piece_surgery.recipes.train import train_checkpoint

    config = TrainConfig(lr=2e-3, max_steps=2, batch_size=2, betas=(0.8, 0.9), schedule="cosine")
    train_checkpoint(
        str(tiny("llama")),
        code_data,
        tmp_path / "d",
        config,
        RunOptions(device="cpu", max_length=64),
        score_options=ScoreOptions(method="magnitude", density=0.01),
    )
    recorded = open_delta(tmp_path / "d").info.provenance.hyperparameters
    assert TrainConfig.from_json(recorded) == config.for_mask("magnitude", False)
    assert recorded["max_length"] == 64


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"lr": "1e-3"}, "'lr' must be a number"),
        ({"betas": [0.9]}, "'betas' must hold 2 values"),
        ({"epochs": True}, "'epochs' must be an integer"),
        ({"schedule": None}, "'schedule' must be a string"),
    ],
)
def test_records_refuse_values_of_the_wrong_type(data, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig.from_json(data)


def test_every_run_option_is_an_option_of_every_command_that_loads_a_model(cli):
    import dataclasses

    for command in ("score", "train"):
        code, out, _ = cli(command, "--help")
        assert code == 0
        for field in dataclasses.fields(RunOptions):
            if field.metadata.get("cli", True):
                assert f"--{field.name.replace('_', '-')}" in out, (command, field.name)


def test_a_run_option_reaches_the_loader(tiny, code_data, tmp_path, cli, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("attn_implementation"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "m.safetensors"
    args = ("score", tiny("llama"), "--method", "magnitude", "-o", out, "-q", "--device", "cpu")
    assert cli(*args, "--attn-implementation", "eager")[0] == 0
    assert seen == ["eager"]
    code, _, err = cli(*args, "--attn-implementation", "fastest", "--overwrite")
    assert code == 2 and "unknown --attn-implementation 'fastest'" in err
