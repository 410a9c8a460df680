"""Loading a model from a checkpoint folder: safetensors only, never pickle; every weight from the
files (a missing one is an error, not random values); the device and dtype it is loaded on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from piece_surgery.models.fused import check_fused, fused_parameters, fused_slices
from piece_surgery.models.layout import TensorInfo, read_layout
from piece_surgery.models.pairing import _tied_groups, parameter_keys
from piece_surgery.models.parts import is_vision_language
from piece_surgery.runtime.dtypes import float_dtype
from piece_surgery.runtime.errors import PieceError, first_line, no_device
from piece_surgery.runtime.options import check_device_name


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs, resolved once for a run: the device it is loaded on, the dtype
    of its weights, its attention kernel (None: the model's), and the dtype its forward is autocast
    to (bf16 for fp32 weights on a CUDA GPU that has it; None: no autocast)."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str | None = None
    autocast: torch.dtype | None = None

    @classmethod
    def resolve(
        cls, device: str, dtype: str, stored: torch.dtype, attn_implementation: str | None = None
    ) -> Placement:
        """From the run's options (`device`: auto, cpu, cuda[:N], mps; `dtype`: auto or a float
        dtype's name) and the dtype the weights are stored in (what `auto` means). PieceError for
        a device that is not here or an unknown dtype."""
        chosen = pick_device(device)
        weights = stored if dtype == "auto" else model_dtype(dtype)
        bf16 = chosen.type == "cuda" and torch.cuda.is_bf16_supported() and weights == torch.float32
        return cls(chosen, weights, attn_implementation, torch.bfloat16 if bf16 else None)


def context_length(config) -> int | None:
    """The most positions a model takes, as its config says (None if it does not): past it a
    learned position table (GPT-2's) has no row, and rotary models were never trained."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device_name(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise no_device(name)
    if name == "mps" and not _mps_available():
        raise no_device(name)
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def model_dtype(name: str) -> torch.dtype:
    """A dtype a model may be loaded in, by name (float32, bfloat16, float16 and their short names)."""
    dtype = float_dtype(name)
    if dtype is None or dtype == torch.float64:
        raise PieceError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
    return dtype


def load_causal_lm(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    layout: dict[str, TensorInfo] | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM, or a vision-language model (auto_model_class), from safetensors only
    (never pickle), quietly, on `device`.

    Every weight the model has must come from the files: a missing one (transformers would fill
    it with random values) or one of the wrong shape is an error that names it.
    """
    import transformers
    from transformers import AutoConfig

    layout = layout if layout is not None else read_layout(folder)
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if getattr(config, "quantization_config", None):
            raise PieceError(
                f"'{folder}' has a quantization_config in config.json: transformers would quantize the "
                "weights on loading, so the model would not be the files' weights; give an unquantized "
                "checkpoint"
            )
        _check_shapes(config, layout, trust_remote_code)
        model, info = auto_model_class(config).from_pretrained(
            folder,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **({"attn_implementation": attn_implementation} if attn_implementation else {}),
        )
    except PieceError:
        raise
    except config_errors() as exc:
        raise PieceError(f"cannot load a language model from '{folder}': {first_line(exc)}") from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    _check_loading_info(folder, info)
    return model.to(device)


# a config's count of experts, by the name each family gives it (Mixtral and gpt-oss, Qwen-MoE and
# OLMoE, DeepSeek-V3)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
MOE_NEEDS = "mixture-of-experts checkpoints need transformers>=5.0: pip install -U transformers"


def is_mixture_of_experts(config) -> bool:
    """Whether a transformers config (or its text model's, in a vision-language config) describes
    a mixture-of-experts model: more than one expert."""
    configs = [config, getattr(config, "text_config", None)]
    return any(
        isinstance(getattr(c, key, None), int) and getattr(c, key) > 1
        for c in configs
        if c is not None
        for key in _EXPERT_COUNTS
    )


def check_experts_supported(model_type: str) -> None:
    """PieceError for a mixture-of-experts model under transformers 4: its experts are modules of
    their own there, not transformers 5's fused tensors its conversion mapping places, which the
    masks, deltas and pairing of experts are built on."""
    if transformers_major() < 5:
        raise PieceError(f"{model_type} is a mixture-of-experts model; {MOE_NEEDS}")


def transformers_major() -> int:
    """The major version of the transformers installed (4, 5, ...)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def auto_model_class(config):
    """The transformers Auto class a config's model loads with: AutoModelForImageTextToText for a
    vision-language model (LLaVA, Qwen2-VL, Idefics3, SmolVLM, Gemma 3 with its vision tower),
    AutoModelForCausalLM otherwise. PieceError for a vision-language model under transformers 4:
    its loader renames stored names by rules piece-surgery cannot read, so no pairing is exact;
    and for a mixture-of-experts model there (check_experts_supported)."""
    from transformers import AutoModelForCausalLM

    if is_mixture_of_experts(config):
        check_experts_supported(getattr(config, "model_type", "this checkpoint"))
    if not is_vision_language(config):
        return AutoModelForCausalLM
    try:
        import transformers.conversion_mapping  # noqa: F401  (transformers 5's loader)
        from transformers import AutoModelForImageTextToText
    except ImportError:
        raise PieceError(
            f"this is a vision-language checkpoint ({getattr(config, 'model_type', 'unknown')}); "
            "piece-surgery reads those with transformers 5 or later: pip install -U transformers"
        ) from None
    return AutoModelForImageTextToText


def config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a config.json it cannot read or build a model from: its own
    errors, the validation of transformers 5's strict configs (a field of the wrong type:
    huggingface_hub's StrictDataclassError, no ValueError) and arithmetic on a size of 0."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, whose configs were not strict
        strict: tuple[type[BaseException], ...] = ()
    else:
        strict = (StrictDataclassError,)
    return (OSError, ValueError, KeyError, TypeError, ImportError, ArithmeticError, *strict)


def model_skeleton(config, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model a config describes (auto_model_class), on the meta device: its names, shapes and
    ties, no weights. PieceError for sizes torch cannot make (transformers' own errors pass)."""
    model_class = auto_model_class(config)
    try:
        with torch.device("meta"):
            return model_class.from_config(config, trust_remote_code=trust_remote_code)
    except RuntimeError as exc:  # torch's, for sizes no tensor can have (a negative vocab_size, say)
        where = getattr(config, "name_or_path", "") or "the checkpoint"
        raise PieceError(
            f"the model config of '{where}' describes no model ({first_line(exc)}); check the sizes in "
            "its config.json"
        ) from exc


def _check_shapes(config, layout: dict[str, TensorInfo], trust_remote_code: bool) -> None:
    """Compare the files' tensor shapes with those the config asks for (on an empty meta model),
    experts stored one tensor per expert with their places in the fused parameters (check_fused)."""
    skeleton = model_skeleton(config, trust_remote_code=trust_remote_code)
    expected = dict(skeleton.named_parameters())
    for name, key in parameter_keys(skeleton, layout).items():
        if tuple(layout[key].shape) != tuple(expected[name].shape):
            raise PieceError(
                f"tensor '{key}' is {list(layout[key].shape)} in the checkpoint but the config expects "
                f"{list(expected[name].shape)}: the weights and config.json do not match"
            )
    check_fused(skeleton, fused_slices(skeleton, layout), {n: info.shape for n, info in layout.items()})


def check_weights_match(skeleton: torch.nn.Module, layout: dict[str, TensorInfo], folder: Path) -> None:
    """What loading would find, told from the names alone (on the meta-device skeleton, before any
    weight is read): every weight the model has is stored, under one of its tied names, or in parts
    that loading fuses into it (experts stored one tensor per expert: check_fused)."""
    slices = fused_slices(skeleton, layout)
    check_fused(skeleton, slices, {n: info.shape for n, info in layout.items()})
    fused = set(fused_parameters(slices))
    missing = [
        names[0] for names, stored in _tied_groups(skeleton, layout) if not stored and names[0] not in fused
    ]
    used = set(parameter_keys(skeleton, layout).values()) | set(slices)
    unexpected = [name for name in layout if name not in used] if missing else []
    _check_loading_info(folder, {"missing_keys": missing, "unexpected_keys": unexpected})


def _check_loading_info(folder: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if missing and unexpected:
        raise PieceError(
            f"the config in '{folder}' does not match its weights: {len(missing)} of the model's weights "
            f"are not in the files (e.g. '{missing[0]}') and {len(unexpected)} tensors in the files are "
            f"unused (e.g. '{unexpected[0]}')"
        )
    if missing:
        raise PieceError(
            f"checkpoint '{folder}' lacks {len(missing)} of the model's weights (first: '{missing[0]}'); "
            "transformers would fill them with random values"
        )


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers' own per-layer checkpointing)."""
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise PieceError(f"{type(model).__name__} does not support --gradient-checkpointing; leave it off")
    enable()
