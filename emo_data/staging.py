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

Config-aware resume: the done marker holds the source's *fingerprint* (:func:`source_fingerprint`):
the values of every config field that shapes a staged sample, the manifest fields that do
(``audio_stream``), the package and schema versions, and the input file's size and mtime. A re-run
whose fingerprint differs in any of them redoes that source (:func:`plan_resume` names the
differing keys). Sections used only by finalisation (``identity``, ``shards``) and fields that do
not change a byte (``decode.threads``) are left out, so changing them re-finalises without
redoing any source. A field or section that a staged record lacks (the config grew since) counts
as different: the source is redone once, since nothing says the new step would have left it
unchanged.

After a successful finalisation the part files are deleted (their samples now live in the final
shards, so staging does not hold a second copy of the corpus); rows and markers stay, and a later
finalisation reads those samples back from the final shards.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Optional

import numpy as np

from .fsio import write_json_atomic
from .shards import SCHEMA_VERSION, StreamingTarWriter, as_stored_config, config_sha256, encode_sample
from .shards.contract import sample_shaping_config
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


def _numpy_as_json(obj: Any):
    return obj.tolist() if isinstance(obj, np.ndarray) else float(obj)


def _write_json_atomic(path: str, payload: Any) -> None:
    write_json_atomic(path, payload, fsync=True, default=_numpy_as_json)


def write_staged_sample(out_dir: str, source_id: str, sample: ClipSample, stored_config: Optional[dict] = None) -> str:
    """Write one sample as ``staging/<source_id>/<key>.tar`` (temporary name, fsync, rename); its
    index holds ``stored_config`` (``BuildConfig.to_stored()``) under the hash the sample names."""
    os.makedirs(parts_dir(out_dir, source_id), exist_ok=True)
    path = part_path(out_dir, source_id, sample.key)
    extra: dict[str, Any] = {"source_id": source_id}
    if stored_config:
        extra["configs"] = {config_sha256(stored_config): as_stored_config(stored_config)}
    writer = StreamingTarWriter(path, extra)
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


def seal_source(out_dir: str, source_id: str, rows: list[dict[str, Any]], summary: dict[str, Any], status: str,
                fingerprint: Optional[dict[str, Any]] = None) -> None:
    """Mark a source complete. Call only once every part its clip rows name is written; a failed
    source keeps no parts (its rows say why). ``fingerprint`` (:func:`source_fingerprint`) goes
    into the done marker: what the staged source was made from."""
    if status != "ok":
        shutil.rmtree(parts_dir(out_dir, source_id), ignore_errors=True)
    samples = sum(1 for r in rows if r.get("status") == "clip")
    if status == "ok":
        staged_parts(out_dir, source_id, [r["key"] for r in rows if r.get("status") == "clip"])
    base = os.path.join(staging_dir(out_dir), source_id)
    os.makedirs(staging_dir(out_dir), exist_ok=True)
    _write_json_atomic(base + ".rows.json", {"rows": rows, "summary": summary})
    marker: dict[str, Any] = {"status": status, "samples": samples if status == "ok" else 0}
    if fingerprint is not None:
        marker["fingerprint"] = fingerprint
        # what finalisation compares: what the source was made from *and* what came out (a retried
        # crash has the same fingerprint but new rows)
        outcome = hashlib.sha256(json.dumps([status, rows], sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker["digest"] = fingerprint_digest({"fingerprint": fingerprint_digest(fingerprint), "outcome": outcome})
    _write_json_atomic(base + ".done", marker)


def read_staged(out_dir: str, source_id: str) -> dict[str, Any]:
    with open(os.path.join(staging_dir(out_dir), f"{source_id}.rows.json")) as fh:
        return json.load(fh)


def read_marker(out_dir: str, source_id: str) -> Optional[dict[str, Any]]:
    """The done marker of a sealed source (status, samples, fingerprint), or None."""
    try:
        with open(done_marker(out_dir, source_id)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def remove_parts(out_dir: str, source_ids: Iterable[str]) -> int:
    """Delete the part files of these sources (after their samples reached the final shards).
    Returns the bytes freed. Rows and done markers stay: they are the resume state."""
    freed = 0
    for source_id in source_ids:
        folder = parts_dir(out_dir, source_id)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            try:
                freed += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)
    return freed


def staged_paths(out_dir: str) -> dict[str, dict[str, Any]]:
    """source_id -> {"path", "file"} (input path and size/mtime, from the markers' fingerprints) of
    every source sealed in ``out_dir``, so a re-run keeps the ids it gave before, also when the
    footage folder moved (see :func:`emo_data.manifest.read_sources`)."""
    out: dict[str, dict[str, Any]] = {}
    for marker_path in glob.glob(os.path.join(glob.escape(staging_dir(out_dir)), "*.done")):
        try:
            with open(marker_path) as fh:
                fingerprint = json.load(fh).get("fingerprint") or {}
        except (OSError, ValueError):
            continue
        if fingerprint.get("path"):
            out[os.path.basename(marker_path)[: -len(".done")]] = {"path": fingerprint["path"], "file": fingerprint.get("file")}
    return out


def same_input(staged: Any, path: str) -> bool:
    """Is ``path`` the input a staged source was made from: the same path, or a file with the
    same size and mtime (the footage folder was moved or copied with its times)?"""
    if isinstance(staged, str):
        return staged == path
    if not isinstance(staged, dict):
        return False
    if staged.get("path") == path:
        return True
    before = staged.get("file") or {}
    return bool(before) and "missing" not in before and file_fingerprint(path) == before


# ----------------------------------------------------------------------------- fingerprints
def staged_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``BuildConfig.to_dict()`` that shapes staged samples (secrets are already
    blank in it): :func:`emo_data.shards.contract.sample_shaping_config`, the part a sample's
    ``config_sha256`` covers. Sections used only by finalisation (``identity``, ``shards``) and
    fields that do not change a byte (``decode.threads``) are left out."""
    return sample_shaping_config(config_dict)


def file_fingerprint(path: str) -> dict[str, Any]:
    """Size and modification time of the input (local file or fsspec URL). Cheap (one stat); a
    file rewritten with the same size within the same mtime tick would go unnoticed."""
    try:
        if "://" in path:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(path)
            info = fs.info(inner)
            stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or info.get("md5Hash")
            return {"size": info.get("size"), "mtime": str(stamp) if stamp is not None else None}
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except Exception as exc:  # noqa: BLE001 - a missing file is the probe stage's business
        return {"missing": type(exc).__name__}


def source_fingerprint(source: Source, config_dict: dict[str, Any]) -> dict[str, Any]:
    """Everything a staged source was made from (see the module docstring)."""
    from . import __version__

    return {
        "path": source.path,
        "file": file_fingerprint(source.path),
        "source": {"audio_stream": source.audio_stream},
        "code": {"emo_version": __version__, "schema_version": SCHEMA_VERSION},
        "config": staged_config(config_dict),
    }


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short digest of what shaped the source (its path excluded: a moved file with the same
    size and mtime is the same input)."""
    payload = {k: v for k, v in fingerprint.items() if k != "path"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


_ABSENT = object()


def fingerprint_changes(stored: Optional[dict[str, Any]], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. ``config.clip.min_seconds 2.0 -> 5.0``; empty = same.
    A key present on one side only is a difference (a config that grew, or a field removed)."""
    if not stored:
        return ["staged without a fingerprint (an older version of emo)"]
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten("", {k: v for k, v in stored.items() if k != "path"}, a)
    _flatten("", {k: v for k, v in current.items() if k != "path"}, b)
    changes = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old != new:
            show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v, default=str)  # noqa: E731
            changes.append(f"{key} {show(old)} -> {show(new)}")
    return changes
