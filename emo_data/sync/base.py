"""The lip-sync backend interface: one clip in, a best audio/video offset and a confidence out.

Offset convention (used everywhere: manifest, sample json, corrections):
``offset_frames = k > 0`` means the **audio is late** by k frames: the sound that belongs to video
frame ``t`` plays at frame ``t + k``. Correcting it takes the clip's audio from
``start_s + k / fps`` instead of ``start_s``. ``k < 0``: the audio is early.

Backends score the clip at every offset in ``[-max_offset, +max_offset]`` and return the whole
curve, so a user (and ``emo-shards render``) can see how peaked the match is.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass
class SyncInput:
    """One clip as the sync backends see it (crop pixels, 16 kHz mono float32 audio)."""

    key: str
    fps: float
    sample_rate: int
    num_frames: int
    landmarks: np.ndarray              # [T, K, 2] in crop pixels
    landmark_format: str               # "ibug68" | "insightface106" | ...
    face_boxes: np.ndarray             # [T, 4] in crop pixels
    crop_size: int                     # the clip's frames are crop_size x crop_size
    audio: np.ndarray                  # float32, covers frames [-audio_pad_frames, T + audio_pad_frames)
    audio_pad_frames: int              # margin (in frames) of real source audio on each side, zeros past the track
    mp4: Optional[bytes] = None        # the cropped clip (H.264), for backends that need pixels
    mouth_motion: Optional[np.ndarray] = None  # [T] mean abs pixel change in the mouth region, from the video pass
    mouth_darkness: Optional[np.ndarray] = None  # [T] how dark the inner mouth is (open mouth), from the video pass

    def clip_audio(self, offset_frames: int = 0) -> np.ndarray:
        """The T frames' worth of audio starting ``offset_frames`` after the clip start (within the margin)."""
        per_frame = self.sample_rate / self.fps
        pad = int(round(self.audio_pad_frames * per_frame))
        lo = pad + int(round(offset_frames * per_frame))
        n = int(round(self.num_frames * per_frame))
        if lo < 0 or lo + n > len(self.audio):
            raise ValueError(f"offset {offset_frames} is outside the audio margin of {self.audio_pad_frames} frames")
        return self.audio[lo:lo + n]


@dataclass
class SyncResult:
    backend: str
    offset_frames: int                 # > 0: audio late by this many frames (see module doc)
    confidence: float                  # higher = more certain that this face makes this sound
    offsets: list[int]                 # the offsets scored, ascending
    curve: list[float]                 # one score per offset (see ``curve_kind``)
    curve_kind: str                    # "correlation" (higher = better) | "distance" (lower = better)
    min_distance: Optional[float] = None  # SyncNet's LSE-D (mean distance at the best offset)
    extra: dict[str, Any] = field(default_factory=dict)   # backend-specific scores (all JSON-able)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "offset_frames": int(self.offset_frames), "confidence": float(self.confidence),
            "min_distance": None if self.min_distance is None else float(self.min_distance),
            "offsets": [int(o) for o in self.offsets], "curve": [round(float(c), 5) for c in self.curve],
            "curve_kind": self.curve_kind, "extra": self.extra,
        }


class SyncBackend(ABC):
    """``setup()`` once per worker (loads weights), ``score()`` per clip. Never raises for a
    merely bad clip: a clip that cannot be scored raises :class:`emo_data.stage.StageError`."""

    name: str = "sync"
    needs_pixels: bool = False        # True: ``SyncInput.mp4`` must be set (the backend decodes it)
    uses_gpu: bool = False            # may run on a GPU when the executor gives it one

    def __init__(self, max_offset: int = 15, device: str = "cpu"):
        self.max_offset = int(max_offset)
        self.device = device

    def setup(self) -> None:  # noqa: B027 - an optional hook: a backend without weights loads nothing
        """Load models; called once before the first clip."""

    @abstractmethod
    def score(self, item: SyncInput) -> SyncResult:
        """Score one clip over offsets in [-max_offset, +max_offset]; implemented by every backend."""
