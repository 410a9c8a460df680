import json

import pytest
import torch
from helpers import bitwise_equal, perturb, read_all, same_checkpoint

from piece_surgery.formats.delta_folder import load_delta, save_delta
from piece_surgery.merging.diff import diff
from piece_surgery.merging.live import apply_to_model, revert_delta
from piece_surgery.recipes.apply import apply
from piece_surgery.runtime.errors import PieceError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_then_apply_reproduces_tuned_bit_for_bit(tiny, tmp_path, dtype):
    base = tiny("llama", dtype=dtype)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.03, seed=1)
    delta = diff(str(base), str(tuned))
    save_delta(delta, tmp_path / "delta")
    loaded = load_delta(tmp_path / "delta")
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    assert same_checkpoint(tmp_path / "merged", tuned)
    expected_changed = sum(
        int((read_all(base)[k].view(-1) != read_all(tuned)[k].view(-1)).sum()) for k in read_all(base)
    )
    assert loaded.count == delta.count == expected_changed
    assert (tmp_path / "merged" / "config.json").is_file() and (
        tmp_path / "merged" / "tokenizer.json"
    ).is_file()


def test_bf16_delta_costs_8_bytes_per_entry(tiny, tmp_path):
    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.01)
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    info = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert info["tensor_bytes"] / info["count"] == 8.0
    # readable with safetensors + numpy alone, as docs/formats.md says
    from safetensors.numpy import load_file as np_load

    arrays = np_load(str(tmp_path / "delta" / "delta.safetensors"))
    import numpy as np

    t = read_all(tuned)
    for name, meta in info["tensors"].items():
        idx = arrays[f"{name}::indices"]
        assert idx.dtype == np.int32 and len(idx) == meta["count"]
        as_float = (arrays[f"{name}::tuned"].view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(as_float, t[name].view(-1)[torch.from_numpy(idx).long()].float().numpy())


def test_side_by_side_deltas_stack_as_task_arithmetic(tiny, tmp_path):
    base = tiny("llama")
    t1 = perturb(base, tmp_path / "t1", fraction=0.05, seed=1, hard=False)
    t2 = perturb(base, tmp_path / "t2", fraction=0.05, seed=2, hard=False)
    for i, t in ((1, t1), (2, t2)):
        save_delta(diff(str(base), str(t)), tmp_path / f"d{i}")
    b, w1, w2 = read_all(base), read_all(t1), read_all(t2)
    for policy in ("sum", "mean"):
        plan = apply(
            str(base),
            [str(tmp_path / "d1"), str(tmp_path / "d2")],
            tmp_path / policy,
            scales=[0.5, 2.0],
            on_conflict=policy,
        )
        assert plan.overlap.conflicts > 0 and plan.overlap.chained == 0
        merged = read_all(tmp_path / policy)
        for name in b:
            c1 = 0.5 * (w1[name].double() - b[name].double())
            c2 = 2.0 * (w2[name].double() - b[name].double())
            both = (c1 != 0) & (c2 != 0)
            total = c1 + c2
            if policy == "mean":
                total = torch.where(both, total / 2, total)
            expected = (b[name].double() + total).to(b[name].dtype)
            assert torch.equal(merged[name], expected), name
    with pytest.raises(PieceError, match="on-conflict"):
        apply(str(base), [str(tmp_path / "d1"), str(tmp_path / "d2")], tmp_path / "err", on_conflict="error")
    assert not (tmp_path / "err").exists()


def test_sequential_deltas_reproduce_the_last_model(tiny, tmp_path):
    base = tiny("llama", dtype=torch.bfloat16)
    t1 = perturb(base, tmp_path / "t1", fraction=0.05, seed=1)
    t2 = perturb(t1, tmp_path / "t2", fraction=0.05, seed=2)  # task 2 trained on base + delta 1
    save_delta(diff(str(base), str(t1)), tmp_path / "d1")
    save_delta(diff(str(t1), str(t2)), tmp_path / "d2")
    plan = apply(str(base), [str(tmp_path / "d1"), str(tmp_path / "d2")], tmp_path / "merged")
    assert plan.overlap.chained > 0 and plan.overlap.conflicts == 0
    assert same_checkpoint(tmp_path / "merged", t2)
    # delta 2 alone does not fit the original base where delta 1 changed the same entries
    with pytest.raises(PieceError, match="not made from this base"):
        apply(str(base), [str(tmp_path / "d2")], tmp_path / "wrong")


def test_sharded_base_stays_sharded_and_loads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny("llama", max_shard_size="20KB")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02)
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == sorted(
        p.name for p in base.glob("*.safetensors")
    )
    assert same_checkpoint(tmp_path / "merged", tuned)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(model.lm_head.weight, read_all(tuned)["lm_head.weight"])
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "resharded", shard_size=10**9)
    assert [p.name for p in (tmp_path / "resharded").glob("*.safetensors")] == ["model.safetensors"]
    assert same_checkpoint(tmp_path / "resharded", tuned)


def test_density_keeps_largest_changes(tiny, tmp_path):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.2, hard=False)
    delta = diff(str(base), str(tuned), top_k=50)
    # among the entries score could select: every weight but the embedding table
    b = {n: v for n, v in read_all(base).items() if "embed" not in n}
    t = read_all(tuned)
    everything = sorted(
        (
            (-(t[n].double() - b[n].double()).abs().view(-1)[i].item(), n, i)
            for n in b
            for i in torch.nonzero(t[n].view(-1) != b[n].view(-1)).flatten().tolist()
        ),
    )[:50]
    expected = {}
    for _, n, i in everything:
        expected.setdefault(n, []).append(i)
    assert {n: d.indices.tolist() for n, d in delta.tensors.items()} == {
        n: sorted(v) for n, v in expected.items()
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_apply_and_revert(tiny, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    base = tiny("llama", dtype=dtype)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.03)
    delta = diff(str(base), str(tuned))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    handle = apply_to_model(model, delta)
    expected = read_all(tuned)
    for name, p in model.state_dict().items():
        if name in expected:
            assert bitwise_equal(p, expected[name]), name
    handle.revert()
    assert all(bitwise_equal(p, before[n]) for n, p in model.state_dict().items())
    apply_to_model(model, delta)
    revert_delta(model, delta)
    assert all(bitwise_equal(p, before[n]) for n, p in model.state_dict().items())


def test_dry_run_writes_nothing(tiny, tmp_path, cli):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned")
    assert cli("diff", base, tuned, "-o", tmp_path / "delta")[0] == 0
    code, stdout, _ = cli("apply", base, tmp_path / "delta", "-o", tmp_path / "out", "--dry-run", "--json")
    assert code == 0
    plan = json.loads(stdout)
    assert plan["dry_run"] and plan["entries"] > 0 and plan["output_bytes"] > 0
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_apply_by_scale_and_inspect(tiny, tmp_path, cli):
    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned")
    assert cli("diff", base, tuned, "-o", tmp_path / "delta", "--json")[0] == 0
    assert cli("apply", base, tmp_path / "delta", "-o", tmp_path / "zero", "--scale", "0", "-q")[0] == 0
    assert same_checkpoint(tmp_path / "zero", base)
    code, stdout, _ = cli("inspect", tmp_path / "delta", "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["kind"] == "delta" and summary["bytes_per_entry"] == 8.0


def test_output_shards_are_the_input_files_except_changed_entries(tiny, tmp_path):
    base = tiny("llama", dtype=torch.bfloat16, max_shard_size="20KB")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.02, hard=False)
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "zero", scales=[0.0])
    for f in base.glob("*.safetensors"):  # header, metadata, order and every byte kept
        assert (tmp_path / "zero" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "zero" / "model.safetensors.index.json").read_bytes() == (
        base / "model.safetensors.index.json"
    ).read_bytes()


def test_top_level_api_names_the_library_functions():
    import piece_surgery
    from piece_surgery.recipes import apply as merge
    from piece_surgery.training import loop as trainer

    assert piece_surgery.apply is merge.apply and piece_surgery.train_sparse is trainer.train_sparse
    with pytest.raises(AttributeError):
        piece_surgery.nothing_here  # noqa: B018


def test_apply_completes_short_reads_and_writes(tiny, tmp_path, monkeypatch):
    """Linux moves at most ~2 GiB per read or write call; a tensor larger than that (the embedding
    of a 70B model) must still be copied whole. Simulated with calls capped at 1000 bytes, on the
    path without a map (where reads and writes go through a buffer) and the kernel's copy."""
    import mmap
    import os

    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.03, seed=2)
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    real_preadv, real_pwrite, real_copy = os.preadv, os.pwrite, os.copy_file_range
    calls = {"read": 0, "write": 0, "copy": 0}

    def no_map(*args, **kwargs):
        raise OSError("no mmap on this file system")

    def short_copy(src, dst, count, offset_src, offset_dst):
        calls["copy"] += 1
        return real_copy(src, dst, min(count, 1000), offset_src, offset_dst)

    def short_preadv(fd, buffers, offset):
        calls["read"] += 1
        return real_preadv(fd, [memoryview(buffers[0])[:1000]], offset)

    def short_pwrite(fd, data, offset):
        calls["write"] += 1
        return real_pwrite(fd, memoryview(data)[:1000], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwrite", short_pwrite)
    monkeypatch.setattr(os, "copy_file_range", short_copy)
    monkeypatch.setattr(mmap, "mmap", no_map)
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    assert calls["read"] > 1 and calls["write"] > 1 and calls["copy"] > 1
    assert same_checkpoint(tmp_path / "merged", tuned)


def test_touched_spans_cover_exactly_the_pages_of_the_entries(monkeypatch):
    from piece_surgery.io import filepatch

    monkeypatch.setattr(filepatch, "MERGE_GAP", 0)  # pages only, no joining
    # a bf16 tensor at file offset 1000: entry i lives at bytes 1000 + 2i
    indices = torch.tensor([0, 1, 1548, 1549, 5000, 30000])
    spans = filepatch.touched_spans(indices, 2, 1000, 1000 + 2 * 40000)
    # brute force: the set of pages any entry's bytes fall in, clipped to the tensor
    pages = sorted({(1000 + 2 * int(i) + b) // 4096 for i in indices for b in (0, 1)})
    covered = sorted({p for lo, hi in spans for p in range(lo // 4096, (hi - 1) // 4096 + 1)})
    assert covered == pages
    assert spans[0][0] == 1000 and all(hi <= 1000 + 2 * 40000 for _, hi in spans)
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # sorted, disjoint
    assert filepatch.touched_spans(torch.tensor([], dtype=torch.int64), 2, 0, 100) == []
    gen = torch.Generator().manual_seed(0)
    for itemsize, begin in [(2, 8 + 126), (4, 4096 * 3 + 8)]:
        n = 50_000
        indices = torch.unique(torch.randint(0, n, (40,), generator=gen))
        end = begin + n * itemsize
        pages = sorted({(begin + int(i) * itemsize + b) // 4096 for i in indices for b in (0, itemsize - 1)})
        for gap in (0, 4096, 8 * 4096):
            monkeypatch.setattr(filepatch, "MERGE_GAP", gap)
            spans = filepatch.touched_spans(indices, itemsize, begin, end)
            covered = {p for lo, hi in spans for p in range(lo // 4096, (hi - 1) // 4096 + 1)}
            assert covered >= set(pages) and all(begin <= lo < hi <= end for lo, hi in spans)
            assert all(b[0] - a[1] >= max(gap, 4096) for a, b in zip(spans, spans[1:], strict=False))
            if gap == 0:
                assert sorted(covered) == pages


@pytest.mark.parametrize("merge_gap", [0, 4096, 1 << 16])
def test_apply_without_a_map_reads_only_the_pages_it_changes(tiny, tmp_path, monkeypatch, merge_gap):
    """Where the output cannot be memory-mapped, apply patches the kernel's copy by reading and
    writing back only the pages that hold changed entries."""
    import mmap
    import os

    from piece_surgery.io import filepatch

    def no_map(*args, **kwargs):
        raise OSError("no mmap on this file system")

    monkeypatch.setattr(mmap, "mmap", no_map)
    monkeypatch.setattr(filepatch, "MERGE_GAP", merge_gap)
    base = tiny("llama", dtype=torch.float32)
    # two entries of the embedding (40 KiB, ten pages)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.0002, seed=3, hard=False, names=["embed"])
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    read = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    assert same_checkpoint(tmp_path / "merged", tuned)
    embedding = read_all(base)["model.embed_tokens.weight"]
    assert embedding.numel() * 4 >= 10 * 4096
    if merge_gap == 0:
        assert 0 < sum(read) <= 4 * 4096  # each entry's page (or two, if it straddles)
    else:
        assert 0 < sum(read) <= embedding.numel() * 4


def test_apply_patches_the_kernels_copy_through_a_map(tiny, tmp_path, monkeypatch):
    """By default no byte of the base goes through a read buffer: the kernel copies each file and
    the changed entries are written through a map of the copy; the result is the tuned model."""
    import os

    base = tiny("llama", dtype=torch.bfloat16)
    tuned = perturb(base, tmp_path / "tuned", fraction=0.001, seed=5, hard=False)
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")

    def no_read(*args):
        raise AssertionError("apply read the base through a buffer")

    monkeypatch.setattr(os, "preadv", no_read)
    apply(str(base), [str(tmp_path / "delta")], tmp_path / "merged")
    assert same_checkpoint(tmp_path / "merged", tuned)


def test_diff_density_keeps_the_largest_fraction(tiny, tmp_path, cli):
    base = tiny("llama")
    tuned = perturb(base, tmp_path / "tuned", fraction=0.1, hard=False)
    code, stdout, _ = cli("diff", base, tuned, "-o", tmp_path / "delta", "--density", "0.01", "--json")
    assert code == 0
    # --density means what it means for score: a fraction of the eligible entries (no embedding table)
    b = {n: v for n, v in read_all(base).items() if "embed" not in n}
    t = read_all(tuned)
    k = int(0.01 * sum(x.numel() for x in b.values()))
    ranked = sorted(
        (-(t[n].double() - b[n].double()).abs().view(-1)[i].item(), n, i)
        for n in b
        for i in torch.nonzero(t[n].view(-1) != b[n].view(-1)).flatten().tolist()
    )[:k]
    expected = {}
    for _, n, i in ranked:
        expected.setdefault(n, []).append(i)
    delta = load_delta(tmp_path / "delta")
    assert json.loads(stdout)["entries"] == k == delta.count
    assert {n: d.indices.tolist() for n, d in delta.tensors.items()} == {
        n: sorted(v) for n, v in expected.items()
    }


def test_ties_keeps_the_changes_that_agree_with_the_summed_sign(tiny, tmp_path):
    base = tiny("llama")
    tuned = [perturb(base, tmp_path / f"t{i}", fraction=0.3, seed=i, hard=False) for i in range(3)]
    for i, t in enumerate(tuned):
        save_delta(diff(str(base), str(t)), tmp_path / f"d{i}")
    scales = [1.0, 0.5, 2.0]
    result = apply(
        str(base),
        [str(tmp_path / f"d{i}") for i in range(3)],
        tmp_path / "ties",
        scales=scales,
        on_conflict="ties",
    )
    assert result.overlap.sign_disagreements > 0
    b, merged = read_all(base), read_all(tmp_path / "ties")
    weights = [read_all(t) for t in tuned]
    for name in b:
        flat = b[name].view(-1).double()
        changes = torch.stack(
            [s * (w[name].view(-1).double() - flat) for s, w in zip(scales, weights, strict=True)]
        )
        expected = flat.clone()
        for i in range(flat.numel()):  # brute force, entry by entry
            c = [float(x) for x in changes[:, i] if x != 0]
            if len(c) > 1:
                sign = (sum(c) > 0) - (sum(c) < 0)
                expected[i] = flat[i] + sum(x for x in c if (x > 0) - (x < 0) == sign)
            elif c:
                expected[i] = flat[i] + c[0]
        assert torch.equal(merged[name].view(-1), expected.to(b[name].dtype)), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_switching_between_deltas_is_exact(tiny, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from piece_surgery.merging.switcher import DeltaSwitcher

    base = tiny("llama", dtype=dtype)
    t1 = perturb(base, tmp_path / "t1", fraction=0.05, seed=1)
    t2 = perturb(base, tmp_path / "t2", fraction=0.05, seed=2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    switcher = DeltaSwitcher(model)
    switcher.add("one", diff(str(base), str(t1)))
    save_delta(diff(str(base), str(t2)), tmp_path / "d2", format_version=2)
    switcher.add("two", load_delta(tmp_path / "d2"))
    switcher.add("half", diff(str(base), str(t1)), scale=0.5)
    expected = {"one": read_all(t1), "two": read_all(t2)}
    for name in ["one", "two", "one", None, "two", "one"]:
        switcher.activate(name)
        state = model.state_dict()
        target = expected[name] if name else original
        assert all(bitwise_equal(state[k], target[k]) for k in target if k in state), name
    with switcher.using("two"):
        assert bitwise_equal(model.state_dict()["lm_head.weight"], expected["two"]["lm_head.weight"])
    assert switcher.active == "one"
    switcher.activate("half")  # base + 0.5 x change, rounded once
    b, t = read_all(base), read_all(t1)
    for k in b:
        halfway = (b[k].double() + 0.5 * (t[k].double() - b[k].double())).to(b[k].dtype)
        assert torch.equal(model.state_dict()[k], halfway), k
    switcher.activate(None)
    assert all(bitwise_equal(p, original[n]) for n, p in model.state_dict().items())
    assert 0 < switcher.resident_bytes("one") < 16 * diff(str(base), str(t1)).count
    with pytest.raises(PieceError, match="not made from this model"):
        DeltaSwitcher(AutoModelForCausalLM.from_pretrained(t2, dtype=dtype)).add(
            "one", diff(str(base), str(t1))
        )


def _edit(folder, name, edit):
    """Change tensor `name` of a checkpoint folder in place: edit(flat view)."""
    from safetensors.torch import load_file, save_file

    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        if name in tensors:
            edit(tensors[name].view(-1))
            save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_partly_mismatched_base_gives_the_same_weights_in_memory_and_in_a_folder(tiny, tmp_path, dtype):
    """--force onto a base that differs at some of a tensor's delta entries: the entries still on the
    recorded base get the tuned bits, the others base + change; apply_to_model and the merged
    folder agree bit for bit (one exactness rule, decided per entry)."""
    import shutil

    from piece_surgery.models.checkpoint import open_checkpoint

    base = shutil.copytree(tiny("llama", dtype=dtype), tmp_path / "base")
    name = "model.layers.0.mlp.down_proj.weight"
    _edit(base, name, lambda flat: flat.__setitem__(0, 0.0))  # +0.0 in the base ...
    tuned = perturb(base, tmp_path / "tuned", fraction=0.05, seed=1, names=[name])
    _edit(tuned, name, lambda flat: flat.__setitem__(0, -0.0))  # ... -0.0 tuned: base + change is +0.0
    save_delta(diff(str(base), str(tuned)), tmp_path / "delta")
    t = load_delta(tmp_path / "delta").tensors[name]
    assert int(t.indices[0]) == 0
    moved, kept = t.indices[1::2], t.indices[0::2]
    other = perturb(base, tmp_path / "other", fraction=0.0, seed=9)
    _edit(other, name, lambda flat: flat.__setitem__(moved, (flat[moved].double() + 0.25).to(flat.dtype)))

    apply(str(other), [str(tmp_path / "delta")], tmp_path / "merged", force=True)
    on_disk = read_all(tmp_path / "merged")
    model = open_checkpoint(str(other)).load_model(device="cpu").module
    apply_to_model(model, load_delta(tmp_path / "delta"), force=True)
    in_memory = model.state_dict()
    assert all(bitwise_equal(in_memory[k], on_disk[k]) for k in on_disk if k in in_memory)
    # the rule, per entry: tuned bits where the base matched (the -0.0 included) ...
    got, w = on_disk[name].view(-1), read_all(tuned)[name].view(-1)
    assert bitwise_equal(got[kept], w[kept]) and str(float(got[0])) == "-0.0"
    # ... and base + change, rounded once, where it did not
    o, b = read_all(other)[name].view(-1), read_all(base)[name].view(-1)
    expected = (o[moved].double() + (w[moved].double() - b[moved].double())).to(dtype)
    assert bitwise_equal(got[moved], expected)
