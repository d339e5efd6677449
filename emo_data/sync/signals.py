"""Per-frame signals the weight-free sync scorer and the static-face check read.

- :func:`mouth_opening`: inner-lip opening from landmarks, in units of the inter-ocular distance
  (so it does not depend on face size or crop scale).
- :func:`speech_envelope`: log energy of the 150-4000 Hz band per video frame.
- :func:`mouth_motion`: pixel change in the mouth region between consecutive frames, minus the
  change in a nose-bridge region of the same frame pair (so a panned or zoomed still photo, or
  compression noise, does not count as a moving mouth). Computed on the clip's own crops in the
  video pass, before the clip is encoded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# 0-based landmark indices per format: inner-lip pairs (upper, lower) and the outer eye corners.
_LIPS = {
    "ibug68": dict(pairs=[(61, 67), (62, 66), (63, 65)], eyes=(36, 45), mouth=list(range(48, 68)),
                   nose=list(range(27, 36))),
}


def supports(landmark_format: str) -> bool:
    return landmark_format in _LIPS


def mouth_opening(landmarks: np.ndarray, landmark_format: str = "ibug68") -> np.ndarray:
    """[T] inner-lip opening / median inter-ocular distance (0 = lips closed, ~0.1-0.3 open)."""
    spec = _LIPS.get(landmark_format)
    if spec is None:
        raise ValueError(f"no lip landmarks known for format {landmark_format!r}")
    lm = np.asarray(landmarks, np.float64)
    gaps = [np.linalg.norm(lm[:, lo] - lm[:, up], axis=1) for up, lo in spec["pairs"]]
    left, right = spec["eyes"]
    iod = float(np.median(np.linalg.norm(lm[:, right] - lm[:, left], axis=1)))
    return (np.mean(gaps, axis=0) / max(iod, 1e-6)).astype(np.float64)


def _band_sos(sample_rate: int):
    from scipy.signal import butter

    hi = min(4000.0, 0.45 * sample_rate)
    return butter(4, [150.0, hi], btype="band", fs=sample_rate, output="sos")


def speech_envelope(audio: np.ndarray, sample_rate: int, fps: float) -> np.ndarray:
    """[N] log mean energy of the 150-4000 Hz band in each 1/fps window (N = len // window)."""
    from scipy.signal import sosfiltfilt

    hop = int(round(sample_rate / fps))
    x = np.asarray(audio, np.float64)
    if len(x) < 3 * hop:
        return np.zeros(len(x) // max(hop, 1))
    band = sosfiltfilt(_band_sos(sample_rate), x)
    n = len(band) // hop
    energy = (band[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    return np.log(energy + 1e-8)


def _region_box(points: np.ndarray, scale: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    cx, cy = points[:, 0].mean(), points[:, 1].mean()
    half = 0.5 * scale * max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1])), 4.0)
    w, h = size
    x0, x1 = int(max(cx - half, 0)), int(min(cx + half, w))
    y0, y1 = int(max(cy - half, 0)), int(min(cy + half, h))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def _patch(gray: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    import cv2

    x0, y0, x1, y1 = box
    return cv2.resize(gray[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def _regions(pts: Optional[np.ndarray], box: Optional[np.ndarray], landmark_format: str, size: tuple[int, int]):
    """(mouth box, nose box) in pixels: from ibug-68 landmarks, else from the face box (the mouth
    sits in the lower middle of any detector's box; close enough for a motion measure)."""
    spec = _LIPS.get(landmark_format)
    if spec is not None and pts is not None:
        return _region_box(pts[spec["mouth"]], 1.3, size), _region_box(pts[spec["nose"]], 1.0, size)
    x0, y0, x1, y1 = [float(v) for v in box]
    w, h = x1 - x0, y1 - y0
    mouth = np.array([[x0 + 0.3 * w, y0 + 0.68 * h], [x0 + 0.7 * w, y0 + 0.92 * h]])
    nose = np.array([[x0 + 0.42 * w, y0 + 0.35 * h], [x0 + 0.58 * w, y0 + 0.55 * h]])
    return _region_box(mouth, 1.0, size), _region_box(nose, 1.0, size)


def mouth_motion(frames: Sequence[np.ndarray], landmarks: np.ndarray, landmark_format: str = "ibug68",
                 side: int = 32, boxes: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """[T] mean |change| (grey levels, 0-255) of the mouth patch between frame t-1 and t, minus
    that of a nose-bridge patch of the same frames; frame 0 copies frame 1. The regions come from
    ibug-68 landmarks, else from ``boxes`` (face boxes); None when neither is available.

    Regions follow each frame's landmarks and both frames are cut with the same region, so
    landmark jitter does not count as motion; the nose reference cancels global motion (a pan
    or zoom over a still photo), blur and compression flicker.
    """
    import cv2

    if len(frames) == 0 or (landmark_format not in _LIPS and boxes is None):
        return None
    lm = np.asarray(landmarks, np.float64) if landmarks is not None else None
    out = np.zeros(len(frames), np.float32)
    prev_gray = None
    for i, frame in enumerate(frames):
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        if prev_gray is not None:
            # Both frames are cut with this frame's boxes: landmark jitter moves the box, not the
            # pixels under it, so a frozen picture scores ~0 however much the landmarks wobble.
            size = (gray.shape[1], gray.shape[0])
            mouth_box, nose_box = _regions(None if lm is None else lm[i], None if boxes is None else boxes[i],
                                           landmark_format, size)
            mouth = float(np.abs(_patch(gray, mouth_box, side) - _patch(prev_gray, mouth_box, side)).mean())
            nose = float(np.abs(_patch(gray, nose_box, side) - _patch(prev_gray, nose_box, side)).mean())
            out[i] = max(mouth - nose, 0.0)
        prev_gray = gray
    if len(out) > 1:
        out[0] = out[1]
    return out


def mouth_darkness(frames: Sequence[np.ndarray], landmarks: np.ndarray, landmark_format: str = "ibug68",
                   side: int = 32) -> Optional[np.ndarray]:
    """[T] mean darkness (255 - grey) of the inner-mouth region relative to the whole mouth patch:
    it rises when the mouth opens onto the dark oral cavity. A pixel cue that does not depend on
    lip landmarks being exact (teeth can make an open mouth brighter, so it is one cue of two)."""
    spec = _LIPS.get(landmark_format)
    if spec is None or len(frames) == 0:
        return None
    import cv2

    lm = np.asarray(landmarks, np.float64)
    inner = list(range(60, 68)) if landmark_format == "ibug68" else spec["mouth"]
    out = np.zeros(len(frames), np.float32)
    for i, (frame, pts) in enumerate(zip(frames, lm)):
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        size = (gray.shape[1], gray.shape[0])
        mouth = _patch(gray, _region_box(pts[spec["mouth"]], 1.3, size), side)
        # the inner-lip box is flat when the mouth is closed: take a fixed-height band around it
        c = pts[inner].mean(axis=0)
        width = max(float(np.ptp(pts[spec["mouth"]][:, 0])), 4.0)
        x0, x1 = int(max(c[0] - 0.3 * width, 0)), int(min(c[0] + 0.3 * width, size[0]))
        y0, y1 = int(max(c[1] - 0.15 * width, 0)), int(min(c[1] + 0.15 * width, size[1]))
        band = gray[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].astype(np.float32)
        out[i] = float(mouth.mean() - band.mean())
    return out
