"""Corpus finalisation: identity clusters -> identity-disjoint splits -> final shards + manifest.

Runs after every source is staged. It only copies member bytes (nothing is decoded again),
rewriting each sample's ``json`` with its identity, split, the manifest's current metadata and
the reference to the build config (``config_sha256``; the config itself goes once into each
shard index and ``build.json``), so it is cheap and idempotent: the same staged sources and
config give byte-identical shards, index files and manifest.

Where a sample's bytes come from: its staged part (``staging/<source>/<key>.tar``) when the
source was staged since the last finalisation, else the current final shards. After a
successful finalisation the parts are deleted, so the corpus is on disk once (plus, while a
finalisation runs, the new shards being written beside the old ones).

Stability (docs/shards.md "Re-runs"): clips of sources that were not redone keep the identity
the last finalisation gave them, identities keep their split, and new clips and identities are
fitted around them (:mod:`emo_data.identity`). ``resplit=True`` recomputes both from scratch.
A finalisation whose inputs (staged sources, config, manifest metadata) are exactly those of the
last one rewrites nothing.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np

from .config import BuildConfig
from .fsio import update_json_atomic, write_json_atomic
from .identity import assign_identities, plan_split
from .manifest import ManifestRow, write_manifest
from .shards import (
    INDEX_SUFFIX,
    SAMPLE_META_VERSION,
    SCHEMA_VERSION,
    SampleMeta,
    ShardWriter,
    config_sha256,
    read_index,
    read_members,
)
from .staging import part_path, read_marker, read_staged, remove_parts, staging_dir
from .types import Source

SPLITS = ("train", "test")
GROUP_FIELDS = ("kind", "language")
SCRATCH_DIR = ".finalize.tmp"
STATE_FILE = "finalized.json"   # in staging/: which staged version of each source the shards hold
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-\d{6}\.(?:tar|index\.json|stats\.json)$")
# Manifest fields that finalisation refreshes from the current manifest (no restaging needed).
SOURCE_META_FIELDS = ("path", "kind", "language", "licence")


def shard_prefix(split: str, meta: SampleMeta, group_by: list[str]) -> str:
    """``train`` or, grouped, ``train-talk-en``: values are made name-safe (no dots or dashes)."""
    parts = [split]
    for name in group_by:
        if name not in GROUP_FIELDS:
            raise ValueError(f"cannot group shards by {name!r}: choose from {', '.join(GROUP_FIELDS)}")
        parts.append(re.sub(r"[^A-Za-z0-9_]+", "_", str(getattr(meta, name) or "unknown")) or "unknown")
    return "-".join(parts)


@dataclass
class CorpusSummary:
    sources: int = 0
    sources_failed: int = 0
    clips: int = 0
    hours_in: float = 0.0
    hours_kept: float = 0.0
    rejected_s_by_reason: dict[str, float] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    clips_by_split: dict[str, int] = field(default_factory=dict)
    identities_by_split: dict[str, int] = field(default_factory=dict)
    seconds_by_split: dict[str, float] = field(default_factory=dict)
    split_notes: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    processed_sources: int = 0     # sources staged by this run
    processed_s: float = 0.0       # their footage
    wall_s: float = 0.0            # this run's wall time (0 when it did no work)
    unchanged: bool = False        # nothing to do: the outputs were left as they were

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CorpusSummary":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def format(self) -> str:
        lines = [
            f"sources   {self.sources} ({self.sources_failed} failed)",
            f"footage   {self.hours_in * 3600:.1f} s in, {self.hours_kept * 3600:.1f} s kept in {self.clips} clips",
        ]
        if self.clips_by_split:
            total = sum(self.seconds_by_split.values()) or 1.0
            lines.append("splits    " + ", ".join(
                f"{k} {v} clips / {self.identities_by_split.get(k, 0)} identities / {100 * self.seconds_by_split.get(k, 0.0) / total:.1f} % of kept footage"
                for k, v in sorted(self.clips_by_split.items())))
        for note in self.split_notes:
            lines.append(f"split     {note}")
        if self.rejected_s_by_reason:
            lines.append("rejected  " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.rejected_s_by_reason.items(), key=lambda kv: -kv[1])))
        if self.failures_by_reason:
            lines.append("failed    " + ", ".join(f"{k} x{v}" for k, v in sorted(self.failures_by_reason.items())))
        if self.processed_s > 0 and self.wall_s > 0:
            lines.append(f"speed     {self.processed_s / self.wall_s:.2f} s of footage per wall second "
                         f"({self.processed_sources} sources, {self.processed_s:.1f} s of footage in {self.wall_s:.1f} s)")
        if self.unchanged:
            lines.append("outputs   unchanged: every source was already staged and finalised with this config")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ samples
def final_shard_paths(out_dir: str) -> list[str]:
    """The corpus shards in ``out_dir`` (``<prefix>-NNNNNN.tar``)."""
    return sorted(p for p in glob.glob(os.path.join(glob.escape(out_dir), "*.tar")) if _SHARD_RE.match(os.path.basename(p)))


class SampleStore:
    """Where each sample's bytes are: the staged part of its source if there is one, else the
    final shards (read through their index: only the sample's own byte ranges are read)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._final: Optional[dict[str, tuple[str, dict[str, Any]]]] = None
        self._indexes: dict[str, dict[str, Any]] = {}

    def final_index(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """key -> (shard path, index entry) over the current final shards."""
        if self._final is None:
            self._final = {}
            for shard in final_shard_paths(self.out_dir):
                index = read_index(shard) or {}
                self._indexes[shard] = index
                for entry in index.get("samples", []):
                    self._final[entry["key"]] = (shard, entry)
        return self._final

    def locate(self, source_id: str, key: str) -> Optional[tuple[str, dict[str, Any]]]:
        part = part_path(self.out_dir, source_id, key)
        if os.path.exists(part):
            index = read_index(part)
            if index and len(index["samples"]) == 1 and index["samples"][0]["key"] == key:
                self._indexes[part] = index
                return part, index["samples"][0]
            raise ValueError(f"{part}: a staged part must hold exactly one indexed sample, {key}")
        return self.final_index().get(key)

    def build_config(self, path: str, entry: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The stored build config a located sample was made with (see SampleMeta.build_config)."""
        return SampleMeta.from_dict(entry.get("meta") or {}).build_config(self._indexes.get(path))

    def read(self, source_id: str, key: str) -> dict[str, bytes]:
        found = self.locate(source_id, key)
        if found is None:
            raise FileNotFoundError(f"sample {key} of source {source_id} is neither staged nor in the final shards of {self.out_dir}")
        path, entry = found
        raw = read_members(path, entry)
        return {k: v for k, v in raw.items() if not k.startswith("__")}


# ------------------------------------------------------------------------------------ state
def _state_path(out_dir: str) -> str:
    return os.path.join(staging_dir(out_dir), STATE_FILE)


def read_state(out_dir: str) -> dict[str, Any]:
    """What the last finalisation used: ``{"sources": {source_id: marker digest}}``."""
    try:
        with open(_state_path(out_dir)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def read_build_json(out_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(out_dir, "build.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def split_config_changes(out_dir: str, config: BuildConfig) -> list[str]:
    """Keys of the identity config (threshold, test fraction, seed) that differ from the last
    finalisation of ``out_dir``: applying them would move existing samples between identities or
    splits, which only ``--resplit`` may do."""
    previous = read_build_json(out_dir)
    before = (previous.get("config") or {}).get("identity")
    if not before or not (previous.get("summary") or {}).get("clips"):
        return []  # nothing was split yet: nothing could move
    now = config.identity.to_dict()
    return [f"identity.{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if before.get(k) != now.get(k)]


def check_resplit(out_dir: str, config: BuildConfig, resplit: bool) -> None:
    changes = split_config_changes(out_dir, config)
    if changes and not resplit:
        raise ValueError(
            f"{out_dir} was split with other identity settings ({'; '.join(changes)}); applying them would move "
            "existing samples between identities or splits. Pass --resplit to recompute identities and splits, "
            "or drop the changed flags")


def _marker_digest(out_dir: str, source_id: str) -> str:
    marker = read_marker(out_dir, source_id) or {}
    return marker.get("digest") or hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]


def _source_meta(source: Union[Source, str]) -> Optional[dict[str, Any]]:
    if isinstance(source, str):
        return None
    return {"path": source.path, "kind": source.kind, "language": source.language, "licence": source.licence,
            "identity": source.identity}


# ------------------------------------------------------------------------------------ swap
def _finish_swap(out_dir: str, scratch: str) -> None:
    """Move a complete set of new outputs from ``scratch`` over the old ones, then drop old shard
    files that the new set does not have. Safe to repeat after a crash at any point."""
    with open(os.path.join(scratch, ".complete")) as fh:
        names = json.load(fh)["files"]
    for name in names:
        src = os.path.join(scratch, name)
        if os.path.exists(src):
            os.replace(src, os.path.join(out_dir, name))
    keep = set(names)
    for name in os.listdir(out_dir):
        if _SHARD_RE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    shutil.rmtree(scratch, ignore_errors=True)


def recover_interrupted(out_dir: str) -> bool:
    """Finish a swap a crash interrupted, or drop a half-written scratch folder. True if it found one."""
    scratch = os.path.join(out_dir, SCRATCH_DIR)
    if not os.path.isdir(scratch):
        return False
    if os.path.exists(os.path.join(scratch, ".complete")):
        _finish_swap(out_dir, scratch)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return True


# ------------------------------------------------------------------------------------ finalise
def _shard_stats(metas: list[SampleMeta]) -> dict[str, Any]:
    seconds = [m.num_frames / m.fps for m in metas]
    return {
        "num_samples": len(metas),
        "hours": sum(seconds) / 3600.0,
        "by_kind": dict(sorted(Counter(m.kind for m in metas).items())),
        "by_language": dict(sorted(Counter(m.language for m in metas).items())),
        "identities": len({m.identity for m in metas}),
        "clip_seconds_mean": float(np.mean(seconds)) if seconds else 0.0,
        "head_speed_mean": float(np.mean([m.head_speed_mean or 0.0 for m in metas])) if metas else 0.0,
    }


def _write_json(path: str, payload: Any, indent: Optional[int] = 1) -> None:
    write_json_atomic(path, payload, indent=indent, sort_keys=True, newline=True)


def note_executor(out_dir: str, info: dict[str, Any]) -> None:
    """Record how a build ran (executor, plan, rounds, timeline) in its build.json, atomically."""
    update_json_atomic(os.path.join(out_dir, "build.json"), "executor", info)


def finalize_corpus(
    out_dir: str,
    sources: Iterable[Union[Source, str]],
    config: BuildConfig,
    wall_s: float = 0.0,
    processed: Optional[Iterable[str]] = None,
    resplit: bool = False,
) -> CorpusSummary:
    """Identity clusters, splits, final shards, manifest.parquet and build.json from the staged
    ``sources`` (Source objects: their manifest metadata is applied; bare ids: the staged one is
    kept). ``processed``: ids staged by this run (for the speed line); ``resplit``: recompute
    identities and splits instead of keeping the earlier ones."""
    cfg = config
    sources = list(sources)
    source_ids = [s if isinstance(s, str) else s.source_id for s in sources]
    processed_ids = set(processed or [])
    recovered = recover_interrupted(out_dir)
    digests = {sid: _marker_digest(out_dir, sid) for sid in source_ids}
    metas = {sid: _source_meta(s) for sid, s in zip(source_ids, sources)}
    finalize_digest = hashlib.sha256(json.dumps(
        {"config": cfg.to_dict(), "schema": SCHEMA_VERSION, "meta_version": SAMPLE_META_VERSION, "resplit": resplit,
         "sources": [[sid, digests[sid], metas[sid]] for sid in sorted(source_ids)]},
        sort_keys=True, default=str).encode()).hexdigest()

    previous_build = read_build_json(out_dir)
    if (not resplit and not recovered and previous_build.get("finalize_digest") == finalize_digest
            and os.path.exists(os.path.join(out_dir, "manifest.parquet"))
            and all(os.path.exists(os.path.join(out_dir, n)) for n in previous_build.get("summary", {}).get("shards", []))):
        remove_parts(out_dir, source_ids)  # a finalisation that stopped before its clean-up
        summary = CorpusSummary.from_dict(previous_build["summary"])
        summary.wall_s, summary.processed_sources, summary.processed_s, summary.unchanged = 0.0, 0, 0.0, True
        return summary

    rows: list[dict[str, Any]] = []
    durations_in: dict[str, float] = {}
    for sid in sorted(source_ids):
        staged = read_staged(out_dir, sid)
        durations_in[sid] = float(staged["summary"].get("duration_s", 0.0))
        for r in staged["rows"]:
            if metas[sid] is not None:
                r.update({k: metas[sid][k] for k in SOURCE_META_FIELDS})
                if r["status"] == "clip":
                    r["identity"] = metas[sid]["identity"]
            rows.append(r)
    clip_rows = [r for r in rows if r["status"] == "clip"]

    # Earlier assignments: kept for clips of sources whose staged version is the one the last
    # finalisation used; identities keep their split.
    previous_identity: dict[str, str] = {}
    previous_split: dict[str, str] = {}
    manifest_path = os.path.join(out_dir, "manifest.parquet")
    if not resplit and os.path.exists(manifest_path):
        import pandas as pd

        state = read_state(out_dir).get("sources", {})
        before = pd.read_parquet(manifest_path, columns=["status", "source_id", "key", "identity", "split"])
        before = before[before.status == "clip"]
        for r in before.itertuples():
            if r.identity and state.get(r.source_id) == digests.get(r.source_id):
                previous_identity[r.key] = r.identity
            if r.identity and r.split:
                previous_split[r.identity] = r.split

    identity_of = assign_identities(
        keys=[r["key"] for r in clip_rows],
        source_ids=[r["source_id"] for r in clip_rows],
        embeddings=[np.asarray(r["identity_embedding"], np.float32) if r.get("identity_embedding") else None for r in clip_rows],
        given=[r.get("identity") for r in clip_rows],
        threshold=cfg.identity.distance_threshold,
        previous=previous_identity,
    )
    durations: dict[str, float] = defaultdict(float)
    for r in clip_rows:
        durations[identity_of[r["key"]]] += r["duration_s"]
    split_of, split_report = plan_split(dict(durations), cfg.identity.test_fraction, cfg.identity.seed,
                                        previous=previous_split)

    # Write the final shards into a scratch folder, then swap them in (see _finish_swap), so a
    # crash here never leaves a mix of old and new shards or loses a sample.
    scratch = os.path.join(out_dir, SCRATCH_DIR)
    os.makedirs(scratch)
    store = SampleStore(out_dir)
    stored_config = cfg.to_stored()
    config_ref = config_sha256(stored_config)
    writers: dict[str, ShardWriter] = {}
    shard_metas: dict[str, list[SampleMeta]] = defaultdict(list)
    shard_of: dict[str, str] = {}
    clip_keys: dict[str, list[str]] = defaultdict(list)
    for r in clip_rows:
        clip_keys[r["source_id"]].append(r["key"])
    try:
        for source_id in sorted(source_ids):
            for key in sorted(clip_keys.get(source_id, [])):
                members = store.read(source_id, key)
                identity = identity_of[key]
                split = split_of.get(identity, "train")
                meta = SampleMeta.from_json(members["json"])
                if metas[source_id] is not None:
                    m = metas[source_id]
                    meta.source_path, meta.kind, meta.language, meta.licence = m["path"], m["kind"], m["language"], m["licence"]
                meta.identity, meta.split = identity, split
                # the config is stored once per shard; a sample written with it inline (older
                # code) gets the reference too
                meta.config, meta.config_sha256 = None, config_ref
                members["json"] = meta.to_json()
                prefix = shard_prefix(split, meta, list(cfg.shards.group_by))
                if prefix not in writers:
                    writers[prefix] = ShardWriter(scratch, prefix, cfg.shards.max_samples, cfg.shards.max_bytes,
                                                  extra_index={"configs": {config_ref: stored_config}})
                writer = writers[prefix]
                writer.write(key, members, meta)
                shard = os.path.basename(writer.current_path)
                shard_of[key] = shard
                shard_metas[shard].append(meta)
        written = []
        for prefix in sorted(writers):
            written.extend(writers[prefix].close())
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    names = []
    for path in written:
        name = os.path.basename(path)
        stats_name = name[: -len(".tar")] + ".stats.json"
        _write_json(os.path.join(scratch, stats_name), _shard_stats(shard_metas[name]))
        names += [name, name[: -len(".tar")] + INDEX_SUFFIX, stats_name]
    _write_json(os.path.join(scratch, ".complete"), {"files": sorted(names)})
    _finish_swap(out_dir, scratch)

    manifest_rows = []
    fields = set(ManifestRow.__dataclass_fields__)
    for r in rows:
        row = {k: v for k, v in r.items() if k in fields}
        if r["status"] == "clip":
            row["identity"] = identity_of[r["key"]]
            row["split"] = split_of.get(row["identity"], "train")
            row["shard"] = shard_of.get(r["key"])
        manifest_rows.append(row)
    write_manifest(manifest_rows, manifest_path)

    summary = CorpusSummary(sources=len(source_ids), wall_s=wall_s)
    summary.hours_in = sum(durations_in.values()) / 3600.0
    summary.processed_sources = len(processed_ids & set(source_ids))
    summary.processed_s = sum(durations_in[s] for s in processed_ids if s in durations_in)
    for r in rows:
        if r["status"] == "clip":
            summary.clips += 1
            summary.hours_kept += r["duration_s"] / 3600.0
        elif r["status"] == "rejected":
            summary.rejected_s_by_reason[r["reason"]] = summary.rejected_s_by_reason.get(r["reason"], 0.0) + r["duration_s"]
        elif r["status"] == "failed":
            summary.sources_failed += 1
            summary.failures_by_reason[r["reason"]] = summary.failures_by_reason.get(r["reason"], 0) + 1
    for r in manifest_rows:
        if r["status"] == "clip":
            summary.clips_by_split[r["split"]] = summary.clips_by_split.get(r["split"], 0) + 1
            summary.seconds_by_split[r["split"]] = summary.seconds_by_split.get(r["split"], 0.0) + r["duration_s"]
    for split in SPLITS:
        n = len({identity_of[r["key"]] for r in clip_rows if split_of.get(identity_of[r["key"]]) == split})
        if n:
            summary.identities_by_split[split] = n
    summary.split_notes = list(split_report.notes)
    summary.shards = sorted(os.path.basename(p) for p in written)
    stored = summary.to_dict()
    for volatile in ("wall_s", "processed_sources", "processed_s", "unchanged"):
        stored.pop(volatile)  # build.json describes the corpus; the same corpus gives the same bytes
    _write_json(os.path.join(out_dir, "build.json"), {
        "summary": stored, "config": stored_config, "config_sha256": config_ref, "sources": len(source_ids),
        "split": asdict(split_report),
        "finalize_digest": finalize_digest,
    })
    _write_json(_state_path(out_dir), {"sources": {sid: digests[sid] for sid in sorted(source_ids)}}, indent=None)
    remove_parts(out_dir, source_ids)
    return summary


def final_shards(out_dir: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(out_dir, "*.tar")) if not p.endswith(INDEX_SUFFIX))
