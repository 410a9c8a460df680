"""The setup every command that loads a model shares: one options record (device, dtype, lengths,
trust, FSDP, quiet) and a `Run` that starts the process group, checks outputs, opens the checkpoint,
reads data, loads (and shards) the model, and has rank 0 write while the others wait.

A recipe reads top to bottom:

    run = Run(options)                                   # joins the process group under torchrun
    run.check_output(output, inputs=[...], overwrite=...)
    checkpoint = run.open(model_ref)                     # headers only: cheap checks come first
    dataset = run.data(checkpoint, data_path)
    model = run.load_model(checkpoint)                   # sharded with FSDP2 under --fsdp
    ...
    run.write(lambda: save_mask(mask, output))           # rank 0 writes, every rank waits for it

The options live in options.RunOptions: a new run option is one field there (with its help text);
the CLI adds it to every command that loads a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from piece_surgery.data.examples import Dataset
from piece_surgery.data.files import referenced_images
from piece_surgery.formats.artifacts import open_artifact
from piece_surgery.formats.delta import Delta
from piece_surgery.io.outputs import check_output
from piece_surgery.models.checkpoint import Checkpoint, LoadedModel, open_checkpoint
from piece_surgery.models.loading import Placement, auto_model_class
from piece_surgery.runtime import distributed
from piece_surgery.runtime.distributed import World
from piece_surgery.runtime.dtypes import dtype_name
from piece_surgery.runtime.errors import PieceError, quote
from piece_surgery.runtime.options import RunOptions

T = TypeVar("T")


class Run:
    """One command's run over a model: its process group (under a launcher), which rank writes,
    and the loading steps, each done once and in the same way for every command."""

    def __init__(self, options: RunOptions | None = None):
        self.options = options or RunOptions()
        self.world: World | None = distributed.start(self.options.device)
        # --fsdp without a launcher fails here, before anything is read
        self.model_device = distributed.load_device(self.world, self.options.device, self.options.fsdp)
        self._placements: dict[Path, Placement] = {}  # resolved once, when a checkpoint is opened
        self._length_noted = False  # the note that --max-length is cut to the model's context, once

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main

    @property
    def quiet(self) -> bool:
        """Only rank 0 shows progress."""
        return self.options.quiet or not self.is_main

    def check_output(
        self, output: Path, *, inputs: Sequence[str | Path | None], overwrite: bool, kind: str = "folder"
    ) -> Path:
        """outputs.check_output over the inputs given (None entries are options left out, a data
        file's images are inputs too); returns the path to write at."""
        return check_output(output, overwrite=overwrite, inputs=inputs, kind=kind, reads=referenced_images)

    def open(self, ref: str, *, what: str = "model") -> Checkpoint:
        """The checkpoint a model command works on, its config checked loadable (a model class
        transformers has) before any data is read."""
        checkpoint = open_checkpoint(ref, what=what, trust_remote_code=self.options.trust_remote_code)
        auto_model_class(checkpoint.config())
        options = self.options
        placement = checkpoint.placement(self.model_device, options.dtype, options.attn_implementation)
        self._placements[checkpoint.folder] = placement
        return checkpoint

    def placement(self, checkpoint: Checkpoint) -> Placement:
        """Where and how `checkpoint`'s model runs in this run (resolved when it was opened)."""
        return self._placements[checkpoint.folder]

    def data(
        self, checkpoint: Checkpoint, path: Path, *, every_example: bool = False, name: str | None = None
    ) -> Dataset:
        """A data file tokenized for this run (--max-samples applies unless `every_example`)."""
        self._note_length(checkpoint)
        dataset = checkpoint.load_data(
            Path(path),
            max_length=self.options.max_length,
            max_samples=None if every_example else self.options.max_samples,
            quiet=self.quiet,
            name=name,
        )
        checkpoint.check_token_ids(dataset)
        return dataset

    def _note_length(self, checkpoint: Checkpoint) -> None:
        """A --max-length the user gave above the model's context is cut to it: said once, on stderr
        (a note, not an error; the default, 512, is cut silently, as its help says)."""
        length, context = self.options.max_length, checkpoint.context_length()
        if self._length_noted or context is None or length <= context or length == RunOptions().max_length:
            return
        self._length_noted = True
        if self.is_main:
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # once per run, however many runs a process makes
                warnings.warn(
                    f"--max-length {length} is more than the model's {context} positions: examples are "
                    f"cut at {context}",
                    stacklevel=2,
                )

    def reader(self, checkpoint: Checkpoint) -> Callable[[Path, str | None], Dataset]:
        """read(path, name): a whole data file tokenized for this run (retain and general text)."""
        return lambda path, name=None: self.data(checkpoint, path, every_example=True, name=name)

    def where(self) -> dict:
        """What scoring steps need of the run: its options, process group and whether to be quiet."""
        return {"run": self.options, "world": self.world, "quiet": self.quiet}

    def load_model(self, checkpoint: Checkpoint) -> LoadedModel:
        """The model on this rank's device, or sharded over the ranks with FSDP2 (--fsdp)."""
        loaded = checkpoint.load_model(quiet=self.quiet, placement=self.placement(checkpoint))
        if self.options.fsdp and loaded.slices:
            raise PieceError(
                f"--fsdp does not shard a checkpoint that stores its experts one tensor per expert (as "
                f"'{next(iter(loaded.slices))}'); run without --fsdp, or store the experts fused"
            )
        if self.options.fsdp:
            from piece_surgery.runtime.sharding import shard_model

            shard_model(loaded.module, self.world)
        return loaded

    def write(self, save: Callable[[], T]) -> T | None:
        """Rank 0 calls `save`; every rank returns once it is done (its result on rank 0)."""
        if self.world is None:
            return save()
        result, error = None, None
        if self.is_main:
            try:
                result = save()
            except PieceError as exc:  # a full disk, say: every rank ends with the same line
                error = exc
        self.world.agree(error)
        return result


def open_avoided(refs: Sequence[str]) -> list[tuple[str, str, object]]:
    """--avoid's masks and deltas, opened (path or Hub repo id) and checked: (ref, name, artifact)."""
    opened = [open_artifact(ref) for ref in refs]
    seen: dict[Path, str] = {}
    for artifact in opened:  # however spelled: a path, the same path otherwise, a repo id
        same = artifact.path.resolve()
        if same in seen:
            raise PieceError(
                f"--avoid '{quote(artifact.ref)}' is the same file as --avoid '{quote(seen[same])}': "
                "give each once"
            )
        seen[same] = artifact.ref
    return [(a.ref, a.source.name, a.mask if a.mask is not None else a.delta) for a in opened]


def check_dtype_choice(delta: Delta, checkpoint: Checkpoint, dtype: str, where: str) -> None:
    """A delta applies exactly only onto weights of the dtype it was made in: PieceError naming
    --dtype when the choice loads `checkpoint` in another dtype than the one it stores the delta's
    tensors in (rather than calling the delta one of another model). `where` names the delta."""
    if dtype == "auto":
        return
    loaded = checkpoint.dtype(dtype)
    for name, t in sorted(delta.tensors.items()):
        stored = checkpoint.layout.get(name)
        if stored is not None and stored.dtype == t.dtype != loaded:
            raise PieceError(
                f"{where} holds {dtype_name(t.dtype)} entries, as the base stores them, and --dtype "
                f"{dtype} loads the base as {dtype_name(loaded)}: a delta applies exactly only in its "
                "own dtype; leave out --dtype"
            )


def load_base(base_ref: str, run: RunOptions | None) -> tuple[Checkpoint, LoadedModel]:
    """The base, loaded as the run options say (device, dtype, trust); on the CPU by default."""
    run = run or RunOptions(device="cpu")
    if run.fsdp or run.max_samples is not None or run.max_length != RunOptions().max_length:
        raise PieceError("--fsdp, --max-length and --max-samples are for score and train; leave them out")
    checkpoint = open_checkpoint(base_ref, what="base", trust_remote_code=run.trust_remote_code)
    loaded = checkpoint.load_model(
        device=run.device, dtype=run.dtype, quiet=run.quiet, attn_implementation=run.attn_implementation
    )
    return checkpoint, loaded
