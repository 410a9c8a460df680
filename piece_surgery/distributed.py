"""Several processes on one or more machines, launched by torchrun, `accelerate launch` or Slurm:
the process group (torch.distributed), which device and which share of the work each rank takes, and
errors that end every rank with the same line instead of a hang."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from piece_surgery.errors import PieceError, no_device

# A collective that waits longer than this fails instead of hanging (PIECE_DIST_TIMEOUT, seconds).
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    """This process's place among `size` ranks; rank 0 prints and writes."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (moved to the collective's device and back)."""
        work = tensor.to(self.device) if tensor.device != self.device else tensor
        dist.all_reduce(work)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def sum(self, value: float) -> float:
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64, device=self.device)))

    def gather(self, value) -> list:
        """Every rank's `value` (a small picklable object), in rank order, on every rank."""
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Called by every rank: if any rank's work failed with a user error, every rank raises it
        (the lowest rank's), so all of them end with the same one line."""
        errors = self.gather(None if error is None else (type(error).__name__, str(error)))
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            self.barrier()  # leave together: a rank that quits first cuts the others' last transfers
            kind, message = first
            if error is not None and type(error).__name__ == kind:
                raise error
            raise _ERRORS.get(kind, PieceError)(message)


_ERRORS: dict[str, type[PieceError]] = {}


def register_error(kind: type[PieceError]) -> type[PieceError]:
    """Let World.agree re-raise a PieceError subclass by its name on the other ranks."""
    _ERRORS[kind.__name__] = kind
    return kind


_world: World | None = None


def launched() -> bool:
    """Started by a launcher that set WORLD_SIZE > 1 (torchrun, accelerate launch, srun scripts)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str = "auto") -> World | None:
    """Join the process group the launcher's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables describe
    (None when not launched as several processes). NCCL on CUDA, gloo on the CPU."""
    global _world
    if _world is not None:
        return _world
    if not launched():
        return None
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise PieceError(f"WORLD_SIZE is set but RANK is not a number ({exc}); launch with torchrun") from exc
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise no_device(device)
    if use_cuda:
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    timeout = timedelta(seconds=float(os.environ.get("PIECE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        rank=rank,
        world_size=size,
        timeout=timeout,
        device_id=target if use_cuda else None,
    )
    _world = World(rank, size, local_rank, target)
    return _world


def current() -> World | None:
    return _world


def stop() -> None:
    """Leave the process group (every exit path of the CLI calls this)."""
    global _world
    if dist.is_available() and dist.is_initialized():
        # objects that hold the group (DDP's reducer, kept alive by reference cycles) must go first:
        # destroyed after it, at exit, their threads end the process with std::terminate
        gc.collect()
        dist.destroy_process_group()
    _world = None


def device_name(world: World | None, device: str) -> str:
    """The device a rank works on: its own GPU under a launcher, else what the user asked."""
    return str(world.device) if world is not None else device


def load_device(world: World | None, device: str, fsdp: bool) -> str:
    """Where to load the model: with --fsdp on the CPU (fully_shard then moves each rank's shard
    to its device, so no device ever holds the whole model), else the rank's own device."""
    if fsdp and world is None:
        raise PieceError("--fsdp shards the model over several processes: launch with torchrun")
    return "cpu" if fsdp else device_name(world, device)
