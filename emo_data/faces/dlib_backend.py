"""dlib backend (the offline default): HOG detector, 68-point shape predictor, 128-d ResNet.

The ``.dat`` weights come from the ``face-recognition-models`` wheel. Its ``__init__`` imports
``pkg_resources`` (removed from current setuptools), so the package is located with
``importlib.util.find_spec`` and never imported.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import numpy as np

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, FaceBackendUnavailable, unavailable_hint
from emo_data.types import Face

SHAPE_68 = "shape_predictor_68_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_model_dir(model_root: Optional[str] = None) -> str:
    """Directory holding dlib's .dat files: ``model_root`` if it has them, else the wheel's."""
    if model_root and os.path.isfile(os.path.join(model_root, SHAPE_68)):
        return model_root
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceBackendUnavailable(
            unavailable_hint(
                "dlib",
                f"{SHAPE_68} not found (install face-recognition-models or put the .dat files "
                "in the model root)",
            )
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


def _rect(box: np.ndarray):
    import dlib

    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return dlib.rectangle(x0, y0, x1, y1)


class DlibBackend(FaceBackend):
    name = "dlib"
    landmark_count = 68
    landmark_format = "ibug68"
    embedding_dim = 128
    provides_pose = False
    # HOG box vs. 68-point bounding box (measured on a frontal talking head): about as wide,
    # top ~10 % above the brows' top, bottom ~7 % above the chin.
    landmark_box_prior = (-0.02, -0.10, 0.02, -0.07)
    detector_min_face_px = 80  # HOG sliding window (upsample=1 halves it, at ~4x the cost)
    # the shape predictor reads pixels near the box: on the samples, crops with 0.2 of the box
    # on each side gave the same landmarks as the whole frame (0.1 did not)
    landmark_context = 0.3

    def detection_scale(self, width: int, height: int) -> float:
        # each pyramid upsampling doubles the image dlib searches, halving the visible minimum
        up = 2 ** max(0, int(self.config.upsample))
        saved = self.detector_min_face_px
        self.detector_min_face_px = saved / up
        try:
            return super().detection_scale(width, height)
        finally:
            self.detector_min_face_px = saved

    def __init__(self, config: FaceConfig):
        super().__init__(config)
        self._detector = None
        self._predictor = None
        self._facerec = None

    def setup(self) -> None:
        try:
            import dlib
        except ImportError as exc:  # pragma: no cover - dlib-bin is a core dependency
            raise FaceBackendUnavailable(unavailable_hint("dlib", f"cannot import dlib ({exc})")) from exc
        model_dir = dlib_model_dir(self.config.model_root)
        for fname in (SHAPE_68, RESNET):
            if not os.path.isfile(os.path.join(model_dir, fname)):
                raise FaceBackendUnavailable(unavailable_hint("dlib", f"missing {fname} in {model_dir}"))
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(os.path.join(model_dir, SHAPE_68))
        self._facerec = dlib.face_recognition_model_v1(os.path.join(model_dir, RESNET))
        self._is_setup = True

    def _detect_small(self, small_rgb):
        rects, scores, _ = self._detector.run(small_rgb, int(self.config.upsample), 0.0)
        boxes = [np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32) for r in rects]
        return boxes, [float(s) for s in scores]

    def _shape(self, frame_rgb: np.ndarray, box: np.ndarray):
        return self._predictor(frame_rgb, _rect(box))

    def landmarks_and_pose(self, frame_rgb, boxes):
        self.ensure_setup()
        img = np.ascontiguousarray(frame_rgb)
        out = []
        for box in boxes:
            shape = self._shape(img, box)
            out.append(np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32))
        return out, [None] * len(out)

    def embed(self, frame_rgb, face: Face) -> np.ndarray:
        self.ensure_setup()
        return dlib_embedding(self._facerec, self._predictor, frame_rgb, face)


def dlib_embedding(facerec, predictor, frame_rgb: np.ndarray, face: Face) -> np.ndarray:
    """dlib's 128-d descriptor; uses ``face.landmarks`` (ibug-68) when present, else predicts them."""
    import dlib

    img = np.ascontiguousarray(frame_rgb)
    rect = _rect(face.box)
    if face.landmarks is not None and len(face.landmarks) == 68:
        pts = dlib.points()
        for x, y in np.asarray(face.landmarks):
            pts.append(dlib.point(int(round(float(x))), int(round(float(y)))))
        shape = dlib.full_object_detection(rect, pts)
    else:
        shape = predictor(img, rect)
    desc = facerec.compute_face_descriptor(img, shape, 0)
    return np.asarray(desc, dtype=np.float32)
