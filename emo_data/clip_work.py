"""Per-clip work after the video pass, shared by both executors.

A :class:`ClipInFlight` carries one selected clip through head pose, audio features and sample
assembly; the helpers below turn clips, rejected spans and failures into manifest rows. The Ray
build runs each step as its own operator and the in-process build calls them in a row, so both
produce the same samples and rows.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .audio_features import AudioFeatureInput
from .config import BuildConfig
from .manifest import ManifestRow, gate_fields
from .pose import HeadMotion, HeadPoseInput, HeadPoseStage
from .samples import SampleAssemblyStage, SampleInput
from .stage import StageError
from .types import ClipCandidate, ClipSample, RejectedSpan, Source


@dataclass
class ClipInFlight:
    clip: ClipCandidate
    motion: Optional[HeadMotion] = None
    audio_emb: Optional[np.ndarray] = None           # [T, L, D]
    audio_emb_info: Optional[dict[str, Any]] = None
    rejected: Optional[RejectedSpan] = None          # set when a per-clip gate rejected the clip

    @property
    def key(self) -> str:
        return self.clip.key


def apply_sync_gate(item: ClipInFlight, stage) -> ClipInFlight:
    """``stage`` is a set-up :class:`emo_data.sync.gate.SyncGateStage`. A rejected clip keeps its
    (scored) candidate for the row and carries ``rejected``; later steps skip it."""
    outcome = stage(item.clip)
    if outcome.clip is None:
        item.rejected = outcome.rejected
    else:
        item.clip = outcome.clip
    return item


def add_head_motion(item: ClipInFlight, stage: HeadPoseStage, crop_size: int) -> ClipInFlight:
    clip = item.clip
    item.motion = stage(HeadPoseInput(
        landmarks=clip.landmarks, crop_size=crop_size, landmark_format=clip.landmark_format,
        backend_pose=clip.backend_pose,
    ))
    return item


def add_audio_features(item: ClipInFlight, stage) -> ClipInFlight:
    """``stage`` is a set-up :class:`emo_data.audio_features.AudioFeatureStage`."""
    clip = item.clip
    # the separated voice when vocal separation ran (the stored wav stays the mix)
    item.audio_emb = stage(AudioFeatureInput(clip.voice, clip.num_frames, clip.fps))
    item.audio_emb_info = {
        "audio_source": clip.audio_source,
        "encoder": stage.model_id,
        "layers": stage.config.layers,
        "num_layers": int(item.audio_emb.shape[1]),
        "dim": int(item.audio_emb.shape[2]),
        "rate": "resampled from 50 Hz to the video frames",
    }
    return item


def assemble_sample(item: ClipInFlight, stage: SampleAssemblyStage, config: BuildConfig) -> ClipSample:
    if item.motion is None:
        raise StageError("no_head_motion", f"{item.key}: head pose was not computed")
    clip = item.clip
    return stage(SampleInput(
        clip=clip, head_pose=item.motion.pose, head_speed=item.motion.speed, speed_buckets=item.motion.buckets,
        head_pose_raw=item.motion.raw_pose, audio_emb=item.audio_emb, audio_emb_info=item.audio_emb_info, face_backend=clip.face_backend,
        landmark_format=clip.landmark_format, speech_backend=config.speech.backend,
    ))


def _source_fields(source: Source) -> dict[str, Any]:
    return dict(source_id=source.source_id, path=source.path, kind=source.kind, language=source.language,
                licence=source.licence)


def clip_row(clip: ClipCandidate, sample: ClipSample) -> dict[str, Any]:
    seconds = clip.num_frames / clip.fps
    row = ManifestRow(
        status="clip", key=clip.key, start_s=clip.start_s, end_s=clip.start_s + seconds, duration_s=seconds,
        num_frames=clip.num_frames, face_size=clip.scores.get("face_size_mean"),
        head_speed_mean=sample.meta.head_speed_mean, identity=clip.source.identity, **_source_fields(clip.source),
        **gate_fields(clip.sync, clip.quality),
    ).to_dict()
    emb = clip.identity_embedding
    row["identity_embedding"] = None if emb is None else np.asarray(emb, np.float32).tolist()
    return row


def rejected_row(source: Source, span: RejectedSpan) -> dict[str, Any]:
    return ManifestRow(
        status="rejected", start_s=span.start_s, end_s=span.end_s, duration_s=span.end_s - span.start_s,
        reason=span.reason, stage=span.stage, detail=span.detail, key=span.key, **_source_fields(source),
        **gate_fields(span.scores and {**span.scores, "decision": "reject"}),
    ).to_dict()


def gate_rejected_row(item: ClipInFlight) -> dict[str, Any]:
    """The row of a clip a per-clip gate rejected: its span, reason and every score."""
    row = rejected_row(item.clip.source, item.rejected)
    row.update(gate_fields({**(item.clip.sync or {}), "decision": "reject"}, item.clip.quality))
    row["num_frames"] = item.clip.num_frames
    return row


def failed_row(source: Source, stage: str, exc: BaseException) -> dict[str, Any]:
    """A failed-source row: a :class:`StageError` keeps its reason; anything else is a bug report."""
    if isinstance(exc, StageError):
        reason, detail = exc.reason, exc.message
    else:
        reason = "exception"
        detail = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=4))
    return ManifestRow(status="failed", reason=reason, stage=stage, detail=detail, **_source_fields(source)).to_dict()


def staged_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A source's kept clips and seconds as its rows say (after the per-clip gates)."""
    clips = [r for r in rows if r.get("status") == "clip"]
    return {"clips": len(clips), "kept_s": float(sum(r.get("duration_s") or 0.0 for r in clips))}


def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one source in time order (clips before a rejection starting at the same time)."""
    return sorted(rows, key=lambda r: (r.get("start_s") or 0.0, r["status"] != "clip", r.get("key") or ""))
