"""Typed items passed between stages."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .shards.contract import SampleMeta


def make_source_id(path: str) -> str:
    """A WebDataset-safe id from a file path: no dots (WebDataset splits keys on them)."""
    stem = path.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "source"


@dataclass
class Source:
    """One row of a source manifest."""

    path: str
    source_id: str
    kind: str = "unknown"        # talk | film | singing | unknown
    language: str = "und"
    licence: str = ""
    identity: Optional[str] = None  # optional speaker/identity id given by the manifest
    # Which audio stream holds the voice, counted among the file's audio streams from 0; None =
    # the stream flagged default (else the first). A manifest column ``audio_stream`` sets it.
    audio_stream: Optional[int] = None


@dataclass
class ProbeInfo:
    path: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    rotation: int = 0               # degrees clockwise the frames must be turned for display
    avg_fps: float = 0.0
    video_start_s: float = 0.0
    audio_start_s: float = 0.0
    audio_sample_rate: int = 0
    audio_channels: int = 0
    video_codec: str = ""
    audio_codec: str = ""
    variable_frame_rate: bool = False


@dataclass
class AudioTrack:
    """16 kHz mono float32 waveform; ``samples[0]`` plays at ``start_s`` on the source timeline."""

    samples: np.ndarray
    sample_rate: int
    start_s: float

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    def segment(self, start_s: float, num_samples: int) -> np.ndarray:
        """Exactly ``num_samples`` from source time ``start_s``, zero-padded outside the track."""
        offset = int(round((start_s - self.start_s) * self.sample_rate))
        out = np.zeros(num_samples, dtype=np.float32)
        lo, hi = max(offset, 0), min(offset + num_samples, len(self.samples))
        if hi > lo:
            out[lo - offset : hi - offset] = self.samples[lo:hi]
        return out


@dataclass
class SpeechSegment:
    start_s: float
    end_s: float
    speaker: Optional[str] = None


@dataclass
class Face:
    """One face in one frame, in that frame's pixel coordinates (x0, y0, x1, y1)."""

    box: np.ndarray                       # [4] float32
    score: float = 1.0
    landmarks: Optional[np.ndarray] = None  # [K, 2] float32
    track_id: int = -1
    pose: Optional[np.ndarray] = None      # [6] yaw, pitch, roll (deg), tx, ty, tz if the backend has it


@dataclass
class RejectedSpan:
    source_id: str
    path: str
    start_s: float
    end_s: float
    reason: str
    stage: str = "clip_selection"
    detail: str = ""
    scores: dict[str, Any] = field(default_factory=dict)  # the scores behind a gate's rejection
    key: Optional[str] = None      # the clip key a per-clip gate rejected (keys stay stable across gate settings)


@dataclass
class ClipCandidate:
    """A selected span, cropped: what the single video pass hands to the per-clip stages."""

    source: Source
    clip_index: int
    start_s: float                 # source time of frame 0
    fps: float
    num_frames: int
    mp4: bytes                     # the T cropped S x S frames, H.264, at ``fps``
    face_boxes: np.ndarray         # [T, 4] float32 in crop coordinates
    landmarks: np.ndarray          # [T, K, 2] float32 in crop coordinates
    crop_box: np.ndarray           # [4] float32 square in source (display) coordinates
    source_size: tuple[int, int]   # (width, height) of the displayed source frame
    audio: np.ndarray              # [T * sr / fps] float32 mono
    sample_rate: int
    identity_embedding: Optional[np.ndarray] = None  # [E] float32
    backend_pose: Optional[np.ndarray] = None        # [T, 6] if the face backend estimates pose
    scores: dict[str, float] = field(default_factory=dict)
    face_backend: str = ""         # which backend found the faces (recorded in the sample)
    landmark_format: str = ""      # e.g. ibug68: how head pose reads ``landmarks``
    # The source's audio around the clip, for the lip-sync gate: frames [-audio_pad_frames,
    # T + audio_pad_frames) of the mix (zeros past the track; ``audio_valid`` is the sample range
    # that is real audio) and, when vocal separation ran, the same span of the separated voice.
    audio_context: Optional[np.ndarray] = None
    audio_pad_frames: int = 0
    audio_valid: tuple[int, int] = (0, 0)
    vocals_context: Optional[np.ndarray] = None
    mouth_motion: Optional[np.ndarray] = None    # [T] mouth pixel change (grey levels), see emo_data.sync.signals
    mouth_darkness: Optional[np.ndarray] = None  # [T] inner-mouth darkness, see emo_data.sync.signals
    quality: dict[str, float] = field(default_factory=dict)  # face image-quality scores of the crop
    sync: Optional[dict[str, Any]] = None        # the lip-sync gate's record, filled by the gate
    audio_source: str = "mix"                    # what the gates and audio features heard: mix | vocals
    vocals_info: Optional[dict[str, Any]] = None # vocal separation: whether, why, which weights

    @property
    def key(self) -> str:
        return f"{self.source.source_id}_{self.clip_index:05d}"

    def context_slice(self, context: np.ndarray, offset_frames: int = 0) -> np.ndarray:
        """The clip's T frames of ``context`` (audio_context or vocals_context) starting
        ``offset_frames`` after frame 0."""
        per_frame = self.sample_rate / self.fps
        lo = int(round((self.audio_pad_frames + offset_frames) * per_frame))
        return context[lo:lo + int(round(self.num_frames * per_frame))]

    @property
    def voice(self) -> np.ndarray:
        """The clip's audio as the speech models hear it: the separated voice when there is one."""
        if self.vocals_context is not None:
            return self.context_slice(self.vocals_context)
        return self.audio


@dataclass
class ClipSample:
    """Everything a shard sample holds, before serialisation."""

    key: str
    mp4: bytes
    wav: bytes
    face_mask: np.ndarray          # [S, S] uint8, 255 inside the union of the face boxes
    face_boxes: np.ndarray         # [T, 4] float32
    landmarks: np.ndarray          # [T, K, 2] float32
    head_pose: np.ndarray          # [T, 6] float32
    head_speed: np.ndarray         # [T] float32, degrees per frame
    speed_buckets: np.ndarray      # [T, d] float32
    identity_emb: np.ndarray       # [E] float32
    meta: SampleMeta               # the json member
    audio_emb: Optional[np.ndarray] = None  # [T, L, D] float16
    head_pose_raw: Optional[np.ndarray] = None  # [T, 6] float32 per-frame pose before smoothing
