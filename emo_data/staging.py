"""Per-source staging: each clip lands in its own part file, then the source is sealed.

Layout under ``<out>/staging/``::

    <source_id>/<key>.tar (+ .index.json)   one sample each, written by whichever worker finished it
    <source_id>.rows.json                   the source's manifest rows and summary
    <source_id>.done                        written last: the source is complete

Resumability rests on the order of these writes: every part is written under a temporary name,
fsynced and renamed; the rows and then the done marker are written only after all of a source's
parts are in place. A source with a marker is complete; a source without one is redone from
scratch (:func:`clear_source` drops its parts and temporary files first). One part per clip lets
the Ray build write clips of one source from different workers, in any order.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Optional

import numpy as np

from .schema import StreamingTarWriter, encode_sample
from .types import ClipSample, Source

STAGING_DIR = "staging"


def staging_dir(out_dir: str) -> str:
    return os.path.join(out_dir, STAGING_DIR)


def parts_dir(out_dir: str, source_id: str) -> str:
    return os.path.join(staging_dir(out_dir), source_id)


def part_path(out_dir: str, source_id: str, key: str) -> str:
    return os.path.join(parts_dir(out_dir, source_id), f"{key}.tar")


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


def write_staged_sample(out_dir: str, source_id: str, sample: ClipSample, config_dict: Optional[dict] = None) -> str:
    """Write one sample as ``staging/<source_id>/<key>.tar`` (temporary name, fsync, rename)."""
    os.makedirs(parts_dir(out_dir, source_id), exist_ok=True)
    path = part_path(out_dir, source_id, sample.key)
    writer = StreamingTarWriter(path, {"source_id": source_id, "config": config_dict or {}})
    try:
        writer.write(sample.key, encode_sample(sample), sample.meta)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return path


def staged_parts(out_dir: str, source_id: str, keys: list[str]) -> list[str]:
    """The part files of ``keys`` (in that order); a missing one is an error, not a skip."""
    paths = [part_path(out_dir, source_id, key) for key in keys]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"staged source {source_id} lacks {len(missing)} part(s), e.g. {missing[0]}")
    return paths


def clear_source(out_dir: str, source_id: str) -> None:
    """Forget an unfinished (or to-be-redone) source: parts, temporary files, rows, marker."""
    shutil.rmtree(parts_dir(out_dir, source_id), ignore_errors=True)
    base = os.path.join(staging_dir(out_dir), source_id)
    for path in [base + ".done", base + ".rows.json"] + glob.glob(glob.escape(base) + ".*.tmp"):
        if os.path.exists(path):
            os.remove(path)


def seal_source(out_dir: str, source_id: str, rows: list[dict[str, Any]], summary: dict[str, Any], status: str) -> None:
    """Mark a source complete. Call only once every part its clip rows name is written; a failed
    source keeps no parts (its rows say why)."""
    if status != "ok":
        shutil.rmtree(parts_dir(out_dir, source_id), ignore_errors=True)
    samples = sum(1 for r in rows if r.get("status") == "clip")
    if status == "ok":
        staged_parts(out_dir, source_id, [r["key"] for r in rows if r.get("status") == "clip"])
    base = os.path.join(staging_dir(out_dir), source_id)
    os.makedirs(staging_dir(out_dir), exist_ok=True)
    _write_json_atomic(base + ".rows.json", {"rows": rows, "summary": summary})
    _write_json_atomic(base + ".done", {"status": status, "samples": samples if status == "ok" else 0})


class SourceStagingWriter:
    """The in-process executor's view of one source: write samples, then seal (or abort)."""

    def __init__(self, out_dir: str, source: Source, config_dict: Optional[dict] = None):
        self.out_dir = out_dir
        self.source = source
        self.config_dict = config_dict or {}
        clear_source(out_dir, source.source_id)  # leftovers of an interrupted attempt
        self.samples = 0

    def write(self, sample: ClipSample) -> None:
        write_staged_sample(self.out_dir, self.source.source_id, sample, self.config_dict)
        self.samples += 1

    def abort(self) -> None:
        shutil.rmtree(parts_dir(self.out_dir, self.source.source_id), ignore_errors=True)
        self.samples = 0

    def seal(self, rows: list[dict[str, Any]], summary: dict[str, Any], status: str) -> None:
        seal_source(self.out_dir, self.source.source_id, rows, summary, status)


def read_staged(out_dir: str, source_id: str) -> dict[str, Any]:
    with open(os.path.join(staging_dir(out_dir), f"{source_id}.rows.json")) as fh:
        return json.load(fh)
