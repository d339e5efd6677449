"""Source manifests in (CSV / parquet / directory / glob) and the build manifest out (parquet)."""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .types import Source, make_source_id

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg")
KINDS = ("talk", "film", "singing", "unknown")


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base_dir: str) -> str:
    if _is_url(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def _unique_ids(sources: list[Source]) -> list[Source]:
    """Same-named files in different folders get a short path hash so keys never collide."""
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.source_id] = counts.get(s.source_id, 0) + 1
    for s in sources:
        if counts[s.source_id] > 1:
            s.source_id = f"{s.source_id}-{hashlib.sha1(s.path.encode()).hexdigest()[:8]}"
    return sources


def read_sources(spec: str) -> list[Source]:
    """A manifest CSV/parquet (column ``path`` required), a directory, or a glob -> sources.

    Relative paths in a manifest are resolved against the manifest's own folder, so a manifest
    can travel with its footage.
    """
    import pandas as pd

    lower = spec.lower()
    if lower.endswith((".csv", ".tsv", ".parquet", ".pq")):
        if lower.endswith((".parquet", ".pq")):
            table = pd.read_parquet(spec)
        else:
            table = pd.read_csv(spec, sep="\t" if lower.endswith(".tsv") else ",", dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise ValueError(f"{spec}: manifest needs a 'path' column (has: {', '.join(table.columns)})")
        base = os.path.dirname(os.path.abspath(spec)) if not _is_url(spec) else spec.rsplit("/", 1)[0]
        sources = []
        for row in table.to_dict("records"):
            path = str(row["path"]).strip()
            if not path:
                continue
            resolved = _resolve(path, base) if not _is_url(base) else (path if _is_url(path) else f"{base}/{path}")

            def text(name: str, default: str) -> str:
                value = row.get(name)
                return str(value).strip() if value not in (None, "") and str(value) != "nan" else default

            identity = text("identity", "") or text("speaker", "")
            sources.append(
                Source(
                    path=resolved,
                    source_id=text("source_id", "") or make_source_id(path),
                    kind=text("kind", "unknown"),
                    language=text("language", "und"),
                    licence=text("licence", text("license", "")),
                    identity=identity or None,
                )
            )
        return _unique_ids(sources)
    if os.path.isdir(spec):
        paths = sorted(
            os.path.join(root, name)
            for root, _dirs, files in os.walk(spec)
            for name in files
            if name.lower().endswith(VIDEO_EXTENSIONS)
        )
    else:
        paths = sorted(p for p in glob.glob(spec, recursive=True) if p.lower().endswith(VIDEO_EXTENSIONS))
    if not paths:
        raise ValueError(f"{spec}: no manifest, and no video files matched")
    return _unique_ids([Source(path=os.path.abspath(p), source_id=make_source_id(p)) for p in paths])


@dataclass
class ManifestRow:
    """One row of the build manifest: a kept clip, a rejected span, or a failed source."""

    status: str                  # clip | rejected | failed
    source_id: str
    path: str
    kind: str = "unknown"
    language: str = "und"
    licence: str = ""
    key: Optional[str] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    duration_s: float = 0.0
    reason: Optional[str] = None
    stage: Optional[str] = None
    detail: str = ""
    num_frames: int = 0
    face_size: Optional[float] = None
    head_speed_mean: Optional[float] = None
    identity: Optional[str] = None
    split: Optional[str] = None
    shard: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_manifest(rows: list[dict[str, Any]], path: str) -> None:
    import pandas as pd

    columns = list(ManifestRow.__dataclass_fields__)
    table = pd.DataFrame(rows, columns=columns)
    tmp = path + ".tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
