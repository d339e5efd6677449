"""Per-source staging: each source's clips go to one tar, then its manifest rows, then a done marker.

Resumability rests on the order of these writes: the marker is written last, after the tar and
the rows are renamed into place and fsynced, so a source with a marker is complete and a source
without one is redone from scratch (its partial ``.tmp`` files are discarded).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from .schema import StreamingTarWriter, encode_sample
from .types import ClipSample, Source

STAGING_DIR = "staging"


def staging_dir(out_dir: str) -> str:
    return os.path.join(out_dir, STAGING_DIR)


def done_marker(out_dir: str, source_id: str) -> str:
    return os.path.join(staging_dir(out_dir), f"{source_id}.done")


def is_done(out_dir: str, source_id: str) -> bool:
    return os.path.exists(done_marker(out_dir, source_id))


def _write_json_atomic(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else float(o))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SourceStagingWriter:
    """Streams one source's samples to ``staging/<source_id>.tar`` and seals it with a marker."""

    def __init__(self, out_dir: str, source: Source, config_dict: Optional[dict] = None):
        self.out_dir = out_dir
        self.source = source
        os.makedirs(staging_dir(out_dir), exist_ok=True)
        self.tar_path = os.path.join(staging_dir(out_dir), f"{source.source_id}.tar")
        self._writer: Optional[StreamingTarWriter] = None
        self._extra = {"source_id": source.source_id, "config": config_dict or {}}
        self.samples = 0

    def write(self, sample: ClipSample) -> None:
        if self._writer is None:
            self._writer = StreamingTarWriter(self.tar_path, self._extra)
        self._writer.write(sample.key, encode_sample(sample), sample.meta)
        self.samples += 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def seal(self, rows: list[dict[str, Any]], summary: dict[str, Any], status: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif os.path.exists(self.tar_path):
            os.remove(self.tar_path)  # stale tar of an earlier attempt that now yields nothing
        base = os.path.join(staging_dir(self.out_dir), self.source.source_id)
        _write_json_atomic(base + ".rows.json", {"rows": rows, "summary": summary})
        _write_json_atomic(base + ".done", {"status": status, "samples": self.samples})


def read_staged(out_dir: str, source_id: str) -> dict[str, Any]:
    with open(os.path.join(staging_dir(out_dir), f"{source_id}.rows.json")) as fh:
        return json.load(fh)
