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

Head pose (docs/pose.md): for backends that give ibug-68 points (dlib and face-alignment
landmarks, InsightFace's 3-D 68-point model), each track stabilises their rigid points with
optical flow (:class:`~emo_data.faces.stabilizer.LandmarkStabilizer`; for ibug-68 landmarks the
stabilised points are what ``Face.landmarks`` holds) and solves its per-frame pose
(:class:`~emo_data.pose.PoseSolver`), returned as ``Face.pose``.

Tilted heads: detectors and landmark models are trained on upright faces (dlib's HOG loses a face
beyond about 25 degrees of roll). A track whose roll exceeds ``FaceConfig.derotate_above_deg``
gets its landmarks on a crop turned upright by the tracked roll (mapped back to the frame), and a
detection that misses it is retried on such an upright crop around the track before the track
counts as missed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, box_iou, iou_matrix
from emo_data.faces.stabilizer import LandmarkStabilizer
from emo_data.pose import PoseSolver
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
    landmarks: Optional[np.ndarray] = None      # last landmarks (backend format), frame pixels
    roll: float = 0.0                           # in-plane angle of the last ibug-68 points (deg)
    stabilizer: Optional[LandmarkStabilizer] = None  # of the ibug-68 pose points (docs/pose.md)
    solver: Optional[PoseSolver] = None


def roll_of(points68: np.ndarray) -> float:
    """In-plane angle (degrees, clockwise on screen positive) of the outer eye-corner line."""
    return math.degrees(math.atan2(float(points68[45][1]) - float(points68[36][1]),
                                   float(points68[45][0]) - float(points68[36][0])))


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


def upright_transform(center: np.ndarray, roll_deg: float, side: float, scale: float = 1.0) -> np.ndarray:
    """2x3 affine from frame pixels to a ``side * scale`` square crop centred on ``center`` in
    which a face tilted by ``roll_deg`` (clockwise on screen) stands upright."""
    import cv2

    m = cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(roll_deg), float(scale))
    m[:, 2] += np.array([side * scale / 2.0, side * scale / 2.0]) - np.asarray(center, np.float64)
    return m


def apply_affine(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, np.float64)
    return (pts @ m[:, :2].T + m[:, 2]).astype(np.float32)


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
        self.upright_detections_run = 0

    def reset(self) -> None:
        """Forget every track (call at scene cuts); the next update detects. Ids keep increasing."""
        self.tracks = []
        self._needs_detect = True

    # ------------------------------------------------------------------ detection
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
            if i not in matched_t and not self._found_upright(frame, t):
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

    def _tilted(self, t: _Track) -> bool:
        return t.landmarks is not None and abs(t.roll) > float(self.config.derotate_above_deg)

    def _upright_box(self, t: _Track, m: np.ndarray) -> np.ndarray:
        """The track's box as it would be on an upright crop made with affine ``m``."""
        rel = t.rel if t.rel is not None else self.prior
        return box_from_landmarks(apply_affine(m, t.landmarks), rel)

    def _found_upright(self, frame, t: _Track) -> bool:
        """A tilted track the detector missed: detect again on an upright crop around it (the
        detector's own size limits apply to the crop); a face there keeps the track."""
        if not self._tilted(t):
            return False
        import cv2

        image = frame.image if hasattr(frame, "image") else frame
        lb = landmark_box(t.landmarks)
        side = 2.5 * float(max(lb[2] - lb[0], lb[3] - lb[1]))
        scale = min(1.0, 2.5 * 160.0 / max(side, 1.0))  # the face ~160 px in the crop: HOG-sized
        m = upright_transform((lb[:2] + lb[2:]) / 2.0, t.roll, side, scale)
        size = max(int(round(side * scale)), 16)
        crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self.upright_detections_run += 1
        boxes, scores = self.backend._detect_small(np.ascontiguousarray(crop))
        expected = self._upright_box(t, m)
        best = max(((box_iou(np.asarray(b, np.float32), expected), s) for b, s in zip(boxes, scores)), default=(0.0, 0.0))
        if best[0] < self.match_iou:
            return False
        t.lost = 0
        t.score = float(best[1])
        return True

    # ------------------------------------------------------------------ landmarks and pose
    def _landmarks(self, image: np.ndarray, t: _Track) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(landmarks, ibug-68 pose points or None) for one track, upright when it is tilted."""
        if not self._tilted(t):
            # a crop around the box, not the frame: the backends convert what they are given
            # (dlib copies the whole image), and the landmarks are the same
            margin = float(getattr(self.backend, "landmark_context", 0.6))
            bw, bh = margin * float(t.box[2] - t.box[0]), margin * float(t.box[3] - t.box[1])
            h, w = image.shape[:2]
            x0, y0 = max(int(t.box[0] - bw), 0), max(int(t.box[1] - bh), 0)
            x1, y1 = min(int(np.ceil(t.box[2] + bw)) + 1, w), min(int(np.ceil(t.box[3] + bh)) + 1, h)
            if x1 - x0 < 8 or y1 - y0 < 8:
                lms, pts = self.backend.landmarks_for_pose(image, [t.box])
                return lms[0], pts[0]
            offset = np.array([x0, y0], np.float32)
            lms, pts = self.backend.landmarks_for_pose(image[y0:y1, x0:x1], [t.box - np.tile(offset, 2)])
            return lms[0] + offset, (None if pts[0] is None else pts[0] + offset)
        import cv2

        lb = landmark_box(t.landmarks)
        side = 2.0 * float(max(lb[2] - lb[0], lb[3] - lb[1]))
        m = upright_transform((lb[:2] + lb[2:]) / 2.0, t.roll, side)
        size = max(int(round(side)), 16)
        crop = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        lms, pts = self.backend.landmarks_for_pose(crop, [self._upright_box(t, m)])
        back = cv2.invertAffineTransform(m)
        return apply_affine(back, lms[0]), (None if pts[0] is None else apply_affine(back, pts[0]))

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
            image = frame.image if hasattr(frame, "image") else frame
            height, width = image.shape[:2]
            for k, t in enumerate(visible):
                lm, pts = self._landmarks(image, t)
                if pts is not None:
                    if t.stabilizer is None:
                        t.stabilizer = LandmarkStabilizer(float(self.config.landmark_flow_blend),
                                                          float(self.config.landmark_shape_blend))
                        t.solver = PoseSolver((width, height))
                    if self.config.landmark_flow_blend < 1.0 or self.config.landmark_shape_blend < 1.0:
                        pts = t.stabilizer.update(image, pts)
                    if self.backend.landmark_format == "ibug68":
                        lm = pts  # the stored landmarks carry the stabilised rigid points
                    poses[k] = t.solver.solve(pts).astype(np.float32)
                    t.roll = roll_of(pts)
                if t.fresh and not self._tilted(t):
                    t.rel = box_relation(t.box, lm)
                elif not t.fresh:
                    rel = t.rel if t.rel is not None else self.prior
                    t.box = box_from_landmarks(lm, rel)
                t.landmarks = lm
                lms[k] = lm
        return [
            Face(box=t.box.copy(), score=t.score, landmarks=lm, track_id=t.track_id, pose=pose)
            for t, lm, pose in zip(visible, lms, poses)
        ]
