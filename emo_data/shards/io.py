"""Shard I/O: writing tars and their indexes, listing, reading (streamed or by byte range), rewriting.

Local paths and fsspec URLs (``s3://``, ``gs://``, ``http(s)://``, ``memory://``, ``file://``) alike,
except writing and rewriting (local files). Nothing here unpickles: members stay bytes until
:func:`emo_data.shards.codecs.decode_member`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from typing import Any, Callable, Iterable, Iterator, Optional

from ..fsio import write_json_atomic
from .codecs import json_default
from .contract import (
    ALL_MEMBERS,
    CONFIG_CLASS_KEY,
    INDEX_SUFFIX,
    SCHEMA_VERSION,
    SampleMeta,
    as_stored_config,
    config_sha256,
)

# Index keys every writer sets itself; any other key (the configs, a staged part's source id) is
# the caller's and survives a rewrite.
INDEX_OWN_KEYS = ("schema_version", "shard", "bytes", "num_samples", "samples")
GLOB_CHARS = "*?["


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_path_for(shard_path: str) -> str:
    return shard_path[: -len(".tar")] + INDEX_SUFFIX if shard_path.endswith(".tar") else shard_path + INDEX_SUFFIX


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    return fs


# --------------------------------------------------------------------------- listing
def list_shards(specs: Iterable[str], must_match: bool = False) -> list[str]:
    """Files, directories (the ``*.tar`` directly inside, not ``staging/``) and globs -> shard
    paths/URLs, in the order given (each directory or glob sorted), no duplicates.

    A URL ending in ``.tar`` is taken as it is (no request is made for it). ``must_match``: a spec
    that names no shard is a FileNotFoundError (the inspector's behaviour) instead of nothing.
    """
    out: list[str] = []
    for spec in specs:
        spec = str(spec)
        found: list[str]
        if is_url(spec):
            fs = _fs(spec)
            bare = fs._strip_protocol(spec)  # fsspec's own way to drop the protocol
            if any(c in bare for c in GLOB_CHARS):
                found = [fs.unstrip_protocol(p) for p in sorted(fs.glob(bare)) if p.endswith(".tar")]
            elif not spec.endswith(".tar") and fs.isdir(bare):
                found = [fs.unstrip_protocol(p) for p in sorted(fs.ls(bare, detail=False)) if p.endswith(".tar")]
            else:
                found = [spec]
        elif any(c in spec for c in GLOB_CHARS):
            found = sorted(p for p in glob.glob(spec, recursive=True) if p.endswith(".tar"))
        elif os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        else:
            found = [spec]
        if must_match and not found:
            raise FileNotFoundError(f"no shards match {spec}")
        out.extend(found)
    return list(dict.fromkeys(out))  # first occurrence of each, in order


# --------------------------------------------------------------------------- opening
def open_shard(url: str, block_size: Optional[int] = None):
    """A seekable binary file; a remote one fetches only the byte ranges read (``block_size``:
    read ahead this much per request)."""
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
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            return int(fs.size(path))
        return os.path.getsize(url)
    except Exception:  # noqa: BLE001 - an unknown size is not a finding by itself
        return None


# --------------------------------------------------------------------------- index
def read_index(shard_url: str) -> Optional[dict[str, Any]]:
    """The shard's sidecar index, or None when it has none. A sidecar that does not parse raises
    ValueError (the validator reports it)."""
    try:
        with open_shard(index_path_for(shard_url)) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None


def scan_tar(url: str, read_json: bool = True) -> dict[str, Any]:
    """An index-like dict from the tar itself: member offsets and (``read_json``) each sample's
    json metadata. Reads headers (and json members); other members' data are seeked over. No
    SHA-256 digests: only a sidecar written with the shard has those."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with open_shard(url, block_size=1 << 16) as fh:
        with tarfile.open(fileobj=fh, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, _, member = info.name.partition(".")
                if key not in samples:
                    samples[key] = {"key": key, "members": {}, "meta": None}
                    order.append(key)
                samples[key]["members"][member] = {"offset": info.offset_data, "size": info.size}
                extracted = tf.extractfile(info) if read_json and member == "json" else None
                if extracted is not None:
                    data = extracted.read()
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
    index = read_index(url)
    if index is not None:
        return index
    return scan_tar(url) if scan_fallback else None


def find_entry(index: dict[str, Any], key: Optional[str] = None, position: Optional[int] = None) -> dict[str, Any]:
    """An index's entry for sample ``key``, or at ``position`` (negative counts from the end)."""
    entries = index["samples"]
    if key is not None:
        for entry in entries:
            if entry["key"] == key:
                return entry
        raise KeyError(f"sample {key!r} not in shard (it holds {len(entries)} samples)")
    if position is None or not -len(entries) <= position < len(entries):
        raise IndexError(f"sample index {position} out of range (shard holds {len(entries)} samples)")
    return entries[position]


# --------------------------------------------------------------------------- reading
def read_members(url: str, entry: dict[str, Any], members: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Raw bytes of one sample's members (all, or ``members``), located by an index ``entry``,
    with one byte-range read: a sample's members are adjacent in the tar."""
    names = None if members is None else set(members)
    wanted = {m: loc for m, loc in entry["members"].items() if names is None or m in names}
    raw: dict[str, Any] = {"__key__": entry["key"], "__shard__": url}
    if not wanted:
        return raw
    lo = min(loc["offset"] for loc in wanted.values())
    hi = max(loc["offset"] + loc["size"] for loc in wanted.values())
    with open_shard(url, block_size=max(hi - lo, 1 << 16)) as fh:
        fh.seek(lo)
        blob = fh.read(hi - lo)
    if len(blob) != hi - lo:
        raise EOFError(f"{url}: got {len(blob)} of the {hi - lo} bytes of sample {entry['key']} at offset {lo} "
                       "(shard truncated?)")
    for member, loc in wanted.items():
        start = loc["offset"] - lo
        raw[member] = blob[start : start + loc["size"]]
    return raw


def iter_raw_samples(shard_url: str) -> Iterator[dict[str, Any]]:
    """Stream a shard's samples as {'__key__', '__shard__', member: bytes} (tar order)."""
    with open_shard(shard_url) as fh:
        with tarfile.open(fileobj=fh, mode="r|") as tf:
            current: dict[str, Any] = {}
            for info in tf:
                if not info.isfile():
                    continue
                key, _, member = info.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                if not current:
                    current = {"__key__": key, "__shard__": shard_url}
                extracted = tf.extractfile(info)
                current[member] = extracted.read() if extracted else b""
            if current:
                yield current


def read_sample(shard_url: str, key: Optional[str] = None, index: Optional[int] = None,
                members: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """One sample's raw members, by key or position. With an index only its bytes are read
    (:func:`read_members`); without one the tar is streamed up to it."""
    idx = read_index(shard_url)
    if idx is not None:
        return read_members(shard_url, find_entry(idx, key=key, position=index if key is None else None), members)
    names = None if members is None else set(members)
    for position, raw in enumerate(iter_raw_samples(shard_url)):
        if (key is not None and raw["__key__"] == key) or (key is None and position == index):
            return {k: v for k, v in raw.items() if k.startswith("__") or names is None or k in names}
    raise KeyError(f"{key if key is not None else index} not in {shard_url}")


# --------------------------------------------------------------------------- writing
# Every member header is the same apart from name and size (no wall-clock mtime, no user ids),
# so the same samples always give the same tar bytes and a re-run can be checked with a digest.
MEMBER_MTIME = 0


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "emo"
    return info


def _meta_dict(meta: Any) -> dict[str, Any]:
    return meta.to_dict() if isinstance(meta, SampleMeta) else dict(meta)


class StreamingTarWriter:
    """Writes samples one at a time to a temporary file beside ``path``; ``close()`` renames it
    and writes the index. Temporary names carry the process id, so two attempts at the same
    file (a retried Ray task) never write into one temporary file.

    Memory holds one sample at a time, whatever the number of samples. A shard that has its
    ``.index.json`` is complete: the tar is renamed first, the index written after it.
    ``extra_index``: more index keys (e.g. ``configs``), written as given.
    """

    def __init__(self, path: str, extra_index: Optional[dict] = None):
        self.path = path
        self.extra_index = extra_index or {}
        self._tmp = f"{path}.{os.getpid()}.tmp"
        self._fh = open(self._tmp, "wb")
        self._tf = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self._digests: dict[str, dict[str, str]] = {}
        self._metas: list[tuple[str, dict[str, Any]]] = []
        self.bytes_written = 0

    def __len__(self) -> int:
        return len(self._metas)

    def write(self, key: str, members: dict[str, bytes], meta: Any) -> None:
        """Add one sample: ``members`` in the contract's order; ``meta`` (SampleMeta or its dict)
        is what the index lists for it."""
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        if key in self._digests:
            raise ValueError(f"duplicate sample key {key!r}")
        self._digests[key] = {}
        for member in ALL_MEMBERS:
            if member not in members:
                continue
            data = members[member]
            self._tf.addfile(_tarinfo(f"{key}.{member}", len(data)), io.BytesIO(data))
            self._digests[key][member] = hashlib.sha256(data).hexdigest()
            self.bytes_written += len(data) + 512
        self._metas.append((key, _meta_dict(meta)))

    def abort(self) -> None:
        try:
            self._tf.close()
            self._fh.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def close(self) -> dict[str, Any]:
        self._tf.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        by_key: dict[str, dict[str, Any]] = {}
        for entry in scan_tar(self.path, read_json=False)["samples"]:
            by_key[entry["key"]] = {member: dict(loc, sha256=self._digests[entry["key"]][member])
                                    for member, loc in entry["members"].items()}
        index = {
            "schema_version": SCHEMA_VERSION,
            "shard": os.path.basename(self.path),
            "bytes": os.path.getsize(self.path),
            "num_samples": len(self._metas),
            "samples": [{"key": key, "members": by_key[key], "meta": meta} for key, meta in self._metas],
        }
        index.update(self.extra_index)
        index_path = index_path_for(self.path)
        write_json_atomic(index_path, index, fsync=True, default=json_default, tmp_path=f"{index_path}.{os.getpid()}.tmp")
        return index


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes], Any]], extra_index: Optional[dict] = None) -> dict[str, Any]:
    """Write ``samples`` [(key, members, meta)] to ``path`` atomically, plus its index."""
    writer = StreamingTarWriter(path, extra_index)
    try:
        for key, members, meta in samples:
            writer.write(key, members, meta)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class ShardWriter:
    """Rolls samples into ``<split>-NNNNNN.tar`` shards of bounded size, streaming to disk."""

    def __init__(self, out_dir: str, split: str = "train", max_samples: int = 200, max_bytes: int = 1 << 30,
                 start_index: int = 0, extra_index: Optional[dict] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.extra_index = extra_index
        self.index = start_index
        self.written: list[str] = []
        self._current: Optional[StreamingTarWriter] = None

    @property
    def current_path(self) -> Optional[str]:
        """The shard the last written sample went to (None before the first)."""
        return None if self._current is None else self._current.path

    def write(self, key: str, members: dict[str, bytes], meta: Any) -> None:
        size = sum(len(v) for v in members.values())
        cur = self._current
        if cur is not None and len(cur) and (len(cur) >= self.max_samples or cur.bytes_written + size > self.max_bytes):
            self.flush()
        if self._current is None:
            self._current = StreamingTarWriter(os.path.join(self.out_dir, shard_name(self.split, self.index)), self.extra_index)
        self._current.write(key, members, meta)

    def flush(self) -> Optional[str]:
        if self._current is None:
            return None
        self._current.close()
        self.written.append(self._current.path)
        self._current = None
        self.index += 1
        return self.written[-1]

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def close(self) -> list[str]:
        self.flush()
        return self.written


# --------------------------------------------------------------------------- rewriting
ConfigUpdate = Callable[[dict[str, Any]], dict[str, Any]]


def rewrite_shard(shard_path: str, transform: Callable[[dict[str, Any]], dict[str, Any]],
                  update_config: Optional[ConfigUpdate] = None) -> int:
    """Rewrite a local shard in place, sample by sample: ``transform(raw) -> raw`` (members as
    bytes). Returns the number of samples.

    The build config follows the samples: ``update_config(stored) -> stored`` says how the rewrite
    changes the config the samples were made with (``add-features`` sets ``audio_features``,
    ``fit-buckets --apply`` the speed buckets); each sample's ``config_sha256`` and the index's
    ``configs`` are set to match. A sample that still carries its config inline (meta_version 1)
    gets a reference instead, its config moving into the index. Other index keys are kept.

    The new tar is written beside the old one and renamed over it; the old index is removed
    first, so a rewrite cut off half way leaves either the old shard whole or a shard without an
    index (never an index that describes other bytes).
    """
    old_index = read_index(shard_path) or {}
    extra = {k: v for k, v in old_index.items() if k not in INDEX_OWN_KEYS}
    old_configs: dict[str, Any] = dict(extra.pop("configs", None) or {})
    legacy_config = extra.pop("config", None)  # meta_version 1 indexes: one config for the shard
    configs: dict[str, Any] = {}
    writer = StreamingTarWriter(shard_path, extra)
    count = 0
    try:
        for raw in iter_raw_samples(shard_path):
            raw = transform(raw)
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            meta = SampleMeta.from_json(members["json"])
            stored = meta.build_config({"configs": old_configs, "config": legacy_config})
            if stored is not None:
                if update_config is not None:
                    stored = as_stored_config(update_config(dict(stored)), stored.get(CONFIG_CLASS_KEY, "BuildConfig"))
                digest = config_sha256(stored)
                configs[digest] = stored
                if meta.config is not None or meta.config_sha256 != digest:
                    meta.config, meta.config_sha256 = None, digest
                    members["json"] = meta.to_json()
            writer.write(raw["__key__"], members, json.loads(members["json"].decode("utf-8")))
            count += 1
        if configs:
            writer.extra_index["configs"] = configs
        index_path = index_path_for(shard_path)
        if os.path.exists(index_path):
            os.remove(index_path)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return count
