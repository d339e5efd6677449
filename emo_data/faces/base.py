"""Face backend protocol shared by the dlib, InsightFace and face-alignment adapters.

A backend holds the per-worker models (``setup()`` loads them once) and answers three
questions about a full RGB frame: where are the faces (``detect``), where are their landmarks
(``landmarks``) and who is it (``embed``). Every coordinate goes in and out in full-frame
pixels; ``detect`` downscales internally to ``FaceConfig.detect_max_side`` for speed.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from emo_data.config import FaceConfig
from emo_data.types import Face


class FaceBackendUnavailable(RuntimeError):
    """A face backend's models are missing (e.g. no weights on an offline machine)."""


def unavailable_hint(backend: str, detail: str) -> str:
    return (
        f"face backend {backend!r} is unavailable: {detail}. "
        "Point --face-model-root (FaceConfig.model_root) at a local directory holding the "
        "weights, or use the offline default backend 'dlib' (--face-backend dlib)."
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / ua) if ua > 0 else 0.0


def iou_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(a), len(b)), dtype=np.float32)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i, j] = box_iou(x, y)
    return out


def min_face_side(config: FaceConfig, width: int, height: int) -> float:
    """Smallest accepted face (long box side, source pixels) in a width x height frame."""
    return max(float(config.min_face_fraction or 0.0) * min(width, height), float(getattr(config, "min_face_px", 0) or 0))


class FaceBackend:
    """Base class: subclasses set the class attributes and implement the four methods."""

    name: str = "base"
    landmark_count: int = 68
    landmark_format: str = "ibug68"
    embedding_dim: int = 128
    provides_pose: bool = False

    def __init__(self, config: FaceConfig):
        self.config = config
        self._is_setup = False

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models once per worker. Raises FaceBackendUnavailable when weights are missing."""
        self._is_setup = True

    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    # -- API -------------------------------------------------------------------------------
    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        """Faces in ``frame_rgb`` (H, W, 3 uint8 RGB), boxes in full-frame pixels."""
        self.ensure_setup()
        small, scale = self.downscale(frame_rgb)
        return self.detect_prescaled(small, scale, frame_rgb.shape)

    def detect_prescaled(self, small: np.ndarray, scale: float, full_shape: tuple[int, ...]) -> list[Face]:
        """Like ``detect`` for a frame the caller already shrank by ``scale`` (e.g. with FFmpeg's
        scaler while decoding, which is much cheaper than resizing the full RGB frame)."""
        self.ensure_setup()
        boxes, scores = self._detect_small(np.ascontiguousarray(small))
        faces = []
        for box, score in zip(boxes, scores):
            box = np.asarray(box, dtype=np.float32) / scale
            faces.append(Face(box=box.astype(np.float32), score=float(score)))
        return self.filter_small(faces, full_shape)

    def landmarks(self, frame_rgb: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """[K, 2] float32 landmarks per box, full-frame coordinates."""
        return self.landmarks_and_pose(frame_rgb, boxes)[0]

    def landmarks_and_pose(
        self, frame_rgb: np.ndarray, boxes: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[Optional[np.ndarray]]]:
        """Landmarks plus, for backends with ``provides_pose``, a [6] pose per box (else None)."""
        raise NotImplementedError

    def landmarks_for_pose(
        self, frame_rgb: np.ndarray, boxes: list[np.ndarray]
    ) -> tuple[list[np.ndarray], list[Optional[np.ndarray]]]:
        """Landmarks plus, per box, the face's ibug-68 points ([68, 2] full-frame pixels) that head
        pose is solved from (None when the backend has none). For ibug-68 backends these are the
        landmarks themselves; InsightFace answers with its 3-D 68-point model's image points."""
        lms = self.landmarks_and_pose(frame_rgb, boxes)[0]
        if self.landmark_format != "ibug68":
            return lms, [None] * len(lms)
        return lms, [lm if lm is not None and np.shape(lm) == (68, 2) else None for lm in lms]

    def embed(self, frame_rgb: np.ndarray, face: Face) -> np.ndarray:
        """[embedding_dim] float32 identity embedding of ``face`` in ``frame_rgb``."""
        raise NotImplementedError

    # -- helpers for subclasses ------------------------------------------------------------
    def _detect_small(self, small_rgb: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        """Detect on the downscaled frame; boxes in downscaled pixels."""
        raise NotImplementedError

    # Image around a box (fraction of the box size on each side) that the landmark model reads:
    # the tracker hands it a crop of this much context, not the whole frame.
    landmark_context = 0.6

    # Smallest face (px) the detector finds in the image it sees; subclasses override (dlib's
    # HOG window is 80 px, SCRFD / S3FD anchors start at 16 px).
    detector_min_face_px = 80

    def detection_scale(self, width: int, height: int) -> float:
        """Scale for detection: as small as ``detect_max_side`` allows, but never so small that a
        face at the size limit (``min_face_fraction`` of the short side) drops below what the
        detector can see. Never upscales."""
        scale = 1.0
        max_side = int(self.config.detect_max_side or 0)
        if max_side > 0 and max(width, height) > max_side:
            scale = max_side / float(max(width, height))
        smallest = min_face_side(self.config, width, height)
        if smallest > 0:
            scale = max(scale, self.detector_min_face_px / smallest)
        return min(scale, 1.0)

    def downscale(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """Resize for detection (see ``detection_scale``); returns (image, scale)."""
        h, w = frame_rgb.shape[:2]
        scale = self.detection_scale(w, h)
        if scale >= 1.0:
            return np.ascontiguousarray(frame_rgb), 1.0
        size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        small = cv2.resize(frame_rgb, size, interpolation=cv2.INTER_AREA)
        # use the exact ratio actually applied on x (rounding) for the back-projection
        return np.ascontiguousarray(small), size[0] / float(w)

    def filter_small(self, faces: list[Face], shape: tuple[int, ...]) -> list[Face]:
        """Drop faces far below the size limit (under half of ``min_face_fraction`` x the short
        side): background faces in a crowd. Faces between that and the limit are kept so that
        clip selection can reject them as too small, with that reason."""
        limit = 0.5 * min_face_side(self.config, shape[1], shape[0])
        if limit <= 0:
            return faces
        return [f for f in faces if max(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= limit]
