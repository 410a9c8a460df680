import json

import pytest
import torch
from helpers import assert_clean_failure, bitwise_equal, delta_entries, moved_by_brute_force, read_all
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from piece_surgery.evaluation.loss import evaluate
from piece_surgery.formats.delta_folder import load_delta
from piece_surgery.models.checkpoint import open_checkpoint
from piece_surgery.models.loading import load_causal_lm
from piece_surgery.recipes.apply import apply
from piece_surgery.recipes.score import score_checkpoint
from piece_surgery.runtime.options import RunOptions
from piece_surgery.scoring.options import ScoreOptions
from piece_surgery.training.config import TrainConfig
from piece_surgery.training.loop import train_sparse


def setup(folder, data, density=0.02, dtype="float32", method="piece-s"):
    scoring_data = None if method in ("magnitude", "random") else data
    mask, _, _ = score_checkpoint(
        str(folder), scoring_data, ScoreOptions(method=method, density=density), run=RunOptions(device="cpu")
    )
    checkpoint = open_checkpoint(folder)
    dataset = checkpoint.load_data(data)
    loaded = checkpoint.load_model(device="cpu", dtype=dtype)
    return mask, dataset, loaded.module, loaded.parameters(mask.indices)


def test_only_masked_entries_change_and_loss_goes_down(tiny, code_data):
    folder = tiny("llama")
    mask, dataset, model, params = setup(folder, code_data)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    loss_before = evaluate(model, dataset, 4, 0)
    result = train_sparse(model, params, mask.indices, dataset, TrainConfig(lr=1e-2, epochs=8))
    loss_after = evaluate(model, dataset, 4, 0)
    assert loss_after < loss_before - 0.3
    after = model.state_dict()
    changed_total = 0
    for name, old in before.items():
        diff = (after[name] != old).view(-1)
        allowed = torch.zeros_like(diff)
        key = "lm_head.weight" if name == "lm_head.weight" else name
        if key in mask.indices:
            allowed[mask.indices[key]] = True
        assert not bool((diff & ~allowed).any()), f"{name} changed outside the mask"
        changed_total += int(diff.sum())
    assert changed_total > 0.9 * mask.k
    # optimizer state is two fp32 moments of the k values, plus one step counter per tensor
    assert result.optimizer_state["exp_avg"] == result.optimizer_state["exp_avg_sq"] == mask.k
    assert result.optimizer_state["step"] == len(mask.indices)


def test_train_cli_writes_delta_that_applies(tiny, code_data, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    code, stdout, _ = cli(
        "train",
        base,
        "--data",
        code_data,
        "-o",
        tmp_path / "delta",
        "--density",
        "0.02",
        "--lr",
        "1e-2",
        "--epochs",
        "4",
        "--eval-data",
        code_data,
        "--json",
        "-q",
    )
    assert code == 0
    result = json.loads(stdout)
    assert result["final_train_loss"] < result["first_train_loss"]
    delta = load_delta(tmp_path / "delta")
    info = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert info["provenance"]["made_by"] == "train" and info["provenance"]["final_eval_loss"] is not None
    assert info["tensor_bytes"] / info["count"] == 8.0
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    b, m = read_all(base), read_all(tmp_path / "merged")
    for name in b:
        changed = torch.nonzero((b[name] != m[name]).view(-1)).flatten()
        expected = delta.tensors[name].indices if name in delta.tensors else torch.empty(0, dtype=torch.long)
        assert torch.equal(changed, expected), name
    assert not (tmp_path / "delta.state").exists()


def test_score_then_train_equals_train_with_mask(tiny, code_data, tmp_path, cli):
    base = tiny("llama")
    common = ["--lr", "1e-3", "--max-steps", "3", "--batch-size", "2", "-q"]
    assert (
        cli("score", base, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q", "--density", "0.01")[
            0
        ]
        == 0
    )
    assert (
        cli(
            "train",
            base,
            "--data",
            code_data,
            "-o",
            tmp_path / "a",
            "--mask",
            tmp_path / "m.safetensors",
            *common,
        )[0]
        == 0
    )
    assert cli("train", base, "--data", code_data, "-o", tmp_path / "b", "--density", "0.01", *common)[0] == 0
    a, b = load_file(tmp_path / "a" / "delta.safetensors"), load_file(tmp_path / "b" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(tiny, code_data, tmp_path, cli, monkeypatch):
    import piece_surgery.training.loop as train_module

    base = tiny("llama")
    args = [
        "--data",
        code_data,
        "--density",
        "0.02",
        "--lr",
        "1e-2",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--save-every",
        "2",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "2",
        "-q",
    ]
    assert cli("train", base, "-o", tmp_path / "straight", *args)[0] == 0
    original = train_module.save_state

    def save_then_crash(state_dir, sparse, optimizer, step, *rest):
        original(state_dir, sparse, optimizer, step, *rest)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_state", save_then_crash)
    code, _, stderr = cli("train", base, "-o", tmp_path / "resumed", *args)
    assert code == 130 and not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.state" / "state.json").is_file()
    monkeypatch.setattr(train_module, "save_state", original)
    code, stdout, _ = cli("train", base, "-o", tmp_path / "resumed", *args, "--resume", "--json")
    assert code == 0 and json.loads(stdout)["resumed_from"] == 4
    a = load_file(tmp_path / "straight" / "delta.safetensors")
    b = load_file(tmp_path / "resumed" / "delta.safetensors")
    assert a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


def test_mask_from_another_model(tiny, code_data, tmp_path, cli):
    other = tiny("llama", seed=3)
    cli("score", other, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q")
    out = tmp_path / "delta"
    msg = assert_clean_failure(
        cli("train", tiny("llama"), "--data", code_data, "-o", out, "--mask", tmp_path / "m.safetensors"),
        output=out,
    )
    assert "scored on another model" in msg
    cli("score", tiny("gpt2"), "--data", code_data, "-o", tmp_path / "g.safetensors", "-q")
    msg = assert_clean_failure(
        cli("train", tiny("llama"), "--data", code_data, "-o", out, "--mask", tmp_path / "g.safetensors"),
        output=out,
    )
    assert "does not have" in msg


def test_bad_mask_indices(tiny, code_data, tmp_path, cli):
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = tiny("llama")
    cli("score", base, "--data", code_data, "-o", tmp_path / "m.safetensors", "-q", "--density", "0.01")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(tensors))
    for bad, fragment in ((tensors[name].flip(0), "not sorted"), (tensors[name] + 10**7, "out of range")):
        save_file({**tensors, name: bad.contiguous()}, tmp_path / "bad.safetensors", metadata=meta)
        out = tmp_path / "delta"
        msg = assert_clean_failure(
            cli("train", base, "--data", code_data, "-o", out, "--mask", tmp_path / "bad.safetensors"),
            output=out,
        )
        assert fragment in msg


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--schedule", "step"], "unknown --schedule"),
        (["--betas", "0.9"], "--betas"),
    ],
)
def test_bad_options(tiny, code_data, tmp_path, cli, extra, fragment):
    out = tmp_path / "delta"
    assert fragment in assert_clean_failure(
        cli("train", tiny("llama"), "--data", code_data, "-o", out, *extra), output=out
    )


def test_empty_data(tiny, tmp_path, cli):
    (tmp_path / "e.txt").write_text("")
    out = tmp_path / "delta"
    assert "no examples" in assert_clean_failure(
        cli("train", tiny("llama"), "--data", tmp_path / "e.txt", "-o", out), output=out
    )


def test_nan_loss_stops_and_keeps_last_good_state(tiny, code_data, tmp_path, cli, monkeypatch):
    import piece_surgery.training.steps as train_module

    calls = {"n": 0}
    real = train_module.token_loss_sum

    def flaky(logits, labels):
        calls["n"] += 1
        loss, count = real(logits, labels)
        # call 1 is the probe before the first step; steps 1-3 are calls 2-4
        return (loss * float("nan") if calls["n"] > 4 else loss), count

    monkeypatch.setattr(train_module, "token_loss_sum", flaky)
    out = tmp_path / "delta"
    result = cli(
        "train",
        tiny("llama"),
        "--data",
        code_data,
        "-o",
        out,
        "--batch-size",
        "1",
        "--max-steps",
        "5",
        "--save-every",
        "2",
        "-q",
    )
    msg = assert_clean_failure(result, output=out)
    assert "loss became nan at step 4" in msg and "last good state (step 2)" in msg
    assert (tmp_path / "delta.state" / "state.json").is_file()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_families_end_to_end(tiny, code_data, tmp_path, cli, arch):
    """GPT-2 (Conv1D, tied wte) and Qwen2 (tied embeddings): score, train, apply, diff back."""
    base = tiny(arch)
    assert (
        cli("score", base, "--data", code_data, "-o", tmp_path / "m.safetensors", "--density", "0.02", "-q")[
            0
        ]
        == 0
    )
    mask = tmp_path / "m.safetensors"
    code, _, err = cli(
        "train", base, "--data", code_data, "--mask", mask, "-o", tmp_path / "d", "--lr", "1e-2", "-q"
    )
    assert code == 0, err
    assert cli("apply", base, tmp_path / "d", "-o", tmp_path / "merged", "-q")[0] == 0
    assert cli("diff", base, tmp_path / "merged", "-o", tmp_path / "d2")[0] == 0
    a, b = load_file(tmp_path / "d" / "delta.safetensors"), load_file(tmp_path / "d2" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("wte" in k or "embed" in k for k in a)


def test_selected_entry_gradients_train_like_dense_gradients(tiny, code_data):
    folder = tiny("llama")
    runs = []
    for sparse_linear in (True, False):
        mask, dataset, model, params = setup(folder, code_data)
        config = TrainConfig(lr=1e-3, max_steps=3, batch_size=2)
        runs.append(train_sparse(model, params, mask.indices, dataset, config, sparse_linear=sparse_linear))
    fast, dense = runs
    assert fast.values.keys() == dense.values.keys()
    for name in fast.values:
        torch.testing.assert_close(fast.values[name], dense.values[name], rtol=1e-4, atol=1e-6)
    assert abs(fast.train_loss - dense.train_loss) < 1e-4


def test_norm_gains_can_train_at_their_own_rate(tiny, code_data):
    folder = tiny("llama")
    # magnitude picks the norm gains (initialised to 1) before any matrix entry (~0.02)
    mask, dataset, model, params = setup(folder, code_data, density=0.05, method="magnitude")
    norms = [n for n in mask.indices if "norm" in n]
    assert norms, "the test needs norm gains in the mask"
    train_sparse(model, params, mask.indices, dataset, TrainConfig(lr=1e-2, max_steps=3, norm_lr_scale=0.0))
    base = load_causal_lm(folder, dtype=torch.float32, device=torch.device("cpu")).state_dict()
    for name in norms:
        assert torch.equal(model.state_dict()[name], base[name]), f"{name} moved at lr x 0"
    others = [n for n in mask.indices if n not in norms]
    assert any(not torch.equal(model.state_dict()[n], base[n]) for n in others)


def test_gradient_checkpointing_trains_the_same_values(tiny, code_data):
    """Whole-layer checkpointing around the norms' own recomputation: same values, same loss."""
    folder = tiny("llama")
    runs = []
    for checkpointing in (False, True):
        mask, dataset, model, params = setup(folder, code_data, density=0.05, method="magnitude")
        assert any("norm" in n for n in mask.indices), "the test needs trained norm gains"
        config = TrainConfig(lr=1e-3, max_steps=3, batch_size=2, gradient_checkpointing=checkpointing)
        runs.append(train_sparse(model, params, mask.indices, dataset, config))
        assert model.is_activation_checkpointing == checkpointing
    plain, checkpointed = runs
    for name in plain.values:
        torch.testing.assert_close(checkpointed.values[name], plain.values[name], rtol=1e-5, atol=1e-7)
    assert abs(plain.train_loss - checkpointed.train_loss) < 1e-5


def test_gradient_checkpointing_on_a_model_without_it_is_a_clear_error():
    from piece_surgery.models.loading import enable_activation_checkpointing
    from piece_surgery.runtime.errors import PieceError

    with pytest.raises(PieceError, match="does not support --gradient-checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gemma3"])
def test_every_split_of_a_global_batch_trains_the_same_values(tiny, tmp_path, cli, arch):
    """--batch-size 4 against 2 x --grad-accum 2 against 1 x 4, on examples of very different
    lengths: the step's loss is the mean over the step's tokens, so the values agree to rounding."""
    data = tmp_path / "mixed.txt"
    data.write_text(
        "a\n"
        + "def add(a, b):\n".replace("\n", " ") * 9
        + "\nThe quick brown fox.\n"
        + "Sparse updates keep general ability. " * 4
        + "\nx = 1\n"
        + "import os " * 7
        + "\n"
    )
    mask = tmp_path / "mask.safetensors"
    model = tiny(arch)
    assert cli("score", model, "-o", mask, "--method", "magnitude", "--density", "0.05", "-q")[0] == 0
    values = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"d{batch}"
        args = ["train", model, "--data", data, "--mask", mask, "-o", out, "--lr", "1e-3", "-q"]
        assert cli(*args, "--max-steps", "4", "--batch-size", batch, "--grad-accum", accum)[0] == 0
        tensors = load_file(out / "delta.safetensors")
        values.append({k: v.view(torch.float32) for k, v in tensors.items() if k.endswith("::tuned")})
        base = {k: v.view(torch.float32) for k, v in tensors.items() if k.endswith("::base")}
    change = max(float((values[0][k] - base[k.replace("tuned", "base")]).abs().max()) for k in values[0])
    assert change > 1e-4  # the runs did move the values
    for other in values[1:]:
        assert other.keys() == values[0].keys()
        for key in other:
            torch.testing.assert_close(other[key], values[0][key], rtol=1e-5, atol=1e-7)


def test_the_sparse_trainer_matches_plain_adamw_on_dense_weights_with_masked_gradients(tiny, code_data):
    """An independent reference: the dense model, every weight a parameter, its gradient zeroed
    outside the mask, and torch.optim.AdamW over all of it (zero gradients leave the other entries
    where they are: no weight decay). Same examples per step, same loss (the mean over the step's
    loss-bearing tokens), same clipping: the mask's entries end where the sparse trainer puts them."""
    from piece_surgery.data.batches import collate
    from piece_surgery.evaluation.loss import token_loss_sum
    from piece_surgery.training.schedule import step_examples

    folder = tiny("llama")
    mask, dataset, model, params = setup(folder, code_data, density=0.05)
    config = TrainConfig(lr=3e-3, max_steps=4, batch_size=2, grad_accum=2, clip=0.05)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    named = dict(reference.named_parameters())
    masked = {name: named[name] for name in mask.indices}  # stored names are the parameter names here
    keep = {n: torch.zeros(p.numel(), dtype=torch.bool) for n, p in masked.items()}
    for n, idx in mask.indices.items():
        keep[n][idx] = True
    optimizer = torch.optim.AdamW(list(masked.values()), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for p in reference.parameters():
        p.requires_grad_(any(p is q for q in masked.values()))
    for step in range(4):
        chosen = step_examples(step, len(dataset.examples), config)
        tokens = sum(dataset.examples[i].loss_tokens for i in chosen)
        for start in range(0, len(chosen), 2):
            batch = collate([dataset.examples[i] for i in chosen[start : start + 2]], 0)
            logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            (token_loss_sum(logits, batch["labels"])[0] / tokens).backward()
        for n, p in masked.items():
            p.grad.view(-1)[~keep[n]] = 0.0
        torch.nn.utils.clip_grad_norm_(list(masked.values()), 0.05)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = train_sparse(model, params, mask.indices, dataset, config)
    for name, idx in mask.indices.items():
        expected = masked[name].detach().reshape(-1)[idx]
        torch.testing.assert_close(result.values[name], expected, rtol=1e-5, atol=1e-6)
        outside = masked[name].detach().reshape(-1)[~keep[name]]
        assert torch.equal(outside, params[name].detach().reshape(-1)[~keep[name]])  # untouched either way


@pytest.mark.parametrize("lr", [1e-5, 1e-9])
def test_a_bf16_run_on_an_fp32_checkpoint_records_only_what_training_moved(tiny, code_data, tmp_path, lr):
    """--dtype bfloat16 on fp32 files: the rounding into bf16 is no change (issue: at lr 1e-9 nearly
    every entry was written as changed, and applying the delta rounded the base)."""
    from piece_surgery.formats.delta import DeltaInfo
    from piece_surgery.formats.delta_folder import save_delta
    from piece_surgery.training.deltas import trained_delta

    folder = tiny("llama")
    mask, dataset, model, params = setup(folder, code_data, density=0.02, dtype="bfloat16")
    checkpoint = open_checkpoint(folder)
    result = train_sparse(model, params, mask.indices, dataset, TrainConfig(lr=lr, max_steps=3))
    delta = trained_delta(
        checkpoint,
        checkpoint.load_model(device="cpu", dtype="bfloat16"),
        mask.indices,
        result.values,
        DeltaInfo(),
    )
    stored = read_all(folder)
    expected = moved_by_brute_force(stored, mask.indices, result.values, torch.bfloat16)
    assert delta_entries(delta) == expected
    assert all(bitwise_equal(td.base, stored[n].reshape(-1)[td.indices]) for n, td in delta.tensors.items())
    if lr == 1e-9:
        assert not expected and result.unchanged_entries == mask.k
        assert "no entry changed in bfloat16" in result.unchanged_reason
        return
    assert 0 < len(expected) < mask.k  # some entries moved in bf16, some did not
    # the base with the delta applied, loaded in bf16, is the trained model bit for bit
    save_delta(delta, tmp_path / "delta")
    apply(str(folder), [str(tmp_path / "delta")], tmp_path / "merged")
    merged = load_causal_lm(tmp_path / "merged", dtype=torch.bfloat16, device=torch.device("cpu"))
    now = model.state_dict()
    for name, weight in merged.state_dict().items():
        assert bitwise_equal(weight, now[name]), name


def test_updates_lost_to_rounding_are_a_warning_with_their_numbers(tiny, code_data, tmp_path, cli):
    """A warning (one line, and in --json) when most entries with a gradient end unchanged, not only
    when all do; one that names float32 when the update underflowed before any rounding to bf16."""
    base = tiny("llama", dtype=torch.bfloat16)
    mask = tmp_path / "m.safetensors"
    assert cli("score", base, "--data", code_data, "-o", mask, "--density", "0.01", "-q")[0] == 0

    def train(lr, *extra):
        out = tmp_path / f"d{lr}"
        args = ["train", base, "--data", code_data, "--mask", mask, "-o", out, "--max-steps", "3", "-q"]
        code, stdout, err = cli(*args, *([] if lr is None else ["--lr", lr]), *extra)
        assert code == 0, err
        return stdout, out

    report = json.loads(train(1e-6, "--json", "--overwrite")[0])
    changed, lost, k = report["entries"], report["unchanged_entries"], report["mask_entries"]
    assert changed > 0 and lost > k / 2 and changed + lost == k  # every entry had a gradient here
    assert load_delta(tmp_path / "d1e-06").count == changed
    reason = report["unchanged_reason"]
    assert f"{lost:,} of the {k:,} mask entries with a non-zero gradient" in reason
    assert "below bfloat16 resolution" in reason and "float32" in reason and "\n" not in reason
    stdout, _ = train(1e-6, "--overwrite")
    assert f"warning: {reason}" in stdout.splitlines()

    reason = json.loads(train(1e-14, "--json")[0])["unchanged_reason"]
    assert "no entry changed in bfloat16" in reason and "underflowed already in float32" in reason
    assert "--lr 1e-14" in reason and "bfloat16 resolution" not in reason

    report = json.loads(train(None, "--json")[0])  # the default lr: next to nothing lost, no warning
    assert report["unchanged_reason"] is None and report["unchanged_entries"] < k / 10
