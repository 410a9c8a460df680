"""Several processes on one or more machines, launched by torchrun, `accelerate launch` or Slurm:
the process group (torch.distributed), which device and which share of the work each rank takes, and
errors that end every rank with the same line instead of a hang."""

from __future__ import annotations

import gc
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from piece_surgery.runtime.errors import PieceError, no_device, quote

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


# Joining the group: how long ranks wait for each other to arrive (PIECE_RENDEZVOUS_TIMEOUT,
# seconds), apart from the collectives' timeout, so a rank started alone says so in minutes.
DEFAULT_RENDEZVOUS_S = 120


def launched() -> bool:
    """Started by a launcher that set WORLD_SIZE > 1 (torchrun, accelerate launch, srun scripts)."""
    return _env_int("WORLD_SIZE", default=1, low=1) > 1


def _env_int(name: str, *, default: int | None = None, low: int = 0, high: int = 2**31 - 1) -> int:
    """An integer environment variable in [low, high]; PieceError naming it otherwise."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        if default is None:
            raise PieceError(
                f"WORLD_SIZE is set but {name} is not: launch with torchrun (or accelerate launch, srun), "
                "which sets both, or unset WORLD_SIZE to run one process"
            )
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise PieceError(
            f"environment variable {name}={quote(text, 40)!r} must be a whole number in [{low}, {high}]"
        )
    return value


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 7 * 86400):
        raise PieceError(
            f"environment variable {name}={quote(text, 40)!r} must be a number of seconds in (0, 604800]"
        )
    return value


@dataclass(frozen=True)
class Launch:
    """What the launcher's environment says, checked: this rank, the ranks, where rank 0 listens,
    and how long to wait for the others (seconds) and for a collective (seconds)."""

    rank: int
    size: int
    local_rank: int
    address: str
    port: int
    joining: float
    timeout: float


def launch_environment() -> Launch:
    """Read and check WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, PIECE_DIST_TIMEOUT and
    PIECE_RENDEZVOUS_TIMEOUT: a PieceError naming the first that is missing or malformed."""
    size = _env_int("WORLD_SIZE", low=1, high=1 << 20)
    rank = _env_int("RANK", high=size - 1)
    local_rank = _env_int("LOCAL_RANK", default=rank)
    address = os.environ.get("MASTER_ADDR", "").strip()
    if not address:
        _env_int("MASTER_ADDR")  # the "is not set" line
    if len(address) > 253 or not address.isprintable() or " " in address:
        raise PieceError(
            f"environment variable MASTER_ADDR={quote(address, 40)!r} is not a host name or address"
        )
    port = _env_int("MASTER_PORT", low=1, high=65535)
    joining = _env_seconds("PIECE_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_S)
    timeout = _env_seconds("PIECE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)
    return Launch(rank, size, local_rank, address, port, joining, timeout)


def start(device: str = "auto") -> World | None:
    """Join the process group the launcher's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables describe
    (None when not launched as several processes). NCCL on CUDA, gloo on the CPU.

    Every variable is checked first (one line naming a malformed one); ranks wait at most
    PIECE_RENDEZVOUS_TIMEOUT seconds (DEFAULT_RENDEZVOUS_S) for each other to arrive, then end with
    one line that says which side is missing; collectives then time out after PIECE_DIST_TIMEOUT."""
    global _world
    if _world is not None:
        return _world
    if not launched():
        return None
    launch = launch_environment()
    rank, size, local_rank = launch.rank, launch.size, launch.local_rank
    timeout = timedelta(seconds=launch.timeout)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise no_device(device)
    if use_cuda:
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    store = _join(rank, size, launch.address, launch.port, launch.joining)
    store.set_timeout(timeout)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        store=store,
        rank=rank,
        world_size=size,
        timeout=timeout,
        device_id=target if use_cuda else None,
    )
    _world = World(rank, size, local_rank, target)
    return _world


@contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for a while: what C++ code writes there (c10d logs every failed
    connection with a stack) is not shown; our own one line is, after."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _join(rank: int, size: int, address: str, port: int, seconds: float):
    """The launcher's key-value store, reached within `seconds`: the ranks' rendezvous."""
    try:
        with _native_stderr_silenced():
            rendezvous = dist.rendezvous(
                "env://", rank=rank, world_size=size, timeout=timedelta(seconds=seconds)
            )
            store, _, _ = next(rendezvous)
        return store
    except (RuntimeError, ValueError, OSError) as exc:
        where = f"{address}:{port}"
        joined = re.search(r"(\d+)/(\d+) clients joined", str(exc))
        if rank == 0:
            others = int(joined[1]) - 1 if joined else None  # its count includes rank 0 itself
            arrived = f" ({others} of the other {size - 1} arrived)" if others is not None else ""
            raise PieceError(
                f"rank 0 of WORLD_SIZE={size} waited {seconds:g} s at {where} for the other ranks{arrived} "
                "(PIECE_RENDEZVOUS_TIMEOUT): start every rank with a launcher (torchrun --nproc-per-node "
                f"{size} ...), or unset WORLD_SIZE to run one process"
            ) from exc
        raise PieceError(
            f"rank {rank} of WORLD_SIZE={size} could not reach rank 0 at {where} within {seconds:g} s "
            "(PIECE_RENDEZVOUS_TIMEOUT): start rank 0 too (torchrun starts every rank), or check "
            "MASTER_ADDR and MASTER_PORT"
        ) from exc


def current() -> World | None:
    return _world


def stop() -> bool:
    """Leave the process group (every exit path of the CLI calls this); True when there was one."""
    global _world
    joined = dist.is_available() and dist.is_initialized()
    if joined:
        # objects that hold the group (DDP's reducer, kept alive by reference cycles) must go first:
        # destroyed after it, at exit, their threads end the process with std::terminate
        gc.collect()
        dist.destroy_process_group()
    _world = None
    return joined


def device_name(world: World | None, device: str) -> str:
    """The device a rank works on: its own GPU under a launcher, else what the user asked."""
    return str(world.device) if world is not None else device


def load_device(world: World | None, device: str, fsdp: bool) -> str:
    """Where to load the model: with --fsdp on the CPU (fully_shard then moves each rank's shard
    to its device, so no device ever holds the whole model), else the rank's own device."""
    if fsdp and world is None:
        raise PieceError("--fsdp shards the model over several processes: launch with torchrun")
    return "cpu" if fsdp else device_name(world, device)
