"""Which sources a build must (re)do, and why: the config-aware resume of both executors.

A source is skipped only when everything that shaped its staged result is unchanged: its input
file (size, mtime), the manifest fields that shape samples (``audio_stream``), the package and
schema versions, and the config fields that shape samples (:func:`emo_data.staging.staged_config`).
For the config, the reference is what the samples hold now: the staged parts' config while they
exist, else the config each sample in the final shards references (its ``config_sha256`` in its
shard index, or the config inline in samples written before references), so shards rewritten by
``add-features`` or ``fit-buckets --apply`` count as built with the config they now carry.
A sealed source whose samples are gone (shards deleted by hand) is redone too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .config import BuildConfig
from .finalize import SampleStore
from .staging import fingerprint_changes, parts_dir, read_marker, read_staged, source_fingerprint, staged_config
from .types import Source

# Failures that say nothing about the input (a worker process died, the build stalled): a re-run
# tries those sources again. Failures of the file itself (unreadable, no audio...) stay sealed
# until the file or the config changes.
TRANSIENT_FAILURES = ("worker_crash", "stalled")


@dataclass
class ResumePlan:
    todo: list[Source] = field(default_factory=list)        # to stage now (new, unfinished or changed)
    skipped: list[Source] = field(default_factory=list)     # sealed and unchanged
    redo: dict[str, list[str]] = field(default_factory=dict)  # sealed but changed: source_id -> what changed
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # source_id -> fingerprint to seal with

    def describe(self, limit: int = 3) -> list[str]:
        """One line per changed source (at most ``limit``, then a count), for the build output."""
        lines = []
        for source_id in sorted(self.redo)[:limit]:
            changes = self.redo[source_id]
            more = f" (+{len(changes) - 2} more)" if len(changes) > 2 else ""
            lines.append(f"{source_id}: {'; '.join(changes[:2])}{more}")
        if len(self.redo) > limit:
            lines.append(f"... and {len(self.redo) - limit} more sources")
        return lines


def _config_reference(out_dir: str, source: Source, marker: dict[str, Any],
                      store: SampleStore) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The staged config the source's samples carry now, and problems (missing samples)."""
    stored_config = (marker.get("fingerprint") or {}).get("config")
    if marker.get("status") != "ok":
        return stored_config, []
    keys = [r["key"] for r in read_staged(out_dir, source.source_id)["rows"] if r.get("status") == "clip"]
    in_shards = []
    for key in keys:
        found = store.locate(source.source_id, key)
        if found is None:
            return stored_config, [f"sample {key} is neither staged nor in the final shards"]
        path, entry = found
        if os.path.dirname(path) == parts_dir(out_dir, source.source_id):
            return stored_config, []  # staged since the last finalisation: made with the marker's config
        in_shards.append(staged_config(store.build_config(path, entry) or {}))
    if in_shards and any(c != in_shards[0] for c in in_shards):
        return stored_config, ["its samples in the final shards carry different configs"]
    return (in_shards[0] if in_shards else stored_config), []


def _transient_failure(out_dir: str, source_id: str, marker: dict[str, Any]) -> Optional[str]:
    if marker.get("status") == "ok":
        return None
    try:
        rows = read_staged(out_dir, source_id)["rows"]
    except (OSError, ValueError, KeyError):
        return None
    reasons = {r.get("reason") for r in rows if r.get("status") == "failed"}
    return next((r for r in TRANSIENT_FAILURES if r in reasons), None)


def plan_resume(out_dir: str, sources: list[Source], config: BuildConfig) -> ResumePlan:
    plan = ResumePlan()
    config_dict = config.to_dict()
    store = SampleStore(out_dir)
    for source in sources:
        current = source_fingerprint(source, config_dict)
        plan.fingerprints[source.source_id] = current
        marker = read_marker(out_dir, source.source_id)
        if marker is None:
            plan.todo.append(source)
            continue
        transient = _transient_failure(out_dir, source.source_id, marker)
        if transient:
            plan.todo.append(source)
            plan.redo[source.source_id] = [f"the last attempt failed with {transient} (not the file's fault): retried"]
            continue
        stored = marker.get("fingerprint")
        if not stored:
            changes = fingerprint_changes(None, current)
        else:
            reference, problems = _config_reference(out_dir, source, marker, store)
            changes = problems + fingerprint_changes(dict(stored, config=reference), current)
        if changes:
            plan.todo.append(source)
            plan.redo[source.source_id] = changes
        else:
            plan.skipped.append(source)
    return plan
