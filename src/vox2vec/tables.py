"""CSV tables in and out: world points to read, results to write.

A table we write is a plain CSV whose first line is its header (``pandas.read_csv(path)``, R's ``read.csv``, polars
and spreadsheets read it as is), or Parquet. It is written to a temporary name and renamed, and recorded as ours
with the digest of its bytes (:func:`vox2vec.outputs.record_written`, done by :func:`vox2vec._atomic.atomic_path`):
a later run replaces it only while it is byte-for-byte what vox2vec wrote. A table someone edited (a hand-annotated
column, a re-save from a spreadsheet) or any other file at that path is replaced only with ``overwrite=True``
(``--overwrite``), checked by :func:`vox2vec.outputs.check_output_file` before any work.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vox2vec._atomic import atomic_path
from vox2vec.errors import InputError, MissingExtraError

__all__ = ["read_csv", "read_points", "write_table"]


def read_csv(path: Path, what: str, expected: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The rows of a CSV (lines starting with ``#`` are comments) and its header as {lower-case name: name}; an
    unreadable file is an :class:`InputError` naming ``what`` and the ``expected`` layout."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"could not read the {what} {path} ({error}); expected {expected}") from None
    rows = list(csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#")))
    return rows, {k.strip().lower(): k for k in (rows[0].keys() if rows else []) if k is not None}


def read_points(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """A CSV of world points: columns ``x, y, z`` (LPS millimetres) and optionally ``name``; lines starting with
    ``#`` are comments. Returns the names (``point_<row>`` where absent) and the (N, 3) points."""
    path = Path(path)
    rows, header = read_csv(path, "points file", "a CSV with columns x, y, z and optionally name")
    missing = [c for c in ("x", "y", "z") if c not in header]
    if not rows or missing:
        raise InputError(f"{path} needs a header with columns x, y, z (world LPS mm) and at least one row"
                         + (f"; missing {', '.join(missing)}" if rows and missing else ""))
    names, points = [], []
    for number, row in enumerate(rows, 2):
        try:
            points.append([float(row[header[c]]) for c in ("x", "y", "z")])
        except (TypeError, ValueError):
            raise InputError(f"{path}, line {number}: x, y, z must be numbers, got "
                             f"{[row.get(header[c]) for c in ('x', 'y', 'z')]}") from None
        name = row.get(header["name"], "").strip() if "name" in header else ""
        names.append(name or f"point_{number - 1}")
    return names, np.asarray(points)


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A plain CSV (first line: the header ``columns``; floats to 4 decimals, NaN as an empty cell) — or, for a
    ``.parquet`` path, Parquet (full precision; needs pyarrow) with ``vox2vec`` in its schema metadata. Written to a
    temporary name, then renamed and recorded as ours (see the module docstring). Check the path first with
    :func:`vox2vec.outputs.check_output_file` (kind "table")."""
    if Path(path).suffix.lower() == ".parquet":
        return _write_parquet(Path(path), columns, rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else
                             f"{v:.4f}" if isinstance(v, float) else v for v in row])
    return Path(path)


def _write_parquet(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("writing Parquet needs pyarrow: pip install 'vox2vec[tables]', or write .csv") from None
    values = list(zip(*rows)) if rows else [[] for _ in columns]
    table = pa.table({name: list(column) for name, column in zip(columns, values)})
    table = table.replace_schema_metadata({b"vox2vec": b"table"})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path
