"""Find shards and read their indices and single samples, locally or over fsspec, cheaply.

* ``resolve_shards`` expands files, directories (every ``*.tar`` below) and globs, for local
  paths and fsspec URLs alike.
* ``load_index`` reads the ``<shard>.index.json`` sidecar; a shard without one is scanned
  header by header (seeking over member data) and only its ``json`` members are read.
* ``read_members`` fetches one sample's members with a single byte-range read.
Nothing here unpickles: members are bytes until :func:`emo_data.schema.decode_member`.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Any, Iterable, Optional

from .. import schema

GLOB_CHARS = "*?["


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    return fs


def _with_protocol(fs, path: str, like: str) -> str:
    """fsspec returns bare paths from glob/find; put the protocol back."""
    return path if is_url(path) else fs.unstrip_protocol(path)


def resolve_shards(args: Iterable[str]) -> list[str]:
    """Shard tars named by ``args``: files, directories (every ``*.tar`` below) or globs."""
    out: list[str] = []
    for arg in args:
        found: list[str]
        if is_url(arg):
            fs = _fs(arg)
            bare = fs._strip_protocol(arg)
            if any(c in bare for c in GLOB_CHARS):
                found = [_with_protocol(fs, p, arg) for p in sorted(fs.glob(bare)) if p.endswith(".tar")]
            elif fs.isdir(bare):  # the shards directly inside (not staging/ or other sub-folders)
                found = [_with_protocol(fs, p, arg) for p in sorted(fs.ls(bare, detail=False)) if p.endswith(".tar")]
            else:
                found = [arg]
        else:
            if any(c in arg for c in GLOB_CHARS):
                found = sorted(p for p in glob.glob(arg, recursive=True) if p.endswith(".tar"))
            elif os.path.isdir(arg):  # the shards directly inside (not staging/ or other sub-folders)
                found = sorted(glob.glob(os.path.join(arg, "*.tar")))
            else:
                found = [arg]
        if not found:
            raise FileNotFoundError(f"no shards match {arg}")
        out.extend(found)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def open_file(url: str, block_size: Optional[int] = None):
    """A seekable binary file; remote files fetch only the byte ranges that are read."""
    if is_url(url):
        import fsspec

        kwargs = {}
        if block_size is not None and not url.startswith(("memory://", "file://")):
            kwargs = {"block_size": block_size, "cache_type": "readahead"}
        return fsspec.open(url, "rb", **kwargs).open()
    return open(url, "rb")


def file_size(url: str) -> Optional[int]:
    try:
        if is_url(url):
            return int(_fs(url).size(url))
        return os.path.getsize(url)
    except (OSError, FileNotFoundError, TypeError, ValueError):
        return None


def scan_tar(url: str, read_json: bool = True) -> dict[str, Any]:
    """An index-like dict for a shard without a sidecar: member offsets and the json metadata.

    Reads tar headers and ``json`` members only; other members' data are seeked over.
    No SHA-256 digests (those only the sidecar can give).
    """
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with open_file(url, block_size=1 << 16) as fh:
        with tarfile.open(fileobj=fh, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, _, member = info.name.partition(".")
                if key not in samples:
                    samples[key] = {"key": key, "members": {}, "meta": None}
                    order.append(key)
                samples[key]["members"][member] = {"offset": info.offset_data, "size": info.size}
                if read_json and member == "json":
                    data = tf.extractfile(info).read()
                    try:
                        samples[key]["meta"] = json.loads(data.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError):
                        samples[key]["meta"] = None
    return {
        "schema_version": None,
        "shard": url.rsplit("/", 1)[-1],
        "bytes": file_size(url),
        "num_samples": len(order),
        "samples": [samples[k] for k in order],
        "from_tar_scan": True,
    }


def load_index(url: str, scan_fallback: bool = True) -> Optional[dict[str, Any]]:
    """The shard's sidecar index, else (``scan_fallback``) an index built from its tar headers."""
    idx = schema.read_index(url)
    if idx is not None:
        return idx
    return scan_tar(url) if scan_fallback else None


def find_entry(index: dict[str, Any], key: Optional[str] = None, position: Optional[int] = None) -> dict[str, Any]:
    entries = index["samples"]
    if key is not None:
        for entry in entries:
            if entry["key"] == key:
                return entry
        raise KeyError(f"sample {key!r} not in shard (it holds {len(entries)} samples)")
    if position is None or not -len(entries) <= position < len(entries):
        raise IndexError(f"sample index {position} out of range (shard holds {len(entries)} samples)")
    return entries[position]


def read_members(url: str, entry: dict[str, Any], members: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Raw bytes of one sample's members (all, or ``members``) with one contiguous range read."""
    names = None if members is None else set(members)
    wanted = {m: loc for m, loc in entry["members"].items() if names is None or m in names}
    raw: dict[str, Any] = {"__key__": entry["key"], "__shard__": url}
    if not wanted:
        return raw
    lo = min(loc["offset"] for loc in wanted.values())
    hi = max(loc["offset"] + loc["size"] for loc in wanted.values())
    with open_file(url, block_size=max(hi - lo, 1 << 16)) as fh:
        fh.seek(lo)
        blob = fh.read(hi - lo)
    if len(blob) != hi - lo:
        raise EOFError(f"{url}: got {len(blob)} of the {hi - lo} bytes of sample {entry['key']} at offset {lo} "
                       "(shard truncated?)")
    for member, loc in wanted.items():
        start = loc["offset"] - lo
        raw[member] = blob[start : start + loc["size"]]
    return raw


def sample_duration_s(meta: Optional[dict[str, Any]]) -> float:
    if not meta:
        return 0.0
    try:
        T, fps = meta.get("num_frames"), meta.get("fps")
        if T and fps:
            return float(T) / float(fps)
        if meta.get("end_s") is not None and meta.get("start_s") is not None:
            return float(meta["end_s"]) - float(meta["start_s"])
    except (TypeError, ValueError):
        pass
    return 0.0


def safe_name(name: str) -> bool:
    """A key or member name that can become a path component (no traversal, no hidden files)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name
