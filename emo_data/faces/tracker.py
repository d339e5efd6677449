"""Detect-every-k face tracker.

``update`` runs the backend's detector on every ``detect_every``-th frame (and right after a
``reset()`` or whenever there are no tracks). Detections are associated to tracks greedily by
IoU, so ``track_id`` stays stable across a shot. Between detections the tracks are
propagated: when landmarks are requested they are predicted inside the previous box and the box
is re-fitted from them (so it follows the head); otherwise the box is held.

Box convention: the box returned is always in the detector's convention. Whenever landmarks are
computed on a freshly detected box the tracker learns, per track, where the detector's box sits
relative to the landmarks' bounding box (offsets in units of its width / height) and re-fits
propagated boxes with that relation; before it has learned one it uses the backend's
``landmark_box_prior``.

Faces returned are the tracks matched at the last detection ("visible now"); a track missed by
the detector is kept (not returned) for ``max_track_lost`` detections so that its id survives a
single miss, then dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, iou_matrix
from emo_data.types import Face

# Where the detector box sits relative to the landmark bounding box (x0, y0, x1, y1 offsets in
# units of the landmark box width/height), used until a track has learned its own relation.
DEFAULT_LANDMARK_BOX_PRIOR = (-0.02, -0.10, 0.02, -0.07)


@dataclass
class _Track:
    track_id: int
    box: np.ndarray
    score: float
    lost: int = 0                 # consecutive detections that missed this track
    fresh: bool = True            # box comes from a detection on this frame
    rel: Optional[np.ndarray] = None
    history: list = field(default_factory=list)


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    lo = landmarks.min(axis=0)
    hi = landmarks.max(axis=0)
    return np.array([lo[0], lo[1], hi[0], hi[1]], dtype=np.float32)


def box_relation(box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    lb = landmark_box(landmarks)
    w = max(float(lb[2] - lb[0]), 1.0)
    h = max(float(lb[3] - lb[1]), 1.0)
    return ((np.asarray(box, np.float32) - lb) / np.array([w, h, w, h], np.float32)).astype(np.float32)


def box_from_landmarks(landmarks: np.ndarray, rel: np.ndarray) -> np.ndarray:
    lb = landmark_box(landmarks)
    w = max(float(lb[2] - lb[0]), 1.0)
    h = max(float(lb[3] - lb[1]), 1.0)
    return (lb + np.asarray(rel, np.float32) * np.array([w, h, w, h], np.float32)).astype(np.float32)


class FaceTracker:
    def __init__(self, backend: FaceBackend, config: Optional[FaceConfig] = None,
                 match_iou: float = 0.3, detect_when_empty: bool = False):
        self.backend = backend
        # True: detect on every frame while no track exists (finds a new face at once, but
        # costs a detection per frame on face-less footage). False: keep the every-k schedule,
        # so a face that appears is found within detect_every frames.
        self.detect_when_empty = detect_when_empty
        self.config = config or backend.config
        self.match_iou = match_iou
        self.prior = np.asarray(
            getattr(backend, "landmark_box_prior", DEFAULT_LANDMARK_BOX_PRIOR), np.float32
        )
        self._next_id = 0
        self.tracks: list[_Track] = []
        self._needs_detect = True
        self.detections_run = 0

    def reset(self) -> None:
        """Forget every track (call at scene cuts); the next update detects. Ids keep increasing."""
        self.tracks = []
        self._needs_detect = True

    def _detect(self, frame) -> None:
        self.detections_run += 1
        if hasattr(frame, "resized"):  # a DecodedFrame: let FFmpeg shrink it for the detector
            width, height = frame.size
            scale = self.backend.detection_scale(width, height)
            if scale < 1.0:
                small_w, small_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
                dets = self.backend.detect_prescaled(frame.resized(small_w, small_h), small_w / float(width), (height, width))
            else:
                dets = self.backend.detect(frame.image)
        else:
            dets = self.backend.detect(frame)
        for t in self.tracks:
            t.fresh = False
        ious = iou_matrix([t.box for t in self.tracks], [d.box for d in dets])
        matched_t: set[int] = set()
        matched_d: set[int] = set()
        if ious.size:
            order = np.dstack(np.unravel_index(np.argsort(-ious, axis=None), ious.shape))[0]
            for ti, di in order:
                if ious[ti, di] < self.match_iou:
                    break
                if ti in matched_t or di in matched_d:
                    continue
                matched_t.add(int(ti))
                matched_d.add(int(di))
                t = self.tracks[ti]
                t.box = dets[di].box.astype(np.float32).copy()
                t.score = float(dets[di].score)
                t.lost = 0
                t.fresh = True
        kept = []
        for i, t in enumerate(self.tracks):
            if i not in matched_t:
                t.lost += 1
                if t.lost > int(self.config.max_track_lost):
                    continue
            kept.append(t)
        for j, d in enumerate(dets):
            if j not in matched_d:
                kept.append(_Track(self._next_id, d.box.astype(np.float32).copy(), float(d.score)))
                self._next_id += 1
        self.tracks = kept
        self._needs_detect = False

    def update(self, frame, frame_index: int, need_landmarks: bool) -> list[Face]:
        """``frame``: an RGB array, or a :class:`emo_data.decode.DecodedFrame` (converted lazily).

        Detection runs every ``detect_every`` frames and right after a reset; with
        ``detect_when_empty`` also on every frame while no track exists."""
        every = max(1, int(self.config.detect_every))
        empty = self.detect_when_empty and not self.tracks
        if self._needs_detect or empty or frame_index % every == 0:
            self._detect(frame)
        else:
            for t in self.tracks:
                t.fresh = False
        visible = [t for t in self.tracks if t.lost == 0]
        lms: list[Optional[np.ndarray]] = [None] * len(visible)
        poses: list[Optional[np.ndarray]] = [None] * len(visible)
        if need_landmarks and visible:
            frame_rgb = frame.image if hasattr(frame, "image") else frame
            lms, poses = self.backend.landmarks_and_pose(frame_rgb, [t.box for t in visible])
            for t, lm in zip(visible, lms):
                if t.fresh:
                    t.rel = box_relation(t.box, lm)
                else:
                    rel = t.rel if t.rel is not None else self.prior
                    t.box = box_from_landmarks(lm, rel)
        return [
            Face(box=t.box.copy(), score=t.score, landmarks=lm, track_id=t.track_id, pose=pose)
            for t, lm, pose in zip(visible, lms, poses)
        ]
