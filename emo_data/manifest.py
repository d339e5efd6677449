"""Source manifests in (CSV / parquet / directory / glob) and the build manifest out (parquet)."""
from __future__ import annotations

import glob
import hashlib
import os
import re
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


# A source id names staging folders and starts every sample key (``<source_id>_<clip:05d>``):
# WebDataset splits keys at the first dot and a slash would nest folders, so only these.
SOURCE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,160}$")


class ManifestError(ValueError):
    """A source manifest that cannot be built from; the message names the row."""


def _path_hash(basis: str) -> str:
    return hashlib.sha1(basis.encode("utf-8")).hexdigest()[:8]


@dataclass
class _Entry:
    source: Source
    explicit: bool      # the manifest gave the source_id
    basis: str          # the path as the manifest / folder names it: what a colliding id hashes
    where: str          # "sources.csv row 3" for messages


def _assign_ids(entries: list[_Entry], previous: Optional[dict[str, Any]] = None) -> list[Source]:
    """Unique ids, decided by a rule that does not depend on manifest order:

    - a ``source_id`` given by the manifest is used as is (validated, unique);
    - otherwise the file name's stem; when two sources would share it, *each* of them gets
      ``<stem>-<8 hex of sha1(path)>`` instead, whichever comes first;
    - ``previous`` (id -> path and file size/mtime of sources already sealed in the output
      folder, :func:`emo_data.staging.staged_paths`) wins over both for the same input file, so
      adding a same-named file never renames a key that exists.
    """
    from .staging import same_input

    previous = previous or {}
    taken: dict[str, _Entry] = {}
    for e in entries:
        if not e.explicit:
            continue
        if e.source.source_id in taken:
            raise ManifestError(f"{e.where}: source_id {e.source.source_id!r} is also used by {taken[e.source.source_id].where}")
        taken[e.source.source_id] = e
    derived = sorted((e for e in entries if not e.explicit), key=lambda e: e.basis)
    for a, b in zip(derived, derived[1:]):
        if a.basis == b.basis:
            raise ManifestError(f"{b.where}: the same file as {a.where}; list it once, or give each row a source_id")
    stems = {id(e): e.source.source_id for e in derived}
    hashed = {id(e): f"{stems[id(e)]}-{_path_hash(e.basis)}" for e in derived}
    chosen: dict[int, str] = {}
    for e in derived:  # sticky: the id this path had in an earlier build of the same output
        for candidate in (stems[id(e)], hashed[id(e)]):
            if candidate in previous and candidate not in taken and same_input(previous[candidate], e.source.path):
                chosen[id(e)] = candidate
                taken[candidate] = e
                break
    count: dict[str, int] = {}
    for e in derived:
        if id(e) not in chosen:
            count[stems[id(e)]] = count.get(stems[id(e)], 0) + 1
    for e in derived:
        if id(e) in chosen:
            continue
        stem = stems[id(e)]
        new_id = stem if count[stem] == 1 and stem not in taken else hashed[id(e)]
        if new_id in taken:
            raise ManifestError(f"{e.where}: derived source_id {new_id!r} collides with {taken[new_id].where}; "
                                "give one of them a source_id column value")
        chosen[id(e)] = new_id
        taken[new_id] = e
    for e in derived:
        e.source.source_id = chosen[id(e)]
    return [e.source for e in entries]


def check_sources(sources: list[Source]) -> list[Source]:
    """Sources built in code (not read from a manifest) meet the same rules: safe, unique ids."""
    seen: dict[str, str] = {}
    for s in sources:
        if not SOURCE_ID_RE.match(s.source_id or ""):
            raise ManifestError(f"source {s.path}: source_id {s.source_id!r} may hold only letters, digits, '_' and '-' "
                                "(at most 160): it names the sample keys and staging folders")
        if s.source_id in seen:
            raise ManifestError(f"source_id {s.source_id!r} is used by both {seen[s.source_id]} and {s.path}")
        seen[s.source_id] = s.path
    return sources


def read_sources(spec: str, previous_ids: Optional[dict[str, Any]] = None) -> list[Source]:
    """A manifest CSV/parquet (column ``path`` required), a directory, or a glob -> sources.

    Relative paths in a manifest are resolved against the manifest's own folder, so a manifest
    can travel with its footage. Optional columns: ``source_id`` (letters, digits, ``_``, ``-``),
    ``kind``, ``language``, ``licence``, ``identity`` (or ``speaker``), ``audio_stream`` (which of
    the file's audio streams holds the voice, from 0). Problems raise :class:`ManifestError`
    naming the row. ``previous_ids`` (from :func:`emo_data.staging.staged_paths`)
    keeps the ids an earlier build into the same output gave.
    """
    import pandas as pd

    lower = spec.lower()
    if lower.endswith((".csv", ".tsv", ".parquet", ".pq")):
        if lower.endswith((".parquet", ".pq")):
            table = pd.read_parquet(spec)
        else:
            table = pd.read_csv(spec, sep="\t" if lower.endswith(".tsv") else ",", dtype=str, keep_default_na=False)
        if "path" not in table.columns:
            raise ManifestError(f"{spec}: manifest needs a 'path' column (has: {', '.join(table.columns)})")
        base = os.path.dirname(os.path.abspath(spec)) if not _is_url(spec) else spec.rsplit("/", 1)[0]
        name = os.path.basename(spec)
        entries = []
        for number, row in enumerate(table.to_dict("records"), start=1):
            path = str(row["path"]).strip()
            if not path:
                continue
            where = f"{name} row {number} ({path})"
            resolved = _resolve(path, base) if not _is_url(base) else (path if _is_url(path) else f"{base}/{path}")

            def text(column: str, default: str) -> str:
                value = row.get(column)
                return str(value).strip() if value is not None and str(value).strip() not in ("", "nan", "None") else default

            given_id = text("source_id", "")
            if given_id and not SOURCE_ID_RE.match(given_id):
                raise ManifestError(
                    f"{where}: source_id {given_id!r} may hold only letters, digits, '_' and '-' (at most 160): "
                    "it names the sample keys (WebDataset splits keys at dots) and staging folders")
            audio_stream = text("audio_stream", "")
            stream_index = None
            if audio_stream:
                try:
                    number_value = float(audio_stream)
                except ValueError:
                    number_value = -1.0
                if number_value < 0 or number_value != int(number_value):
                    raise ManifestError(f"{where}: audio_stream {audio_stream!r} must be a stream number from 0")
                stream_index = int(number_value)
            identity = text("identity", "") or text("speaker", "")
            source = Source(
                path=resolved,
                source_id=given_id or make_source_id(path),
                kind=text("kind", "unknown"),
                language=text("language", "und"),
                licence=text("licence", text("license", "")),
                identity=identity or None,
                audio_stream=stream_index,
            )
            entries.append(_Entry(source, bool(given_id), os.path.normpath(path) if not _is_url(path) else path, where))
        return _assign_ids(entries, previous_ids)
    if os.path.isdir(spec):
        root = spec
        paths = sorted(
            os.path.join(folder, name)
            for folder, _dirs, files in os.walk(spec)
            for name in files
            if name.lower().endswith(VIDEO_EXTENSIONS)
        )
    else:
        root = None
        paths = sorted(p for p in glob.glob(spec, recursive=True) if p.lower().endswith(VIDEO_EXTENSIONS))
    if not paths:
        raise ManifestError(f"{spec}: no manifest, and no video files matched")
    entries = [
        _Entry(Source(path=os.path.abspath(p), source_id=make_source_id(p)), False,
               os.path.relpath(p, root) if root else os.path.normpath(p), p)
        for p in paths
    ]
    return _assign_ids(entries, previous_ids)


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
    # the per-clip gate's scores, for kept clips and for the clips it rejected (docs/sync.md)
    sync_backend: Optional[str] = None
    sync_offset_frames: Optional[int] = None      # measured; > 0 = audio late
    sync_confidence: Optional[float] = None
    sync_min_distance: Optional[float] = None     # SyncNet's LSE-D
    sync_decision: Optional[str] = None           # keep | correct | reject (what enforce mode does)
    audio_shift_frames: Optional[int] = None      # applied to the stored wav / audio_emb
    mouth_motion_p90: Optional[float] = None
    face_quality: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_fields(record: Optional[dict[str, Any]], quality: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """ManifestRow's gate columns from a clip's ``sync`` record (``ClipCandidate.sync``)."""
    record = record or {}
    return dict(
        sync_backend=record.get("backend"), sync_offset_frames=record.get("offset_frames"),
        sync_confidence=record.get("confidence"), sync_min_distance=record.get("min_distance"),
        sync_decision=record.get("decision"), audio_shift_frames=record.get("applied_offset_frames"),
        mouth_motion_p90=record.get("mouth_motion_p90"), face_quality=(quality or {}).get("face_quality"),
    )


def write_manifest(rows: list[dict[str, Any]], path: str) -> None:
    import pandas as pd

    columns = list(ManifestRow.__dataclass_fields__)
    table = pd.DataFrame(rows, columns=columns)
    tmp = path + ".tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
