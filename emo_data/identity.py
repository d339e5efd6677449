"""Identity clusters from per-clip face embeddings, and identity-disjoint splits.

Both are *stable*: given the assignments of an earlier finalisation (``previous``), clips that
were already in the corpus keep their identity and identities keep their split when sources are
added; only new clips are clustered (joining an existing identity when they match it) and only
new identities are given a split. ``--resplit`` (no ``previous``) recomputes everything.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# The test share by footage lands in [1 - SPLIT_TOLERANCE, 1 + SPLIT_TOLERANCE] x test_fraction
# when identities are small enough for that; it never exceeds the upper bound.
SPLIT_TOLERANCE = 0.25


def cluster_embeddings(embeddings: np.ndarray, threshold: float, seeds: Optional[np.ndarray] = None,
                       seed_counts: Optional[list[int]] = None) -> np.ndarray:
    """Leader clustering: each embedding joins the nearest centroid closer than ``threshold``
    (Euclidean), else starts a cluster. Input order decides ties, so sort the input for
    determinism. O(N x clusters), which scales to a large corpus where pairwise linkage would not.

    ``seeds`` ([K, E] centroids of existing clusters, with ``seed_counts`` members each) are
    clusters 0..K-1 before the first embedding: new embeddings join them when close enough.
    """
    embeddings = np.asarray(embeddings, np.float64)
    dim = embeddings.shape[1] if embeddings.ndim == 2 else 0
    labels = np.full(len(embeddings), -1, dtype=np.int64)
    sums: list[np.ndarray] = []
    counts: list[int] = []
    centroids = np.zeros((0, dim), np.float64)
    if seeds is not None and len(seeds):
        seeds = np.asarray(seeds, np.float64)
        seed_counts = list(seed_counts or [1] * len(seeds))
        sums = [c * n for c, n in zip(seeds, seed_counts)]
        counts = list(seed_counts)
        centroids = seeds.copy()
    for i, emb in enumerate(embeddings):
        if len(counts):
            dist = np.linalg.norm(centroids - emb, axis=1)
            best = int(np.argmin(dist))
            if dist[best] < threshold:
                labels[i] = best
                sums[best] += emb
                counts[best] += 1
                centroids[best] = sums[best] / counts[best]
                continue
        labels[i] = len(counts)
        sums.append(emb.copy())
        counts.append(1)
        centroids = np.vstack([centroids, emb[None]])
    return labels


def _cluster_name(dim: int, number: int) -> str:
    return f"id{dim}-{number:05d}"


def assign_identities(
    keys: list[str],
    source_ids: list[str],
    embeddings: list[Optional[np.ndarray]],
    given: list[Optional[str]],
    threshold: float,
    previous: Optional[dict[str, str]] = None,
) -> dict[str, str]:
    """key -> identity id. A manifest-given identity wins; clips without an embedding get one
    identity per source; the rest are clustered across the whole corpus.

    ``previous`` (key -> identity from an earlier finalisation, for clips whose source was not
    redone since) is kept as it is; the other clips join the nearest of those identities when
    closer than ``threshold`` to its centroid, else form new identities numbered after the
    highest existing one.
    """
    previous = previous or {}
    out: dict[str, str] = {}
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    todo: list[int] = []
    kept: list[int] = []
    for i in order:
        emb = embeddings[i]
        if given[i]:
            out[keys[i]] = f"given:{given[i]}"
        elif emb is None or len(emb) == 0:
            out[keys[i]] = f"source:{source_ids[i]}"
        elif previous.get(keys[i], "").startswith(f"id{len(emb)}-"):
            out[keys[i]] = previous[keys[i]]
            kept.append(i)
        else:
            todo.append(i)
    for dim in sorted({len(embeddings[i]) for i in todo}):
        group = [i for i in todo if len(embeddings[i]) == dim]
        existing: dict[str, list[int]] = {}
        for i in kept:
            if len(embeddings[i]) == dim:
                existing.setdefault(out[keys[i]], []).append(i)
        names = sorted(existing)
        seeds = np.stack([np.mean([embeddings[i] for i in existing[n]], axis=0) for n in names]) if names else None
        numbers = [int(m.group(1)) for n in names if (m := re.match(rf"id{dim}-(\d+)$", n))]
        next_number = max(numbers) + 1 if numbers else 0
        labels = cluster_embeddings(np.stack([embeddings[i] for i in group]), threshold, seeds,
                                    [len(existing[n]) for n in names])
        for i, label in zip(group, labels):
            label = int(label)
            out[keys[i]] = names[label] if label < len(names) else _cluster_name(dim, next_number + label - len(names))
    return out


@dataclass
class SplitReport:
    """How the split came out, for the summary and build.json."""

    test_fraction: float
    tolerance: float = SPLIT_TOLERANCE
    test_share: float = 0.0                 # share of the footage in test
    test_seconds: float = 0.0
    total_seconds: float = 0.0
    kept: int = 0                           # identities whose split came from an earlier build
    too_large: list[str] = field(default_factory=list)  # identities larger than the whole test share
    notes: list[str] = field(default_factory=list)


def _rank(seed: int, identity: str) -> str:
    return hashlib.sha256(f"{seed}:{identity}".encode("utf-8")).hexdigest()


def plan_split(durations: dict[str, float], test_fraction: float, seed: int,
               previous: Optional[dict[str, str]] = None) -> tuple[dict[str, str], SplitReport]:
    """identity -> 'train' | 'test', identity-disjoint, by footage.

    Identities are taken in the order of a hash of (seed, identity), so an identity's place does
    not depend on which others exist. Each goes to test while the test footage is short of
    ``test_fraction`` of the total and it fits under ``(1 + SPLIT_TOLERANCE) x test_fraction``;
    an identity larger than that stays in train (the report names identities larger than the
    whole test share). Identities in ``previous`` keep their split; new ones fill the gap.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction {test_fraction} must be in [0, 1)")
    previous = previous or {}
    total = float(sum(durations.values()))
    report = SplitReport(test_fraction=test_fraction, total_seconds=total)
    split: dict[str, str] = {}
    test_s = 0.0
    for identity in durations:
        if previous.get(identity) in ("train", "test"):
            split[identity] = previous[identity]
            report.kept += 1
            test_s += durations[identity] if split[identity] == "test" else 0.0
    target = test_fraction * total
    upper = (1.0 + SPLIT_TOLERANCE) * target
    for identity in sorted((i for i in durations if i not in split), key=lambda i: _rank(seed, i)):
        d = durations[identity]
        if test_fraction > 0 and test_s < target and test_s + d <= upper:
            split[identity] = "test"
            test_s += d
        else:
            split[identity] = "train"
    report.test_seconds = test_s
    report.test_share = test_s / total if total else 0.0
    if test_fraction > 0 and total:
        report.too_large = sorted(i for i, d in durations.items() if d > target and split[i] == "train")
        if report.too_large:
            report.notes.append(
                f"{len(report.too_large)} identit{'y holds' if len(report.too_large) == 1 else 'ies each hold'} more footage "
                f"than the whole test share ({test_fraction:.0%} = {target:.1f} s) and stay{'s' if len(report.too_large) == 1 else ''} in train")
        low, high = (1.0 - SPLIT_TOLERANCE) * test_fraction, (1.0 + SPLIT_TOLERANCE) * test_fraction
        if not low - 1e-9 <= report.test_share <= high + 1e-9:
            why = ("splits kept from the earlier build; --resplit rebalances" if report.kept
                   else "the identities are too large to get closer")
            report.notes.append(f"test share {report.test_share:.1%} of the footage is outside "
                                f"{low:.1%}..{high:.1%} ({why})")
    return split, report


def split_identities(durations: dict[str, float], test_fraction: float, seed: int,
                     previous: Optional[dict[str, str]] = None) -> dict[str, str]:
    """identity -> 'train' | 'test' (see :func:`plan_split`)."""
    return plan_split(durations, test_fraction, seed, previous)[0]
