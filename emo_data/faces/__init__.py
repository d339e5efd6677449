"""Face detection, landmarks, identity embeddings and tracking behind one backend interface.

``make_face_backend(FaceConfig)`` returns the backend named by ``config.backend``:

- ``dlib`` (offline default): HOG detector, 68-point ibug landmarks, 128-d ResNet embedding.
- ``insightface``: buffalo_l-style ONNX pack from ``model_root`` (106 landmarks, pose, 512-d).
- ``face_alignment``: S3FD + 2D-FAN-4 (68 ibug landmarks) from ``model_root``; dlib embedding.

Backends whose weights are missing raise :class:`FaceBackendUnavailable` from ``setup()``.
"""
from __future__ import annotations

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, FaceBackendUnavailable, box_iou
from emo_data.faces.tracker import FaceTracker

BACKENDS = ("dlib", "insightface", "face_alignment")


def make_face_backend(config: FaceConfig) -> FaceBackend:
    """Build (but do not set up) the backend named by ``config.backend``."""
    name = (config.backend or "dlib").lower().replace("-", "_")
    if name == "dlib":
        from emo_data.faces.dlib_backend import DlibBackend

        return DlibBackend(config)
    if name == "insightface":
        from emo_data.faces.insightface_backend import InsightFaceBackend

        return InsightFaceBackend(config)
    if name in ("face_alignment", "fan"):
        from emo_data.faces.fan_backend import FaceAlignmentBackend

        return FaceAlignmentBackend(config)
    raise ValueError(f"unknown face backend {config.backend!r}; choose one of {BACKENDS}")


__all__ = [
    "BACKENDS",
    "FaceBackend",
    "FaceBackendUnavailable",
    "FaceTracker",
    "box_iou",
    "make_face_backend",
]
