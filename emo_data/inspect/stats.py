"""Corpus statistics from shard indices (``emo-shards stats``) and their PNG report."""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..shards import SampleMeta, is_url, load_index, load_npy, read_members


@dataclass
class SampleRecord:
    shard: str
    key: str
    split: str
    kind: str
    language: str
    identity: str
    duration_s: float
    fps: float
    face_src_px: Optional[float] = None   # face size in the source frame (crop side / crop_scale), meta
    face_crop_px: Optional[float] = None  # mean face-box side in the crop, from face_boxes.npy
    speed_mean: Optional[float] = None    # the clip's mean head speed (deg/frame), meta
    speeds: Optional[np.ndarray] = None   # per-frame head speed (deg/frame), from head_speed.npy
    centers: Optional[list[float]] = None
    gate: Optional[dict[str, Any]] = None  # the lip-sync / frozen-face gate's scores (meta["sync"])


@dataclass
class CorpusStats:
    shards: int = 0
    records: list[SampleRecord] = field(default_factory=list)
    shards_without_index: int = 0
    member_reads: int = 0           # samples whose face boxes / speeds were read from the tar
    rejections: Optional[dict[str, Any]] = None
    gate_rows: Optional[list[dict[str, Any]]] = None  # gate scores of every scored clip, kept or not (manifest)

    # ------------------------------------------------------------------ summaries
    @property
    def seconds(self) -> float:
        return float(sum(r.duration_s for r in self.records))

    def by(self, attr: str) -> list[tuple[str, int, float]]:
        count: Counter = Counter()
        secs: dict[str, float] = defaultdict(float)
        for r in self.records:
            value = getattr(r, attr)
            count[value] += 1
            secs[value] += r.duration_s
        return sorted(((k, count[k], secs[k] / 3600.0) for k in count), key=lambda t: (-t[2], t[0]))

    def lengths(self) -> np.ndarray:
        return np.array([r.duration_s for r in self.records], np.float64)

    def face_sizes(self) -> tuple[np.ndarray, str]:
        """Face sizes and what they measure: source-frame px from the metadata, else crop px."""
        src = [r.face_src_px for r in self.records if r.face_src_px is not None]
        if src:
            return np.array(src, np.float64), "face size in the source frame (crop side / crop_scale)"
        crop = [r.face_crop_px for r in self.records if r.face_crop_px is not None]
        return np.array(crop, np.float64), "mean face-box side in the crop"

    def frame_speeds(self) -> tuple[np.ndarray, str]:
        """Per-frame head speeds when read (``--frames``), else each clip's mean speed."""
        parts = [r.speeds for r in self.records if r.speeds is not None and r.speeds.size]
        if parts:
            return np.concatenate(parts).astype(np.float64), "per frame"
        means = [r.speed_mean for r in self.records if r.speed_mean is not None]
        return np.array(means, np.float64), "clip means"

    def centers(self) -> Optional[list[float]]:
        for r in self.records:
            if r.centers:
                return r.centers
        return None

    def bucket_counts(self) -> Optional[tuple[list[float], np.ndarray]]:
        centers = self.centers()
        speeds, _ = self.frame_speeds()
        if not centers or not speeds.size:
            return None
        c = np.asarray(centers, np.float64)
        nearest = np.abs(speeds[:, None] - c[None, :]).argmin(1)
        return list(centers), np.bincount(nearest, minlength=len(c))

    def gate_scores(self) -> list[dict[str, Any]]:
        """One dict per scored clip (backend, offset, confidence, decision, reason, shift, motion):
        from the build manifest when given (it also holds the clips the gate rejected), else from
        the kept samples' metadata."""
        if self.gate_rows is not None:
            return self.gate_rows
        out = []
        for r in self.records:
            g = r.gate or {}
            if g.get("backend"):
                out.append({"backend": g.get("backend"), "offset_frames": g.get("offset_frames"),
                            "confidence": g.get("confidence"), "decision": g.get("decision"), "reason": g.get("reason"),
                            "applied_offset_frames": g.get("applied_offset_frames"),
                            "mouth_motion_p90": g.get("mouth_motion_p90"), "kept": True})
        return out

    def to_dict(self) -> dict[str, Any]:
        def dist(a: np.ndarray) -> Optional[dict[str, float]]:
            if not a.size:
                return None
            q = np.percentile(a, [0, 10, 50, 90, 100])
            return {"n": int(a.size), "min": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
                    "p90": float(q[3]), "max": float(q[4]), "mean": float(a.mean())}

        buckets = self.bucket_counts()
        faces, face_what = self.face_sizes()
        speeds, speed_what = self.frame_speeds()
        return {
            "shards": self.shards,
            "samples": len(self.records),
            "seconds": self.seconds,
            "hours": self.seconds / 3600.0,
            "shards_without_index": self.shards_without_index,
            "samples_with_member_reads": self.member_reads,
            "by_split": [{"split": k, "samples": n, "hours": h} for k, n, h in self.by("split")],
            "by_kind": [{"kind": k, "samples": n, "hours": h} for k, n, h in self.by("kind")],
            "by_language": [{"language": k, "samples": n, "hours": h} for k, n, h in self.by("language")],
            "by_identity": [{"identity": k, "samples": n, "hours": h} for k, n, h in self.by("identity")],
            "clip_length_s": dist(self.lengths()),
            "face_size_px": dist(faces),
            "face_size_measure": face_what,
            "head_speed_deg_per_frame": dist(speeds),
            "head_speed_measure": speed_what,
            "speed_buckets": None if buckets is None else
            [{"center": c, "frames": int(n)} for c, n in zip(buckets[0], buckets[1])],
            "rejections": self.rejections,
            "sync_gate": gate_summary(self.gate_scores(), dist),
        }


def _values(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    vals = [r.get(key) for r in rows]
    return np.array([float(v) for v in vals if v is not None and np.isfinite(float(v))], np.float64)


def gate_summary(rows: list[dict[str, Any]], dist) -> Optional[dict[str, Any]]:
    if not rows:
        return None
    decisions = Counter(str(r.get("decision")) for r in rows)
    reasons = Counter(str(r.get("reason")) for r in rows if r.get("decision") == "reject")
    return {
        "clips_scored": len(rows),
        "backends": dict(Counter(str(r.get("backend")) for r in rows)),
        "offset_frames": dist(_values(rows, "offset_frames")),
        "offset_histogram": {int(k): int(v) for k, v in sorted(Counter(int(x) for x in _values(rows, "offset_frames")).items())},
        "confidence": dist(_values(rows, "confidence")),
        "mouth_motion_p90": dist(_values(rows, "mouth_motion_p90")),
        "decisions": dict(decisions),
        "reject_reasons": dict(reasons),
        "corrected": int(sum(1 for r in rows if (r.get("applied_offset_frames") or 0) != 0)),
    }


# ---------------------------------------------------------------------------- collection
def _split_from_name(url: str) -> str:
    """``train-000003.tar`` -> ``train``; anything else -> ``?``."""
    match = re.match(r"^(.+)-\d{6}\.tar$", url.rsplit("/", 1)[-1])
    return match.group(1) if match else "?"


def _meta_face_src(meta: SampleMeta, index: Optional[dict[str, Any]]) -> Optional[float]:
    """Face size in source pixels: the square crop (``crop_box``, source pixels) is the build
    config's ``clip.crop_scale`` x the long side of the union face box."""
    box = meta.crop_box
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        side = max(box[2] - box[0], box[3] - box[1])
        return float(side) / meta.crop_scale(index) if side > 0 else None
    return None


def _meta_speed_mean(meta: SampleMeta) -> Optional[float]:
    v = meta.head_speed_mean
    return float(v) if isinstance(v, (int, float)) else None


def _member_summary(url: str, entry: dict[str, Any]) -> tuple[Optional[float], Optional[np.ndarray]]:
    """Mean face-box side (px) and per-frame speeds from the sample's two small npy members."""
    wanted = [m for m in ("face_boxes.npy", "head_speed.npy") if m in entry["members"]]
    if not wanted:
        return None, None
    raw = read_members(url, entry, wanted)
    face, speeds = None, None
    try:
        if "face_boxes.npy" in raw:
            boxes = load_npy(raw["face_boxes.npy"]).astype(np.float64)
            if boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes):
                sides = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
                face = float(sides.mean())
        if "head_speed.npy" in raw:
            speeds = load_npy(raw["head_speed.npy"]).astype(np.float32).reshape(-1)
    except ValueError:
        pass
    return face, speeds


def collect(urls: list[str], read_frames: bool = False, threads: int = 8) -> CorpusStats:
    """Read every shard's index (tar header scan without one) into per-sample records.

    Only the sidecar indices are read, unless ``read_frames``: then each sample's
    ``face_boxes.npy`` and ``head_speed.npy`` are fetched with one byte-range read (a few KB) for
    per-frame face-size and head-speed distributions.
    """
    stats = CorpusStats(shards=len(urls))
    todo: list[tuple[SampleRecord, str, dict]] = []
    for url in urls:
        index = load_index(url)
        if index.get("from_tar_scan"):
            stats.shards_without_index += 1
        for entry in index["samples"]:
            meta = SampleMeta.from_dict(entry.get("meta") or {})
            rec = SampleRecord(
                shard=url,
                key=entry["key"],
                split=str(meta.split or _split_from_name(url)),
                kind=str(meta.kind or "unknown"),
                language=str(meta.language or "und"),
                identity=str(meta.identity or meta.source_id or "?"),
                duration_s=meta.duration_s,
                fps=float(meta.fps or 0.0),
                face_src_px=_meta_face_src(meta, index),
                speed_mean=_meta_speed_mean(meta),
                centers=meta.speed_centers or None,
                gate=meta.sync if isinstance(meta.sync, dict) else None,
            )
            stats.records.append(rec)
            if read_frames:
                todo.append((rec, url, entry))
    if todo:
        remote = any(is_url(u) for _, u, _ in todo)
        with ThreadPoolExecutor(max_workers=threads if remote else 2) as pool:
            results = list(pool.map(lambda t: _member_summary(t[1], t[2]), todo))
        for (rec, _, _), (face, speeds) in zip(todo, results):
            rec.face_crop_px = face
            rec.speeds = speeds
            if rec.speed_mean is None and speeds is not None and speeds.size:
                rec.speed_mean = float(speeds.mean())
        stats.member_reads = len(todo)
    return stats


def load_rejections(path: str) -> dict[str, Any]:
    """Summarise a build manifest / rejection table: counts by ``status`` and by ``reason``."""
    import pandas as pd

    if path.endswith(".csv"):
        df = pd.read_csv(path)
    elif path.endswith((".jsonl", ".ndjson")):
        df = pd.read_json(path, lines=True)
    else:
        df = pd.read_parquet(path)
    out: dict[str, Any] = {"path": path, "rows": int(len(df))}
    if "status" in df.columns:
        out["by_status"] = {str(k): int(v) for k, v in df["status"].value_counts().items()}
        bad = df[df["status"].astype(str).isin(["rejected", "failed"])]
    else:
        bad = df  # a pure rejection table
    if "reason" in bad.columns:
        reasons = bad["reason"].fillna("(none)").astype(str)
        out["by_reason"] = {str(k): int(v) for k, v in reasons.value_counts().items()}
        if {"start_s", "end_s"} <= set(bad.columns):
            secs = (pd.to_numeric(bad["end_s"], errors="coerce") - pd.to_numeric(bad["start_s"], errors="coerce")).clip(lower=0)
            out["seconds_by_reason"] = {str(k): float(v) for k, v in secs.groupby(reasons).sum().items()}
    return out


def load_gate_rows(path: str) -> Optional[list[dict[str, Any]]]:
    """The gate's scores of every clip a build scored, kept or rejected (manifest ``sync_*``
    columns); None for a manifest without them (built before the gate or with --no-sync-gate)."""
    import pandas as pd

    df = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)
    if "sync_backend" not in df.columns:
        return None
    df = df[df["sync_backend"].notna()]
    out = []
    for r in df.to_dict("records"):
        out.append({"backend": r.get("sync_backend"), "offset_frames": r.get("sync_offset_frames"),
                    "confidence": r.get("sync_confidence"), "decision": r.get("sync_decision"),
                    "reason": r.get("reason") if r.get("status") == "rejected" else None,
                    "applied_offset_frames": r.get("audio_shift_frames"), "mouth_motion_p90": r.get("mouth_motion_p90"),
                    "kept": r.get("status") == "clip"})
    return out


# ---------------------------------------------------------------------------- text output
def _fmt_dist(a: np.ndarray, unit: str, digits: int = 2) -> str:
    if not a.size:
        return "(no data)"
    q = np.percentile(a, [0, 10, 50, 90, 100])
    f = f"{{:.{digits}f}}"
    return (f"min {f.format(q[0])}  p10 {f.format(q[1])}  median {f.format(q[2])}  p90 {f.format(q[3])}  "
            f"max {f.format(q[4])}  mean {f.format(a.mean())} {unit}  (n={a.size:,})")


def fmt_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _table(title: str, rows: list[tuple[str, int, float]], top: Optional[int] = None) -> list[str]:
    lines = [f"by {title}" + (f" (top {top} of {len(rows)})" if top and len(rows) > top else "") + ":"]
    width = max([len(r[0]) for r in rows] + [8])
    total = sum(h for _, _, h in rows) or 1.0
    lines.append(f"  {'':<{width}}  {'samples':>8}  {'hours':>9}  {'share':>6}")
    for name, n, h in rows[:top] if top else rows:
        lines.append(f"  {name:<{width}}  {n:>8,}  {h:>9.4f}  {100 * h / total:>5.1f}%")
    return lines


def format_text(stats: CorpusStats, top_identities: int = 10) -> str:
    n = len(stats.records)
    lines = [f"{stats.shards} shards, {n:,} samples, {fmt_duration(stats.seconds)}" + (f" ({stats.seconds:,.1f} s)" if stats.seconds >= 60 else "")]
    if stats.shards_without_index:
        lines.append(f"  ({stats.shards_without_index} shards have no .index.json: their tar headers were scanned)")
    if stats.member_reads:
        lines.append(f"  (per-frame face boxes / head speeds read from {stats.member_reads} samples by byte range)")
    lines += _table("split", stats.by("split"))
    lines += _table("kind", stats.by("kind"))
    lines += _table("language", stats.by("language"))
    lines += _table("identity", stats.by("identity"), top=top_identities)
    lines.append("clip length:      " + _fmt_dist(stats.lengths(), "s"))
    faces, face_what = stats.face_sizes()
    speeds, speed_what = stats.frame_speeds()
    lines.append("face size:        " + _fmt_dist(faces, f"px ({face_what})", 1))
    crop = np.array([r.face_crop_px for r in stats.records if r.face_crop_px is not None])
    if crop.size and "source" in face_what:
        lines.append("face box in crop: " + _fmt_dist(crop, "px (mean face-box side)", 1))
    lines.append("head speed:       " + _fmt_dist(speeds, f"deg/frame ({speed_what})", 3))
    buckets = stats.bucket_counts()
    if buckets:
        centers, counts = buckets
        total = max(int(counts.sum()), 1)
        unit = "frames" if speed_what == "per frame" else "clips (by mean speed)"
        lines.append(f"speed buckets ({unit} nearest each centre c_i, deg/frame):")
        for c, k in zip(centers, counts):
            bar = "#" * int(round(40 * k / total))
            lines.append(f"  c={c:<5.2f} {int(k):>9,}  {100 * k / total:5.1f}%  {bar}")
    gate = stats.gate_scores()
    if gate:
        backends = ", ".join(f"{k} {v}" for k, v in Counter(str(r.get("backend")) for r in gate).items())
        source = "kept and rejected clips, from the manifest" if stats.gate_rows is not None else "kept clips"
        lines.append(f"lip-sync gate ({len(gate):,} clips scored: {backends}; {source}):")
        lines.append("  offset:       " + _fmt_dist(_values(gate, "offset_frames"), "frames (> 0: audio late)", 1))
        lines.append("  confidence:   " + _fmt_dist(_values(gate, "confidence"), "", 2))
        lines.append("  mouth motion: " + _fmt_dist(_values(gate, "mouth_motion_p90"), "grey levels (p90 per clip)", 2))
        decisions = Counter(str(r.get("decision")) for r in gate)
        reasons = Counter(str(r.get("reason")) for r in gate if r.get("decision") == "reject" and r.get("reason"))
        corrected = sum(1 for r in gate if (r.get("applied_offset_frames") or 0) != 0)
        lines.append("  decisions:    " + ", ".join(f"{k} {v:,}" for k, v in decisions.most_common())
                     + (f" (rejected for: {', '.join(f'{k} {v}' for k, v in reasons.most_common())})" if reasons else "")
                     + f"; audio re-cut in {corrected:,}")
    rej = stats.rejections
    if rej:
        lines.append(f"build manifest {rej['path']}: {rej['rows']:,} rows")
        if rej.get("by_status"):
            lines.append("  status: " + ", ".join(f"{k} {v:,}" for k, v in rej["by_status"].items()))
        if rej.get("by_reason"):
            lines.append("  rejection / failure reasons:")
            secs = rej.get("seconds_by_reason") or {}
            for k, v in rej["by_reason"].items():
                extra = f"  {secs[k]:9.1f} s" if k in secs else ""
                lines.append(f"    {k:<28} {v:>7,}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- PNG report
def plot_report(stats: CorpusStats, out_png: str, title: Optional[str] = None, dpi: int = 90) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 13), dpi=dpi)
    n = len(stats.records)
    fig.suptitle(title or f"EMO corpus: {stats.shards} shards, {n:,} clips, {fmt_duration(stats.seconds)}",
                 fontsize=15, fontweight="bold")

    def hist(ax, data, label, unit, color, bins=30, logy=False):
        if data.size:
            ax.hist(data, bins=min(bins, max(5, int(math.sqrt(data.size)) * 2)), color=color, edgecolor="white")
            ax.axvline(np.median(data), color="k", ls="--", lw=1, label=f"median {np.median(data):.2f} {unit}")
            ax.legend(loc="upper right", fontsize=9)
            if logy:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{label} ({unit})")

    ax = axes[0, 0]
    hist(ax, stats.lengths(), "clip length", "s", "#4c72b0")
    ax.set_title("Clip length")
    ax.set_ylabel("clips")

    ax = axes[0, 1]
    faces, face_what = stats.face_sizes()
    hist(ax, faces, face_what, "px", "#55a868")
    ax.set_title("Face size")
    ax.set_ylabel("clips")

    ax = axes[0, 2]
    speeds, speed_what = stats.frame_speeds()
    per_frame = speed_what == "per frame"
    hist(ax, speeds, "head rotation speed", "deg/frame", "#c44e52", bins=40, logy=per_frame)
    centers = stats.centers() or []
    for i, c in enumerate(centers):
        ax.axvline(c, color="#888", lw=0.8, ls=":", label="bucket centres" if i == 0 else None)
    if centers and speeds.size:
        ax.legend(loc="upper right", fontsize=9)
    ax.set_title(f"Head speed ({speed_what})")
    ax.set_ylabel("frames (log scale)" if per_frame else "clips")

    ax = axes[1, 0]
    buckets = stats.bucket_counts()
    if buckets:
        c, k = buckets
        ax.bar(range(len(c)), 100.0 * k / max(k.sum(), 1), color="#8172b2")
        ax.set_xticks(range(len(c)), [f"{x:g}" for x in c])
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    unit = "frames" if per_frame else "clips"
    ax.set_title(f"Speed buckets ({unit} nearest each centre)")
    ax.set_xlabel("bucket centre c_i (deg/frame)")
    ax.set_ylabel(f"% of {unit}")

    ax = axes[1, 1]
    rows = []
    for attr, label in (("split", "split"), ("kind", "kind"), ("language", "lang")):
        rows += [(f"{label}: {k}", h) for k, _, h in stats.by(attr)]
    if rows:
        y = np.arange(len(rows))
        ax.barh(y, [h * 60 for _, h in rows], color="#dd8452")
        ax.set_yticks(y, [r[0] for r in rows])
        ax.invert_yaxis()
    ax.set_title("Footage by split, kind and language")
    ax.set_xlabel("minutes")

    ax = axes[1, 2]
    rej = stats.rejections
    if rej and rej.get("by_reason"):
        items = list(rej["by_reason"].items())[:12]
        y = np.arange(len(items))
        ax.barh(y, [v for _, v in items], color="#937860")
        ax.set_yticks(y, [k for k, _ in items])
        ax.invert_yaxis()
        status = ", ".join(f"{k} {v}" for k, v in (rej.get("by_status") or {}).items())
        ax.set_title("Rejections" + (f" ({status})" if status else ""), fontsize=11)
        ax.set_xlabel("spans / sources")
    else:
        ids = stats.by("identity")[:12]
        y = np.arange(len(ids))
        ax.barh(y, [n for _, n, _ in ids], color="#937860")
        ax.set_yticks(y, [k for k, _, _ in ids])
        ax.invert_yaxis()
        ax.set_title(f"Clips per identity (top {len(ids)} of {len(stats.by('identity'))})")
        ax.set_xlabel("clips")
    _plot_gate(axes[2], stats.gate_scores())
    for a in axes.ravel():
        a.grid(alpha=0.25)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def _plot_gate(axes, rows: list[dict[str, Any]]) -> None:
    """Third row of the report: the gate's offsets, confidences and mouth motion, kept vs rejected."""
    kept = [r for r in rows if r.get("kept", True) and r.get("decision") != "reject"]
    dropped = [r for r in rows if r not in kept]
    panels = (("offset_frames", "measured A/V offset (frames, > 0: audio late)", np.arange(-15.5, 16.5, 1.0)),
              ("confidence", "sync confidence", 20), ("mouth_motion_p90", "mouth motion p90 (grey levels)", 20))
    for ax, (key, label, bins) in zip(axes, panels):
        a, b = _values(kept, key), _values(dropped, key)
        if a.size or b.size:
            both = np.concatenate([a, b])
            edges = bins if not isinstance(bins, int) else np.linspace(both.min(), both.max() + 1e-9, bins + 1)
            ax.hist([a, b], bins=edges, stacked=True, color=["#4c72b0", "#c44e52"],
                    label=[f"kept / would keep ({a.size})", f"rejected / would reject ({b.size})"])
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no gate scores (built with --no-sync-gate?)", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
        ax.set_title(f"Lip-sync gate: {label.split(' (')[0]}")
