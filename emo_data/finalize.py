"""Corpus finalisation: identity clusters -> identity-disjoint splits -> final shards + manifest.

Runs after every source is staged. It only copies member bytes out of the staging tars
(nothing is decoded again), rewriting each sample's ``json`` with its identity and split, so it
is cheap and idempotent: running it twice gives the same shards.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BuildConfig
from .identity import assign_identities, split_identities
from .manifest import ManifestRow, write_manifest
from .schema import INDEX_SUFFIX, ShardWriter, read_index
from .staging import read_staged, staged_parts

SPLITS = ("train", "test")
GROUP_FIELDS = ("kind", "language")


def shard_prefix(split: str, meta: dict[str, Any], group_by: list[str]) -> str:
    """``train`` or, grouped, ``train-talk-en``: values are made name-safe (no dots or dashes)."""
    parts = [split]
    for name in group_by:
        if name not in GROUP_FIELDS:
            raise ValueError(f"cannot group shards by {name!r}: choose from {', '.join(GROUP_FIELDS)}")
        parts.append(re.sub(r"[^A-Za-z0-9_]+", "_", str(meta.get(name) or "unknown")) or "unknown")
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
    shards: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def format(self) -> str:
        lines = [
            f"sources   {self.sources} ({self.sources_failed} failed)",
            f"footage   {self.hours_in * 3600:.1f} s in, {self.hours_kept * 3600:.1f} s kept in {self.clips} clips",
        ]
        if self.clips_by_split:
            lines.append("splits    " + ", ".join(f"{k} {v} clips / {self.identities_by_split.get(k, 0)} identities" for k, v in sorted(self.clips_by_split.items())))
        if self.rejected_s_by_reason:
            lines.append("rejected  " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.rejected_s_by_reason.items(), key=lambda kv: -kv[1])))
        if self.failures_by_reason:
            lines.append("failed    " + ", ".join(f"{k} x{v}" for k, v in sorted(self.failures_by_reason.items())))
        if self.wall_s:
            lines.append(f"speed     {self.hours_in * 3600 / self.wall_s:.2f} s of footage per wall second ({self.wall_s:.1f} s)")
        return "\n".join(lines)


def _copy_sample(staged_tar: str, entry: dict[str, Any]) -> dict[str, bytes]:
    members = {}
    with open(staged_tar, "rb") as fh:
        for member, loc in sorted(entry["members"].items(), key=lambda kv: kv[1]["offset"]):
            fh.seek(loc["offset"])
            members[member] = fh.read(loc["size"])
    return members


def _shard_stats(metas: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [m["num_frames"] / m["fps"] for m in metas]
    return {
        "num_samples": len(metas),
        "hours": sum(seconds) / 3600.0,
        "by_kind": dict(Counter(m.get("kind") for m in metas)),
        "by_language": dict(Counter(m.get("language") for m in metas)),
        "identities": len({m.get("identity") for m in metas}),
        "clip_seconds_mean": float(np.mean(seconds)) if seconds else 0.0,
        "head_speed_mean": float(np.mean([m.get("head_speed_mean", 0.0) for m in metas])) if metas else 0.0,
    }


def finalize_corpus(out_dir: str, source_ids: list[str], config: BuildConfig, wall_s: float = 0.0) -> CorpusSummary:
    cfg = config
    rows: list[dict[str, Any]] = []
    for source_id in source_ids:
        rows.extend(read_staged(out_dir, source_id)["rows"])

    clip_rows = [r for r in rows if r["status"] == "clip"]
    identity_of = assign_identities(
        keys=[r["key"] for r in clip_rows],
        source_ids=[r["source_id"] for r in clip_rows],
        embeddings=[np.asarray(r["identity_embedding"], np.float32) if r.get("identity_embedding") else None for r in clip_rows],
        given=[r.get("identity") for r in clip_rows],
        threshold=cfg.identity.distance_threshold,
    )
    durations: dict[str, float] = defaultdict(float)
    for r in clip_rows:
        durations[identity_of[r["key"]]] += r["duration_s"]
    split_of = split_identities(dict(durations), cfg.identity.test_fraction, cfg.identity.seed)

    # Write the final shards into a scratch folder, then swap them in, so a crash here never
    # leaves a mix of old and new shards.
    scratch = os.path.join(out_dir, ".finalize.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    writers: dict[str, ShardWriter] = {}
    shard_metas: dict[str, list[dict[str, Any]]] = defaultdict(list)
    shard_of: dict[str, str] = {}
    clip_keys: dict[str, list[str]] = defaultdict(list)
    for r in clip_rows:
        clip_keys[r["source_id"]].append(r["key"])
    for source_id in sorted(source_ids):
        keys = sorted(clip_keys.get(source_id, []))
        for staged_tar in staged_parts(out_dir, source_id, keys):
            index = read_index(staged_tar)
            if not index or len(index["samples"]) != 1:
                raise ValueError(f"{staged_tar}: a staged part must hold exactly one indexed sample")
            entry = index["samples"][0]
            key = entry["key"]
            identity = identity_of.get(key, f"source:{source_id}")
            split = split_of.get(identity, "train")
            members = _copy_sample(staged_tar, entry)
            meta = json.loads(members["json"].decode("utf-8"))
            meta["identity"], meta["split"] = identity, split
            members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
            prefix = shard_prefix(split, meta, list(cfg.shards.group_by))
            if prefix not in writers:
                writers[prefix] = ShardWriter(scratch, prefix, cfg.shards.max_samples, cfg.shards.max_bytes,
                                              extra_index={"config": cfg.to_dict()})
            writer = writers[prefix]
            writer.write(key, members, meta)
            shard = os.path.basename(writer._current.path)  # noqa: SLF001 - the shard this sample lands in
            shard_of[key] = shard
            shard_metas[shard].append(meta)
    written = []
    for prefix in sorted(writers):
        written.extend(writers[prefix].close())
    for path in written:
        name = os.path.basename(path)
        stats = _shard_stats(shard_metas[name])
        with open(path[: -len(".tar")] + ".stats.json", "w") as fh:
            json.dump(stats, fh, indent=1)
    for old in glob.glob(os.path.join(out_dir, "*-[0-9][0-9][0-9][0-9][0-9][0-9].*")):
        os.remove(old)
    for path in sorted(glob.glob(os.path.join(scratch, "*"))):
        os.replace(path, os.path.join(out_dir, os.path.basename(path)))
    shutil.rmtree(scratch, ignore_errors=True)

    manifest_rows = []
    fields = set(ManifestRow.__dataclass_fields__)
    for r in rows:
        row = {k: v for k, v in r.items() if k in fields}
        if r["status"] == "clip":
            row["identity"] = identity_of[r["key"]]
            row["split"] = split_of.get(row["identity"], "train")
            row["shard"] = shard_of.get(r["key"])
        manifest_rows.append(row)
    write_manifest(manifest_rows, os.path.join(out_dir, "manifest.parquet"))

    summary = CorpusSummary(sources=len(source_ids), wall_s=wall_s)
    for source_id in source_ids:
        staged = read_staged(out_dir, source_id)["summary"]
        summary.hours_in += staged.get("duration_s", 0.0) / 3600.0
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
    for split in SPLITS:
        n = len({identity_of[r["key"]] for r in clip_rows if split_of.get(identity_of[r["key"]]) == split})
        if n:
            summary.identities_by_split[split] = n
    summary.shards = sorted(os.path.basename(p) for p in written)
    with open(os.path.join(out_dir, "build.json"), "w") as fh:
        json.dump({"summary": summary.to_dict(), "config": cfg.to_dict(), "sources": len(source_ids)}, fh, indent=1)
    return summary


def final_shards(out_dir: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(out_dir, "*.tar")) if not p.endswith(INDEX_SUFFIX))
