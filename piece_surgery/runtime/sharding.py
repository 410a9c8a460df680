"""Models that do not fit one device: the frozen base weights sharded over the ranks with FSDP2's
`fully_shard` (--fsdp), and reading or writing a few entries of a sharded weight in place.

FSDP2 shards every parameter on its first dimension: rank r holds rows [r x c, (r + 1) x c) with
c = ceil(rows / ranks), so its part of the flattened weight is one contiguous range of flat indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.errors import PieceError


def shard_model(model: torch.nn.Module, world: World) -> None:
    """fully_shard each transformer block (the classes the model names in _no_split_modules), then
    the whole model (embeddings, final norm, head). The weights move to the rank's device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    if not blocks:
        raise PieceError(f"{type(model).__name__} names no transformer block to shard; run without --fsdp")
    sharded = [m for m in model.modules() if type(m).__name__ in blocks]
    for module in sharded:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in [*sharded, model]:
        # scoring back-propagates one rank's loss at a time: a sum, not a mean, is its gradient
        # (a plain SUM reduction: gloo has no pre-multiplied sum)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state. After a forward pass (generation, say) the
    root module keeps its parameters gathered, as plain tensors; code that reads shards needs them
    sharded again. Nothing to do for a model FSDP does not shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@dataclass(frozen=True)
class LocalPart:
    """This rank's part of a (possibly sharded) weight, flattened: flat indices [start, stop)."""

    values: torch.Tensor  # 1-D view of the local data: writes go into the weight
    start: int
    stop: int

    def select(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in `indices`, their offsets in `values`) of the entries that lie here."""
        inside = (indices >= self.start) & (indices < self.stop)
        positions = torch.nonzero(inside).flatten()
        return positions, indices[positions] - self.start


def local_part(t: torch.Tensor, world: World | None) -> LocalPart:
    if not is_sharded(t):
        return LocalPart(t.detach().view(-1), 0, t.numel())
    local = t.to_local().detach()
    rows = t.shape[0]
    per_rank = math.ceil(rows / world.size) if rows else 0
    first = min(world.rank * per_rank, rows)
    row_size = t.numel() // rows if rows else 0
    return LocalPart(local.view(-1), first * row_size, first * row_size + local.numel())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole weight (a collective for a sharded one: every rank calls it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t
