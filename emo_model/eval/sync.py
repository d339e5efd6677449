"""Lip-sync metrics through the data side's sync code (the same code and weights as the lip-sync gate).

- :class:`SyncNetScorer`: SyncNet LSE-C / LSE-D from ``emo_data.sync.syncnet`` (``load_syncnet``,
  ``score_video``): syncnet_python's network, crops, MFCC and offset search.
- :class:`OfflineSyncScorer`: the weight-free scorer of ``emo_data.sync`` (mouth opening from the
  68 landmarks against the speech envelope) through the :class:`~emo_data.sync.base.SyncBackend`
  interface, fed a :class:`~emo_data.sync.base.SyncInput` built from our face pass.

Each raises :class:`MetricUnavailable` (the scorer reports the metric as skipped with that
reason) when its code or weights are not there.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

import numpy as np

from .weights import WeightsInfo, weights_info


class MetricUnavailable(RuntimeError):
    """The metric cannot be computed here (code not installed / not landed, or weights missing)."""


class SyncNetScorer:
    name = "syncnet"

    def __init__(self, weights_path: Optional[str], device: str = "cpu", max_offset: int = 15):
        self.info: WeightsInfo = weights_info(weights_path, "SyncNet (syncnet_v2.model)")
        try:
            self._mod = importlib.import_module("emo_data.sync.syncnet")
        except ImportError as exc:
            raise MetricUnavailable(f"emo_data.sync.syncnet is not importable ({exc})") from exc
        self.model = self._mod.load_syncnet(self.info.path, device=device)
        self.max_offset = int(max_offset)

    def score(self, frames: np.ndarray, face_boxes: Optional[np.ndarray], audio: np.ndarray, fps: float) -> dict[str, Any]:
        out = self._mod.score_video(self.model, frames, face_boxes, audio, fps=fps, max_offset=self.max_offset)
        return {"lse_c": float(out["lse_c"]), "lse_d": float(out["lse_d"]), "offset_frames": int(out["offset_frames"])}


class OfflineSyncScorer:
    """The data side's weight-free envelope scorer (``emo_data.sync.envelope``), with the mouth cues
    computed by the same functions the video pass uses (``emo_data.sync.signals``)."""

    name = "offline"

    def __init__(self, max_offset: int = 15):
        try:
            envelope = importlib.import_module("emo_data.sync.envelope")
            self._signals = importlib.import_module("emo_data.sync.signals")
        except ImportError as exc:
            raise MetricUnavailable(f"the offline sync backend (emo_data.sync.envelope) is not importable ({exc})") from exc
        self.backend = envelope.make_sync_backend("envelope", max_offset=max_offset)
        self.backend.setup()
        self.max_offset = int(max_offset)
        self.label = f"{type(self.backend).__module__}.{type(self.backend).__name__} (no weights)"

    def score(self, key: str, frames: np.ndarray, landmarks: np.ndarray, face_boxes: np.ndarray, audio: np.ndarray,
              fps: float) -> dict[str, Any]:
        from emo_data.sync.base import SyncInput

        sr = 16000
        per_frame = sr / fps
        T = len(frames)
        n = int(round(T * per_frame))
        clip = np.zeros(n, np.float32)
        clip[: min(n, len(audio))] = np.asarray(audio, np.float32)[:n]
        pad = int(round(self.max_offset * per_frame))
        landmarks = np.asarray(landmarks, np.float32)
        optional = {}
        for name in ("mouth_motion", "mouth_darkness"):  # fields the installed SyncInput may or may not have
            if name in getattr(SyncInput, "__dataclass_fields__", {}) and hasattr(self._signals, name):
                optional[name] = getattr(self._signals, name)(list(frames), landmarks, "ibug68")
        item = SyncInput(
            key=key, fps=float(fps), sample_rate=sr, num_frames=T, landmarks=landmarks, landmark_format="ibug68",
            face_boxes=np.asarray(face_boxes, np.float32), crop_size=int(frames.shape[1]),
            # only the clip's own audio exists (the shard holds no margin): the margin is silence,
            # as SyncInput allows past the end of a track
            audio=np.concatenate([np.zeros(pad, np.float32), clip, np.zeros(pad, np.float32)]),
            audio_pad_frames=self.max_offset, mp4=None, **optional,
        )
        result = self.backend.score(item)
        return {"confidence": float(result.confidence), "offset_frames": int(result.offset_frames)}
