"""The results manifest of a bulk job: one Parquet row per input, safe under crashes.

``OUTPUT/manifest.parquet`` holds one row per input — ``status`` (``ok``, ``rejected``: the
input itself is at fault, ``error``: anything else), the error, faces, seeds, outputs, timings.
Rows are first written to a *journal*: after the write stage has committed an image's outputs
(:func:`serve_app.batch.storage.write_atomic`), it writes the rows of its batch as one more
Parquet file under ``OUTPUT/.batch/journal/`` (atomically too). At the end of a job the driver
*compacts*: journal and previous manifest, one row per input (the latest), written atomically as
``manifest.parquet``; then the journal files it read are deleted.

What each crash leaves, and what the next run (resume) does with it:

- killed before an image's outputs are committed: no row, no output (at most a hidden temporary
  on a local disk, deleted on resume) → the image is detailed again;
- killed between the outputs and the journal file: outputs without a row → detailed again, and
  its outputs are replaced atomically by the same bytes (the result is deterministic);
- killed before compaction: the rows are in the journal, which resume reads with the manifest;
- killed between the new manifest and deleting the journal: rows twice, the same → one each.

So a row never names an output that was not committed, and an input is done once its row is
in (resume also checks that an ``ok`` row's outputs still exist, and redoes it otherwise).
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serve_app.batch.storage import Location, is_partial_file, list_files, write_atomic

MANIFEST_NAME = "manifest.parquet"
STATE_DIR = ".batch"
JOURNAL_DIR = f"{STATE_DIR}/journal"

OK, REJECTED, ERROR = "ok", "rejected", "error"
STATUSES = (OK, REJECTED, ERROR)
DONE = (OK, REJECTED)  # a resumed job skips these; ``error`` rows are tried again

# seconds per stage (serve_app.pipeline's stage names, plus the job's own read/decode/write)
TIMING_FIELDS = (
    "read", "decode", "detect", "detect_segm", "sam", "inpaint", "inpaint_engine", "inpaint_queue_wait", "blend",
    "write",
)  # fmt: skip

SCHEMA = pa.schema(
    [
        pa.field("input", pa.string(), nullable=False),  # the input's path or URI
        pa.field("key", pa.string(), nullable=False),  # outputs are named after it
        pa.field("status", pa.string(), nullable=False),  # ok | rejected | error
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("faces_detected", pa.int32()),
        pa.field("faces_refined", pa.int32()),
        pa.field("seeds", pa.list_(pa.uint64())),  # per face, in the order of `segments` (null: not sampled)
        pa.field("outputs", pa.list_(pa.string())),  # relative to OUTPUT
        pa.field("seconds", pa.float64()),  # the image's time in the stages (sum of `timings`)
        pa.field("timings", pa.struct([pa.field(name, pa.float64()) for name in TIMING_FIELDS])),
        pa.field("run_id", pa.string()),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def new_run_id() -> str:
    """Sortable by start time: ``20261207T091500Z-1a2b3c``."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rows_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class Manifest:
    """The manifest and journal of one OUTPUT location."""

    def __init__(self, output: Location) -> None:
        self.output = output

    @property
    def path(self) -> str:
        return self.output.join(MANIFEST_NAME)

    def append(self, rows: Sequence[dict[str, Any]], run_id: str) -> str | None:
        """Write ``rows`` as one journal file (after their outputs are committed); return its path."""
        if not rows:
            return None
        path = self.output.join(f"{JOURNAL_DIR}/{run_id}-{uuid.uuid4().hex[:12]}.parquet")
        write_atomic(self.output.filesystem, path, parquet_bytes(rows_table(rows)))
        return path

    def journal_files(self) -> list[str]:
        journal = Location(self.output.filesystem, self.output.join(JOURNAL_DIR), self.output.uri)
        return sorted(
            info.path
            for info in list_files(journal)
            if info.path.endswith(".parquet") and not is_partial_file(info.base_name)
        )

    def read(self) -> tuple[pa.Table, list[str]]:
        """One row per input (the latest), from the manifest and the journal; and the journal files read."""
        filesystem = self.output.filesystem
        journal = self.journal_files()
        tables = []
        if filesystem.get_file_info(self.path).type.name == "File":
            tables.append(_conformed(pq.read_table(self.path, filesystem=filesystem)))
        tables += [_conformed(pq.read_table(path, filesystem=filesystem)) for path in journal]
        if not tables:
            return SCHEMA.empty_table(), journal
        return latest_per_input(pa.concat_tables(tables)), journal

    def compact(self) -> pa.Table:
        """Rewrite ``manifest.parquet`` with every row, then drop the journal files it now holds."""
        table, journal = self.read()
        table = table.sort_by([("key", "ascending")])
        write_atomic(self.output.filesystem, self.path, parquet_bytes(table))
        for path in journal:
            try:
                self.output.filesystem.delete_file(path)
            except (FileNotFoundError, OSError):
                pass
        return table

    def reset(self) -> None:
        """Forget every row (``--no-resume``): the manifest and the journal are deleted."""
        for path in [self.path, *self.journal_files()]:
            try:
                self.output.filesystem.delete_file(path)
            except (FileNotFoundError, OSError):
                pass


def _conformed(table: pa.Table) -> pa.Table:
    return table.select(SCHEMA.names).cast(SCHEMA)


def latest_per_input(table: pa.Table) -> pa.Table:
    """One row per ``input``: the one finished last (ties: the one read last)."""
    if table.num_rows == 0:
        return table
    order = pa.array(np.arange(table.num_rows))
    ordered = table.append_column("_order", order).sort_by(
        [("input", "ascending"), ("finished_at", "ascending"), ("_order", "ascending")]
    )
    inputs = np.asarray(ordered.column("input").to_pylist(), dtype=object)
    keep = np.ones(len(inputs), dtype=bool)
    keep[:-1] = inputs[:-1] != inputs[1:]
    return ordered.filter(pa.array(keep)).drop_columns(["_order"])


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return counts
