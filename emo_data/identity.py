"""Identity clusters from per-clip face embeddings, and identity-disjoint splits."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np


def cluster_embeddings(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Leader clustering: each embedding joins the nearest centroid closer than ``threshold``
    (Euclidean), else starts a cluster. Input order decides ties, so sort the input for
    determinism. O(N x clusters), which scales to a large corpus where pairwise linkage would not.
    """
    labels = np.full(len(embeddings), -1, dtype=np.int64)
    sums: list[np.ndarray] = []
    counts: list[int] = []
    centroids = np.zeros((0, embeddings.shape[1] if embeddings.ndim == 2 else 0), np.float64)
    for i, emb in enumerate(np.asarray(embeddings, np.float64)):
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


def assign_identities(
    keys: list[str],
    source_ids: list[str],
    embeddings: list[Optional[np.ndarray]],
    given: list[Optional[str]],
    threshold: float,
) -> dict[str, str]:
    """key -> identity id. A manifest-given identity wins; clips without an embedding get one
    identity per source; the rest are clustered across the whole corpus."""
    out: dict[str, str] = {}
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    todo = []
    for i in order:
        if given[i]:
            out[keys[i]] = f"given:{given[i]}"
        elif embeddings[i] is None or len(embeddings[i]) == 0:
            out[keys[i]] = f"source:{source_ids[i]}"
        else:
            todo.append(i)
    if todo:
        dims = {len(embeddings[i]) for i in todo}
        for dim in sorted(dims):
            group = [i for i in todo if len(embeddings[i]) == dim]
            labels = cluster_embeddings(np.stack([embeddings[i] for i in group]), threshold)
            for i, label in zip(group, labels):
                out[keys[i]] = f"id{dim}-{int(label):05d}"
    return out


def split_identities(durations: dict[str, float], test_fraction: float, seed: int) -> dict[str, str]:
    """identity -> 'train' | 'test', identity-disjoint, deterministic for ``seed``.

    Identities are shuffled with the seed and moved to test until it holds ``test_fraction`` of
    the footage (at least one identity when there are two or more and the fraction is > 0).
    """
    identities = sorted(durations)
    rng = random.Random(seed)
    rng.shuffle(identities)
    total = sum(durations.values()) or 1.0
    split = {identity: "train" for identity in identities}
    if test_fraction <= 0 or len(identities) < 2:
        return split
    held = 0.0
    for identity in identities:
        if held / total >= test_fraction:
            break
        if held > 0 and (held + durations[identity]) / total > test_fraction * 1.5:
            continue  # would overshoot by far: try a smaller identity
        split[identity] = "test"
        held += durations[identity]
    if all(v == "test" for v in split.values()):
        split[identities[-1]] = "train"
    return split
