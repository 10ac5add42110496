"""Writing data files in verl's RL parquet format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_parquet(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``rows`` to ``path`` (parent folders created) and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path
