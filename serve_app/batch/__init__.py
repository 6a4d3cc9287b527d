"""Bulk jobs: a folder, glob, list or bucket of images detailed on Ray Data, resumable (docs/batch.md)."""

from serve_app.batch.job import BatchConfigError, BatchSummary, run_batch

__all__ = ["BatchConfigError", "BatchSummary", "run_batch"]
