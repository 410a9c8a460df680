"""Tables as rows: a Parquet file, an Arrow file (IPC file or stream, as `datasets` writes its
cache files) and a folder saved with `datasets`' `save_to_disk`, read through pyarrow and
`datasets` (the `data` extra: `pip install 'piece-surgery[data]'`), each row a dict.

Only the columns that decide a record's shape are converted (shapes.SHAPE_FIELDS); nulls are
dropped (shapes.without_nulls). pyarrow 14.0.1 and later never unpickle an extension type, so
reading a table runs no code from the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from piece_surgery.data.shapes import SHAPE_FIELDS, without_nulls
from piece_surgery.runtime.errors import PieceError, first_line

EXTRA = "pip install 'piece-surgery[data]'"
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")


@dataclass(frozen=True)
class Table:
    """A table's rows (dicts of the shape columns, nulls dropped) and its columns' names."""

    rows: list[dict]
    columns: list[str]


def _pyarrow(what: str):
    try:
        import pyarrow
    except ImportError as exc:
        raise PieceError(f"reading {what} needs pyarrow: {EXTRA}") from exc
    return pyarrow


def read_table_file(path: Path, max_rows: int | None) -> Table:
    """The rows of a .parquet or .arrow/.feather file (up to `max_rows`). PieceError, one line, for
    a file pyarrow cannot read or a missing pyarrow."""
    suffix = path.suffix.lower()
    pa = _pyarrow(f"'{path.name}' ({suffix[1:]})")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
            table = pq.read_table(path, columns=_shape_columns(columns))
        else:
            table = _read_ipc(pa, path)
            columns = table.column_names
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise PieceError(f"data file '{path}' cannot be read as {suffix[1:]}: {first_line(exc)}") from None
    return _rows(table, max_rows, columns)


def _read_ipc(pa, path: Path):
    """An Arrow IPC file (random access, Feather v2) or stream (datasets' cache files)."""
    import pyarrow.ipc

    with pa.memory_map(str(path)) as source:
        try:
            return pyarrow.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pyarrow.ipc.open_stream(source).read_all()


def _shape_columns(names: list[str]) -> list[str]:
    return [n for n in names if n in SHAPE_FIELDS]


def _rows(table, max_rows: int | None, columns: list[str]) -> Table:
    if max_rows is not None:
        table = table.slice(0, max_rows)
    table = table.select(_shape_columns(columns))
    return Table([without_nulls(row) for row in table.to_pylist()], list(columns))


def saved_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a folder saved with `datasets`' save_to_disk, in the order it reads them
    (its state.json's `_data_files`); None for a folder that is no such dataset. PieceError for a
    DatasetDict folder (several splits), naming them."""
    if (folder / "dataset_dict.json").is_file():
        splits = _small_json(folder / "dataset_dict.json")
        names = splits.get("splits") if isinstance(splits, dict) else None
        shown = ", ".join(map(str, names)) if isinstance(names, list) and names else "several splits"
        first = names[0] if isinstance(names, list) and names else "train"
        raise PieceError(
            f"data folder '{folder}' holds the splits {shown} (a DatasetDict): give one split's "
            f"folder, e.g. {folder / str(first)}"
        )
    state = folder / "state.json"
    if not state.is_file():
        return None
    record = _small_json(state)
    files = record.get("_data_files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise PieceError(f"'{state}' does not list the dataset's files (_data_files); save it again")
    return [folder / str(f["filename"]) for f in files]


def read_saved_dataset(folder: Path, max_rows: int | None) -> Table:
    """The rows of a folder saved with `datasets`' save_to_disk (up to `max_rows`), read with
    datasets.load_from_disk. PieceError, one line, for a missing `datasets` or a folder it cannot
    read."""
    try:
        import datasets
    except ImportError as exc:
        raise PieceError(f"reading a `datasets` folder ('{folder}') needs datasets: {EXTRA}") from exc
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        dataset = datasets.load_from_disk(str(folder), keep_in_memory=False)
    except (OSError, ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise PieceError(f"data folder '{folder}' cannot be read by datasets: {first_line(exc)}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise PieceError(f"data folder '{folder}' holds several splits: give one split's folder")
    columns = list(dataset.column_names)
    shown = dataset.select_columns(_shape_columns(columns)).with_format("arrow")
    count = len(shown) if max_rows is None else min(max_rows, len(shown))
    table = shown[:count]  # a pyarrow Table of the first rows (the dataset's own row order)
    return Table([without_nulls(row) for row in table.to_pylist()], columns)


def _small_json(path: Path):
    """A `datasets` folder's own small JSON file (state.json, dataset_dict.json), parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PieceError(f"'{path}' cannot be read as JSON: {first_line(exc)}") from None
