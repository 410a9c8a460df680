"""The sparse trainer: fine-tune only the masked entries; memory and optimizer state scale with k.

The model keeps its weights as they are. For each masked tensor the trainable state is the fp32
vector of its k selected values. Before every forward pass those values are written into the weight
(in the weight's dtype); a hook on the weight takes the dense gradient the moment backward produces
it, gathers the k entries into the values' gradient and frees it. AdamW only ever sees the values.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from piece_surgery.atomic import atomic_path
from piece_surgery.checkpoint import enable_activation_checkpointing, save_shard
from piece_surgery.data import Dataset, batch_logits, collate, mean_token_loss, micro_batches
from piece_surgery.errors import PieceError
from piece_surgery.naming import is_norm
from piece_surgery.sparse_grad import (
    is_gain_module,
    is_linear_weight,
    recompute_in_backward,
    restore,
    route_linear,
    sole_owners,
)

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    # lr 1e-4: see docs/training.md for the measurements behind the default
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    # norm gains scale whole channels, so they may want a smaller step than matrix entries
    norm_lr_scale: float = 1.0

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PieceError(f"--lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise PieceError(f"unknown --schedule '{self.schedule}'; use constant, linear or cosine")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise PieceError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PieceError(f"--{name.replace('_', '-')} must be at least 1")
        if not (self.norm_lr_scale >= 0 and math.isfinite(self.norm_lr_scale)):
            raise PieceError("--norm-lr-scale must be a number >= 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip < 0:
            raise PieceError("--warmup-steps, --weight-decay and --clip must not be negative")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise PieceError("--betas must be two numbers in [0, 1), e.g. 0.9,0.95")


@dataclass
class TrainResult:
    values: dict[str, torch.Tensor]  # tensor name -> trained fp32 values at the mask's indices
    steps: int
    train_loss: float | None  # mean loss of the last optimizer step
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None
    optimizer_state: dict[str, int] = field(default_factory=dict)  # state name -> total entries


class TrainingDiverged(PieceError):
    pass


def steps_per_epoch(n_examples: int, config: TrainConfig) -> int:
    return math.ceil(n_examples / (config.batch_size * config.grad_accum))


def total_steps(n_examples: int, config: TrainConfig) -> int:
    return config.max_steps or config.epochs * steps_per_epoch(n_examples, config)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def step_examples(step: int, n_examples: int, config: TrainConfig) -> list[int]:
    """Which examples optimizer step `step` uses: a seeded permutation per epoch, so a resumed run
    sees exactly the data an uninterrupted one would."""
    per_epoch = steps_per_epoch(n_examples, config)
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    size = config.batch_size * config.grad_accum
    return order[within * size : (within + 1) * size]


class SparseParameters:
    """The k trainable values of each masked tensor, and what feeds them gradients.

    Linear layers compute only the selected entries of their weight gradient (sparse_grad.py);
    other tensors (norm gains, biases, shared or non-Linear weights) get their dense gradient
    reduced to the k entries by a hook as soon as backward produces it, and freed. Norms with a
    trained gain are recomputed in backward rather than keeping their normalised output.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], indices: dict[str, torch.Tensor]):
        self.params = params
        self.indices = {n: indices[n].to(params[n].device) for n in params}
        self.values = {
            n: params[n].detach().reshape(-1)[self.indices[n]].float().clone().requires_grad_(True)
            for n in params
        }
        self._handles = []
        self._routed: list[torch.nn.Module] = []

    def attach(self, model: torch.nn.Module, *, sparse_linear: bool = True) -> None:
        owners = sole_owners(model) if sparse_linear else {}
        routed = {
            name: owners[id(p)]
            for name, p in self.params.items()
            if id(p) in owners and is_linear_weight(owners[id(p)], p)
        }
        hooked = {id(p) for n, p in self.params.items() if n not in routed}
        for p in model.parameters():  # nothing else is trained, nor even gets a gradient
            p.requires_grad_(id(p) in hooked)
        for name, module in routed.items():
            route_linear(module, self.values[name], self.indices[name])
            self._routed.append(module)
        for name, p in self.params.items():
            if name not in routed:
                self._handles.append(p.register_post_accumulate_grad_hook(self._gather(name)))
        gains = dict.fromkeys(
            owners[id(p)] for n, p in self.params.items() if n not in routed and id(p) in owners
        )
        for module in gains:  # in parameter order, each module once
            if is_gain_module(module):
                recompute_in_backward(module)
                self._routed.append(module)

    def _gather(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            g = param.grad.reshape(-1)[self.indices[name]].float()
            value = self.values[name]
            value.grad = g if value.grad is None else value.grad.add_(g)
            param.grad = None

        return hook

    def write(self) -> None:
        """Put the current values into the model's weights."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.view(-1)[self.indices[name]] = self.values[name].detach().to(p.dtype)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._routed:
            restore(module)
        self._routed.clear()


def evaluate(model: torch.nn.Module, dataset: Dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over a dataset."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in micro_batches(dataset.examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = batch_logits(model, batch)
            loss, count = mean_token_loss(logits, batch["labels"])
            total += float(loss) * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def train_sparse(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    indices: dict[str, torch.Tensor],
    dataset: Dataset,
    config: TrainConfig,
    *,
    pad_id: int = 0,
    eval_dataset: Dataset | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    identity: dict | None = None,
    progress: Callable[[int, dict], None] | None = None,
    sparse_linear: bool = True,
) -> TrainResult:
    """Train the masked entries of `params` (tensor name -> model parameter) in place.

    Returns the trained fp32 values; the model holds them (in its dtype) when this returns. With
    `state_dir` and `config.save_every`, a resumable state is written there atomically every
    `save_every` steps; `resume=True` continues from it. `sparse_linear=False` computes every
    masked tensor's dense gradient and keeps its k entries (the slower reference path).
    """
    config.validate()
    if not dataset.examples:
        raise PieceError("the training data has no examples")
    device = next(model.parameters()).device
    sparse = SparseParameters(params, indices)
    norm_names = {n for n in sparse.values if is_norm(n)} if config.norm_lr_scale != 1.0 else set()
    groups = [
        {"params": [v for n, v in sparse.values.items() if n not in norm_names], "lr_scale": 1.0},
        {
            "params": [v for n, v in sparse.values.items() if n in norm_names],
            "lr_scale": config.norm_lr_scale,
        },
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    total = total_steps(len(dataset.examples), config)
    identity = dict(identity or {}, config=_config_identity(config))
    start, history = 0, []
    if resume:
        start, history = load_state(state_dir, sparse, optimizer, identity)
    if not resume:
        torch.manual_seed(config.seed)
    sparse.attach(model, sparse_linear=sparse_linear)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    autocast = (
        device.type == "cuda"
        and torch.cuda.is_bf16_supported()
        and next(model.parameters()).dtype == torch.float32
    )
    model.train()
    train_loss = history[-1]["loss"] if history else None
    eval_loss = None
    last_saved = start if resume else None
    try:
        for step in range(start, total):
            sparse.write()
            chosen = step_examples(step, len(dataset.examples), config)
            step_loss = 0.0
            for offset in range(0, len(chosen), config.batch_size):
                group = [dataset.examples[i] for i in chosen[offset : offset + config.batch_size]]
                batch = {k: v.to(device) for k, v in collate(group, pad_id).items()}
                parts = math.ceil(len(chosen) / config.batch_size)
                value = _forward_backward(model, batch, parts, autocast)
                if not math.isfinite(value):
                    kept = (
                        f"; the last good state (step {last_saved}) is in {state_dir}" if last_saved else ""
                    )
                    raise TrainingDiverged(
                        f"the loss became {value} at step {step + 1}: lower --lr or check the data{kept}"
                    )
                step_loss += value / parts
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(list(sparse.values.values()), config.clip)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * group["lr_scale"] * lr_factor(step, total, config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = step_loss
            record = {"step": step + 1, "loss": step_loss, "lr": config.lr * lr_factor(step, total, config)}
            if eval_dataset is not None and config.eval_every and (step + 1) % config.eval_every == 0:
                sparse.write()
                eval_loss = record["eval_loss"] = evaluate(model, eval_dataset, config.batch_size, pad_id)
            history.append(record)
            if progress:
                progress(1, record)
            if state_dir is not None and config.save_every and (step + 1) % config.save_every == 0:
                save_state(state_dir, sparse, optimizer, step + 1, history, identity)
                last_saved = step + 1
        sparse.write()
        if eval_dataset is not None and (eval_loss is None or history[-1].get("eval_loss") is None):
            eval_loss = evaluate(model, eval_dataset, config.batch_size, pad_id)
    finally:
        sparse.detach()
        for p in model.parameters():
            p.grad = None
    values = {n: v.detach().cpu() for n, v in sparse.values.items()}
    state_sizes: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                state_sizes[key] = state_sizes.get(key, 0) + t.numel()
    return TrainResult(values, total, train_loss, eval_loss, history, start if resume else None, state_sizes)


def _forward_backward(model: torch.nn.Module, batch: dict, parts: int, autocast: bool) -> float:
    """Loss of one micro-batch, with its gradient (scaled by 1/parts) accumulated; nan/inf returns
    before backward. A function of its own so the logits are freed before the next forward."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = batch_logits(model, batch)
    loss, _ = mean_token_loss(logits, batch["labels"])
    del logits  # backward needs the log-probabilities, not the logits: free (tokens x vocab) now
    value = float(loss.detach())
    if math.isfinite(value):
        (loss / parts).backward()
    return value


def _config_identity(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    keep = asdict(config)
    for free in ("max_steps", "epochs", "eval_every", "save_every"):
        keep.pop(free)
    keep["betas"] = list(keep["betas"])
    return keep


def save_state(
    state_dir: Path,
    sparse: SparseParameters,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list,
    identity,
) -> None:
    """Values, AdamW moments, step, RNG state: safetensors + JSON, written atomically."""
    tensors = {}
    for name, value in sparse.values.items():
        tensors[f"{name}::values"] = value.detach().cpu()
        moments = optimizer.state.get(value, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"{name}::{key}"] = moments[key].cpu()
    tensors["rng::torch"] = torch.get_rng_state()
    description = {"step": step, "history": history, "identity": identity}
    with atomic_path(Path(state_dir), is_dir=True) as tmp:
        save_shard(tensors, tmp / "state.safetensors", {"format": "piece-surgery/train-state"})
        (tmp / "state.json").write_text(json.dumps(description, default=str))


def load_state(
    state_dir: Path | None, sparse: SparseParameters, optimizer: torch.optim.Optimizer, identity: dict
) -> tuple[int, list]:
    if state_dir is None or not (Path(state_dir) / "state.json").is_file():
        raise PieceError(f"--resume: no saved training state in '{state_dir}'; run with --save-every first")
    state_dir = Path(state_dir)
    try:
        description = json.loads((state_dir / "state.json").read_text())
    except ValueError as exc:
        raise PieceError(f"--resume: '{state_dir}/state.json' is not valid JSON") from exc
    saved = json.loads(json.dumps(description.get("identity"), default=str))
    wanted = json.loads(json.dumps(identity, default=str))
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise PieceError(
                f"--resume: the saved state was made with another {key}; start afresh without --resume"
            )
    step = int(description["step"])
    try:
        with safe_open(str(state_dir / "state.safetensors"), "pt") as f:
            for name, value in sparse.values.items():
                with torch.no_grad():
                    value.copy_(f.get_tensor(f"{name}::values"))
                moments = {
                    k: f.get_tensor(f"{name}::{k}").to(value.device) for k in ("exp_avg", "exp_avg_sq")
                }
                optimizer.state[value] = {"step": torch.tensor(float(step)), **moments}
            torch.set_rng_state(f.get_tensor("rng::torch"))
    except (SafetensorError, OSError) as exc:
        raise PieceError(f"--resume: cannot read '{state_dir}/state.safetensors' (corrupt)") from exc
    return step, list(description.get("history", []))


def remove_state(state_dir: Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


# ---------------------------------------------------------------- the `train` recipe


def check_mask_fits(mask, layout: dict, model_fingerprint: str, where: str) -> None:
    """A mask must name tensors of this model, with their shapes, scored on these very weights."""
    for name in mask.indices:
        if name not in layout:
            raise PieceError(f"{where} selects tensor '{name}', which this model does not have")
        if tuple(layout[name].shape) != tuple(mask.shapes[name]):
            raise PieceError(
                f"{where}: tensor '{name}' is {list(mask.shapes[name])} in the mask but "
                f"{list(layout[name].shape)} in this model"
            )
    scored_on = (mask.info.get("model") or {}).get("fingerprint")
    if scored_on and scored_on != model_fingerprint:
        name = (mask.info.get("model") or {}).get("name")
        raise PieceError(f"{where} was scored on another model ({name}); score this model first")


def load_mask_ref(ref: str):
    from piece_surgery.hub import resolve
    from piece_surgery.mask import load_mask

    path = resolve(ref, what="mask", patterns=["*.safetensors", "*.json", "*.md"]).path
    if path.is_dir():
        path = path / "mask.safetensors"
    return load_mask(path)


def train_checkpoint(
    model_ref: str,
    data: Path,
    output: Path,
    config: TrainConfig,
    *,
    mask_ref: str | None = None,
    score_options=None,
    eval_data: Path | None = None,
    max_length: int = 512,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    quiet: bool = True,
):
    """Score (unless a mask is given), train the masked entries, and write the delta folder."""
    from piece_surgery.atomic import check_output
    from piece_surgery.checkpoint import (
        ShardReader,
        load_causal_lm,
        parameter_keys,
        parse_dtype,
        pick_device,
        read_layout,
    )
    from piece_surgery.checkpoint import identity as checkpoint_identity
    from piece_surgery.data import load_dataset, load_tokenizer, pad_id
    from piece_surgery.delta import delta_from_values, save_delta
    from piece_surgery.hub import resolve
    from piece_surgery.progress import Progress
    from piece_surgery.score import ScoreOptions, score_model

    config.validate()
    output = Path(output)
    check_output(output, overwrite=overwrite, inputs=(Path(model_ref), Path(data)))
    score_options = score_options or ScoreOptions()
    if mask_ref is None:
        score_options.validate()
    source = resolve(model_ref, what="model")
    folder = source.path
    layout = read_layout(folder)
    identity = checkpoint_identity(source, layout)
    mask = None
    if mask_ref is not None:
        mask = load_mask_ref(mask_ref)
        check_mask_fits(mask, layout, identity["fingerprint"], f"mask '{mask_ref}'")
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    dataset = load_dataset(data, tokenizer, max_length=max_length, max_samples=max_samples)
    eval_set = load_dataset(eval_data, tokenizer, max_length=max_length) if eval_data else None
    pad = pad_id(tokenizer)
    model = load_causal_lm(
        folder,
        dtype=parse_dtype(dtype, folder, layout),
        device=pick_device(device),
        trust_remote_code=trust_remote_code,
    )
    keys = parameter_keys(model, layout)
    if mask is None:
        with Progress(len(dataset.examples), "scoring", quiet=quiet) as bar:
            mask, _ = score_model(model, keys, dataset, score_options, pad=pad, progress=bar)
        mask.info["model"] = {**identity}
        mask.info["data"] = dataset.identity()
    by_key = {key: dict(model.named_parameters())[name] for name, key in keys.items()}
    params = {name: by_key[name] for name in mask.indices}
    state_dir = output.with_name(output.name + ".state")
    steps = total_steps(len(dataset.examples), config)
    with Progress(steps, "training", quiet=quiet, unit="step") as bar:

        def report(n: int, record: dict) -> None:
            bar.note(loss=f"{record['loss']:.4f}")
            bar.advance(n)

        result = train_sparse(
            model,
            params,
            mask.indices,
            dataset,
            config,
            pad_id=pad,
            eval_dataset=eval_set,
            state_dir=state_dir,
            resume=resume,
            identity={"model": identity["fingerprint"], "data": dataset.sha256, "mask": _mask_digest(mask)},
            progress=report,
        )
    reader = ShardReader(folder, layout)
    entries = {}
    for name, idx in mask.indices.items():
        base_values = reader.get(name).reshape(-1)[idx].clone()
        entries[name] = (idx, base_values, result.values[name].to(base_values.dtype))
    reader.close()
    provenance = {
        "made_by": "train",
        "method": mask.info.get("method"),
        "density": mask.info.get("density"),
        "mask": {k: mask.info.get(k) for k in ("method", "density", "data", "seed")} | {"k": mask.k},
        "hyperparameters": {**asdict(config), "betas": list(config.betas), "max_length": max_length},
        "data": dataset.identity(),
        "eval_data": eval_set.identity() if eval_set else None,
        "steps": result.steps,
        "final_train_loss": result.train_loss,
        "final_eval_loss": result.eval_loss,
    }
    delta = delta_from_values(
        entries, {n: mask.shapes[n] for n in entries}, {"base": identity, "provenance": provenance}
    )
    save_delta(delta, output, overwrite=overwrite)
    remove_state(state_dir)
    return delta, result, mask


def _mask_digest(mask) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(mask.indices):
        digest.update(name.encode())
        digest.update(mask.indices[name].to(torch.int64).numpy().tobytes())
    return digest.hexdigest()
