"""A parquet/CSV table of image paths as a dataset (its other columns are labels), and `dataset_column`: one
column of a table dataset, or one field of the samples' .json members of tar shards."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Tuple

from ..errors import DatasetError
from .tar import tar_json_field
from .types import ImageDataset, file_stat, identity_of


def table_dataset(path: Path, image_column: str, caption_column: str) -> ImageDataset:
    columns, rows = read_table(path)
    if image_column not in columns:
        raise DatasetError(f"{path} has no column {image_column!r} (columns: {', '.join(columns) or 'none'}); "
                           f"name the image-path column with --image-column")
    images = rows[image_column]
    captions = rows.get(caption_column)
    base = path.resolve().parent
    keys = []
    for value in images:
        text = "" if value is None else str(value)
        candidate = Path(text).expanduser()
        keys.append(str(candidate if candidate.is_absolute() else (base / candidate)) if text else "")
    stats = [file_stat(k) if k else (-1, -1) for k in keys]
    if not keys:
        raise DatasetError(f"{path} has no rows; give a table with one image path per row")
    return ImageDataset(
        keys=keys,
        identity=identity_of(["table", str(path.resolve()), image_column]
                             + [f"{k}|{s}|{m}" for k, (s, m) in zip(keys, stats)]),
        description=f"table {path} ({len(keys)} images, column {image_column!r})",
        captions=[("" if c is None else str(c)) for c in captions] if captions is not None else None,
        table=str(path.resolve()),
        _sources=[("file", k) for k in keys],
    )


def read_table(path: Path) -> Tuple[List[str], dict]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq  # lazy: only parquet needs it; keeps import neurolens 0.1-0.5 s lighter
        try:
            table = pq.ParquetFile(str(path)).read()   # not pq.read_table: it imports pandas (~0.5 s)
        except Exception as exc:
            raise DatasetError(f"{path} is not a readable parquet file ({exc}); check the file") from None
        return table.column_names, {name: table.column(name).to_pylist() for name in table.column_names}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} is not a readable CSV file ({exc}); check the file") from None
    return columns, {name: [row.get(name) for row in rows] for name in columns}


def dataset_column(dataset: ImageDataset, name: str) -> List[object]:
    """The values of column `name` for every item of `dataset` (None where an item has none): a column of a
    parquet/CSV table, or a field of the samples' .json members in tar shards (LAION's webdataset shards
    carry e.g. `NSFW` there). Raises DatasetError when no item has it."""
    if dataset.table:
        columns, rows = read_table(Path(dataset.table))
        if name not in columns:
            raise DatasetError(f"{dataset.table} has no column {name!r} (columns: {', '.join(columns) or 'none'}); "
                               f"name an existing column in --labels column:NAME")
        return list(rows[name])
    tar_items = [source for source in dataset._sources if source and source[0] == "tar"]
    # img2dataset rows whose download failed have no member (their value is None: they are skipped anyway)
    failed = [source for source in dataset._sources if source and source[0] == "skip"]
    if tar_items and len(tar_items) + len(failed) == len(dataset.keys):
        values = tar_json_field(dataset.keys, name)
        if any(v is not None for v in values):
            return values
        raise DatasetError(f"no sample of {dataset.description} has a {name!r} field in its .json member; "
                           f"name an existing field in --labels column:NAME")
    raise DatasetError(f"{dataset.description} has no columns; --labels column:NAME needs a parquet/CSV table or "
                       f"tar shards with .json members")


