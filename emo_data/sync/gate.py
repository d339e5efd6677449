"""The per-clip gate: lip sync, A/V offset correction, frozen faces and face quality.

:class:`SyncGateStage` scores one :class:`~emo_data.types.ClipCandidate` with the configured
backend, decides (:func:`decide`), and either returns the clip (unchanged, or with its audio
re-cut by the measured offset) or a :class:`~emo_data.types.RejectedSpan` with the reason.
Either way the clip's record (``clip.sync``) holds every score, so ``--gate-mode score`` and
``emo-shards stats`` let users choose thresholds afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np

from ..config import SyncConfig
from ..stage import Stage, StageError
from ..types import ClipCandidate, RejectedSpan
from .base import SyncBackend, SyncInput, SyncResult

OUT_OF_SYNC = "out_of_sync"
STATIC_FACE = "static_face"
LOW_QUALITY = "low_quality"
GATE_REASONS = (OUT_OF_SYNC, STATIC_FACE, LOW_QUALITY)
STAGE_NAME = "sync_gate"


@dataclass
class GateDecision:
    action: str                 # keep | correct | reject
    reason: Optional[str]       # for reject: out_of_sync | static_face | low_quality
    detail: str
    shift_frames: int = 0       # audio shift to apply (correct)


def mouth_motion_p90(clip: ClipCandidate) -> Optional[float]:
    if clip.mouth_motion is None or len(clip.mouth_motion) == 0:
        return None
    return float(np.quantile(np.asarray(clip.mouth_motion, np.float64), 0.9))


def decide(result: Optional[SyncResult], motion_p90: Optional[float], quality: Optional[float],
           config: SyncConfig, min_face_quality: Optional[float] = None) -> GateDecision:
    """What the gate does with a clip, from its scores (pure; unit-tested on its own). With the
    sync gate off (``config.enabled`` False) only the face-quality threshold applies."""
    if not config.enabled:
        if min_face_quality is not None and quality is not None and quality < min_face_quality:
            return GateDecision("reject", LOW_QUALITY, f"face quality {quality:.3f} < {min_face_quality:g}")
        return GateDecision("keep", None, "sync gate off")
    if config.static_check and motion_p90 is not None and motion_p90 < config.static_max_motion:
        return GateDecision("reject", STATIC_FACE,
                            f"mouth motion p90 {motion_p90:.3f} < {config.static_max_motion:g} grey levels while the voice is active")
    if min_face_quality is not None and quality is not None and quality < min_face_quality:
        return GateDecision("reject", LOW_QUALITY, f"face quality {quality:.3f} < {min_face_quality:g}")
    if result is None:
        return GateDecision("keep", None, "lip sync not scored")
    min_conf, correct_conf = config.thresholds()
    offset, conf = int(result.offset_frames), float(result.confidence)
    searched = max(abs(o) for o in result.offsets) if result.offsets else config.max_offset
    if min_conf is not None and conf < min_conf:
        return GateDecision("reject", OUT_OF_SYNC, f"{result.backend} confidence {conf:.2f} < {min_conf:g}: "
                            "the voice does not follow this face")
    if abs(offset) <= config.keep_tolerance:
        return GateDecision("keep", None, f"offset {offset:+d} frames within +-{config.keep_tolerance}")
    if conf < correct_conf:
        return GateDecision("keep", None, f"offset {offset:+d} frames not corrected: {result.backend} confidence "
                            f"{conf:.2f} < {correct_conf:g}")
    if abs(offset) >= searched and min_conf is not None:
        return GateDecision("reject", OUT_OF_SYNC, f"best offset {offset:+d} is at the search limit (+-{searched}): "
                            "the true offset may be larger")
    if abs(offset) > config.max_correction:
        return GateDecision("reject", OUT_OF_SYNC, f"offset {offset:+d} frames exceeds the correction limit "
                            f"+-{config.max_correction}")
    return GateDecision("correct", None, f"audio re-cut by {offset:+d} frames ({offset * 40:+d} ms at 25 fps)",
                        shift_frames=offset)


def sync_input(clip: ClipCandidate, crop_size: int) -> SyncInput:
    context = clip.vocals_context if clip.vocals_context is not None else clip.audio_context
    pad = clip.audio_pad_frames
    if context is None:  # no margin: the clip's own audio (offsets search only inside it)
        context, pad = clip.audio, 0
    return SyncInput(
        key=clip.key, fps=clip.fps, sample_rate=clip.sample_rate, num_frames=clip.num_frames,
        landmarks=clip.landmarks, landmark_format=clip.landmark_format, face_boxes=clip.face_boxes,
        crop_size=int(crop_size), audio=context, audio_pad_frames=pad,
        mp4=clip.mp4, mouth_motion=clip.mouth_motion, mouth_darkness=clip.mouth_darkness,
    )


def shift_clip_audio(clip: ClipCandidate, shift: int, min_frames: int, crf: int = 18,
                     preset: str = "veryfast") -> Optional[ClipCandidate]:
    """The clip with its audio taken ``shift`` frames later (earlier if < 0) from the source.

    Frames whose shifted audio would fall outside the source's audio are trimmed off the
    clip's ends (mp4 re-encoded from the decoded crop, arrays cut); None when fewer than
    ``min_frames`` remain. The audio context is re-based so that frame t's audio sits at
    ``pad + t`` again.
    """
    from ..shards import decode_mp4, encode_mp4

    if clip.audio_context is None:
        raise StageError("sync_no_context", f"{clip.key}: no audio context to shift")
    per_frame = clip.sample_rate / clip.fps
    pad = clip.audio_pad_frames
    lo_valid, hi_valid = clip.audio_valid
    T = clip.num_frames
    # frame t needs context samples [(pad + shift + t) * per_frame, (pad + shift + t + 1) * per_frame)
    first = 0
    while first < T and (pad + shift + first) * per_frame < lo_valid - 0.5:
        first += 1
    last = T
    while last > first and (pad + shift + last) * per_frame > hi_valid + 0.5:
        last -= 1
    if last - first < min_frames:
        return None
    out = replace(clip)
    if (first, last) != (0, T):
        frames = decode_mp4(clip.mp4)[first:last]
        out.mp4 = encode_mp4(list(frames), clip.fps, crf=crf, preset=preset)
        out.num_frames = last - first
        out.start_s = clip.start_s + first / clip.fps
        out.face_boxes = clip.face_boxes[first:last]
        out.landmarks = clip.landmarks[first:last]
        if clip.backend_pose is not None:
            out.backend_pose = clip.backend_pose[first:last]
        if clip.mouth_motion is not None:
            out.mouth_motion = clip.mouth_motion[first:last]
        if clip.mouth_darkness is not None:
            out.mouth_darkness = clip.mouth_darkness[first:last]
    # Re-base the contexts on the corrected alignment: new frame t's audio = old context at
    # pad + shift + first + t. Keep the same margin, zero-filled where the source has none.
    move = int(round((shift + first) * per_frame))

    def rebase(context: np.ndarray) -> np.ndarray:
        shifted = np.zeros_like(context)
        if move >= 0:
            shifted[: len(context) - move] = context[move:]
        else:
            shifted[-move:] = context[: len(context) + move]
        return shifted

    out.audio_context = rebase(clip.audio_context)
    out.audio_valid = (max(lo_valid - move, 0), min(hi_valid - move, len(clip.audio_context)))
    if clip.vocals_context is not None:
        out.vocals_context = rebase(clip.vocals_context)
    out.audio = out.context_slice(out.audio_context).astype(np.float32)
    return out


def check_sync_backend(config: SyncConfig) -> None:
    """Load the configured backend once before a build touches any footage: a missing or broken
    SyncNet weights file stops the build at once with what to do, not per clip."""
    from .envelope import make_sync_backend

    if config.backend_name != "syncnet":
        return
    try:
        make_sync_backend(config.backend, config.syncnet_weights, config.max_offset, "cpu").setup()
    except Exception as exc:  # noqa: BLE001 - re-raised with the how-to
        raise RuntimeError(
            f"cannot load SyncNet weights from {config.syncnet_weights!r}: {exc}. Download syncnet_v2.model "
            "(see docs/sync.md) and pass --syncnet-weights PATH, or use the weight-free scorer "
            "(--sync-backend envelope) or --no-sync-gate") from exc


@dataclass
class GateOutcome:
    clip: Optional[ClipCandidate]          # None when rejected
    rejected: Optional[RejectedSpan] = None


class SyncGateStage(Stage[ClipCandidate, GateOutcome]):
    """Score, decide, apply. The backend (SyncNet weights) loads once per worker in ``setup``."""

    name = STAGE_NAME

    def __init__(self, config: Optional[SyncConfig] = None, min_frames: int = 50, backend: Optional[SyncBackend] = None,
                 crop_size: int = 512, mp4_crf: int = 18, mp4_preset: str = "veryfast",
                 min_face_quality: Optional[float] = None):
        super().__init__()
        self.config = config or SyncConfig()
        self.min_face_quality = min_face_quality
        self.min_frames = int(min_frames)
        self.crop_size = int(crop_size)
        self.backend = backend
        self.mp4_crf, self.mp4_preset = mp4_crf, mp4_preset

    @classmethod
    def from_build_config(cls, config) -> "SyncGateStage":
        """The gate as a build configures it (``config``: a :class:`emo_data.config.BuildConfig`)."""
        return cls(config.sync, min_frames=int(round(config.clip.min_seconds * config.decode.fps)),
                   crop_size=config.clip.crop_size, mp4_crf=config.clip.mp4_crf, mp4_preset=config.clip.mp4_preset,
                   min_face_quality=config.quality.min_face_quality)

    @staticmethod
    def wanted(config) -> bool:
        """Does a build with ``config`` run this stage? (the sync gate, or a face-quality threshold)"""
        return bool(config.sync.enabled or config.quality.min_face_quality is not None)

    def setup(self) -> None:
        from .envelope import make_sync_backend

        if self.backend is None and self.config.enabled:
            cfg = self.config
            self.backend = make_sync_backend(cfg.backend, cfg.syncnet_weights, cfg.max_offset, cfg.device)
        if self.backend is not None:
            self.backend.setup()

    def to(self, device: str) -> None:
        """Run the backend on ``device`` (the Ray build passes the GPU it assigned)."""
        self.config = replace(self.config, device=device)
        if self.backend is not None:
            self.backend.device = device

    def process(self, clip: ClipCandidate) -> GateOutcome:
        cfg = self.config
        quality = clip.quality.get("face_quality") if clip.quality else None
        if not cfg.enabled:   # only the face-quality threshold runs
            decision = decide(None, None, quality, cfg, self.min_face_quality)
            if decision.action == "reject":
                return GateOutcome(None, self._rejected(clip, decision.reason or LOW_QUALITY, decision.detail, {}))
            return GateOutcome(clip)
        backend = self.backend
        assert backend is not None, "setup() builds the backend when the gate is enabled"
        record: dict[str, Any] = {"mode": cfg.mode, "backend": backend.name, "audio_source": clip.audio_source}
        motion = mouth_motion_p90(clip)
        record["mouth_motion_p90"] = None if motion is None else round(motion, 4)
        try:
            result = backend.score(sync_input(clip, self.crop_size))
            record.update(result.to_dict())
            record["backend"] = result.backend
        except StageError as exc:  # a clip the backend cannot score stays scoreless, visibly
            result = None
            record["error"] = f"{exc.reason}: {exc.message}"
        decision = decide(result, motion, quality, cfg, self.min_face_quality)
        record.update({"decision": decision.action, "reason": decision.reason, "detail": decision.detail,
                       "measured_offset_frames": None if result is None else int(result.offset_frames),
                       "applied_offset_frames": 0, "trimmed_frames": 0})
        if cfg.mode != "enforce" or decision.action == "keep":
            clip.sync = record
            return GateOutcome(clip)
        if decision.action == "reject":
            clip.sync = record
            return GateOutcome(None, self._rejected(clip, decision.reason or OUT_OF_SYNC, decision.detail, record))
        corrected = shift_clip_audio(clip, decision.shift_frames, self.min_frames, self.mp4_crf, self.mp4_preset)
        if corrected is None:
            detail = (f"{decision.detail}; fewer than {self.min_frames} frames keep source audio after the shift")
            record["detail"] = detail
            clip.sync = record
            return GateOutcome(None, self._rejected(clip, "too_short", detail, record))
        record["applied_offset_frames"] = int(decision.shift_frames)
        record["trimmed_frames"] = int(clip.num_frames - corrected.num_frames)
        corrected.sync = record
        return GateOutcome(corrected)

    @staticmethod
    def _rejected(clip: ClipCandidate, reason: str, detail: str, record: dict[str, Any]) -> RejectedSpan:
        scores = {k: record.get(k) for k in ("backend", "offset_frames", "confidence", "min_distance", "mouth_motion_p90")}
        return RejectedSpan(clip.source.source_id, clip.source.path, clip.start_s,
                            clip.start_s + clip.num_frames / clip.fps, reason, stage=STAGE_NAME, detail=detail,
                            scores=scores, key=clip.key)
