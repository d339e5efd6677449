"""One face pass per video for the face metrics: boxes, 68 landmarks, identity embeddings.

Landmarks always come from dlib's 68-point predictor (iBUG-68, shipped in the
``face-recognition-models`` wheel), because the landmark expression descriptor and the offline
sync scorer need that layout. Identity embeddings (F-SIM) come from dlib's 128-d ResNet by
default, or from ArcFace (InsightFace pack from a local directory) when asked.

Faces are detected in every frame; a frame where the detector finds nothing (a small or broken
generated face) takes the *fallback box* (the ground-truth clip's box scaled to the frame), and
the count of such frames is reported with the metric, so a number built on fallbacks shows it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .weights import WeightsInfo, file_sha256


@dataclass
class FaceTrack:
    boxes: np.ndarray                 # [T, 4] float32, frame pixels
    detected: np.ndarray              # [T] bool: False = the fallback box was used
    landmarks: np.ndarray             # [T, 68, 2] float32, frame pixels (iBUG-68)
    embeddings: Optional[np.ndarray]  # [T, E] float32 identity embeddings, or None

    @property
    def fallback_frames(self) -> int:
        return int((~self.detected).sum())


def _eval_face_config(backend: str, model_root: Optional[str]):
    from emo_data.config import FaceConfig

    # no size floor: generated frames may be small, and every frame holds exactly one face
    return FaceConfig(backend=backend, model_root=model_root, min_face_fraction=0.0, min_face_px=0,
                      detect_max_side=320, upsample=0)


class FaceAnalyzer:
    """Loads the face models once; :meth:`track` analyses one video."""

    def __init__(self, identity_backend: Optional[str] = "dlib", model_root: Optional[str] = None):
        """``identity_backend``: "dlib" | "insightface" | None (landmarks only; see :meth:`load_identity`)."""
        from emo_data.faces.dlib_backend import SHAPE_68, DlibBackend, dlib_model_dir

        self.landmarker = DlibBackend(_eval_face_config("dlib", None))
        self.landmarker.setup()
        dlib_dir = dlib_model_dir(None)
        self.landmark_weights = WeightsInfo(f"{dlib_dir}/{SHAPE_68}", file_sha256(f"{dlib_dir}/{SHAPE_68}"))
        self.identity = None
        self.identity_name: Optional[str] = None
        self.identity_weights: list[WeightsInfo] = []
        self.identity_label = ""
        if identity_backend is not None:
            self.load_identity(identity_backend, model_root)

    def load_identity(self, identity_backend: str, model_root: Optional[str] = None) -> None:
        """Set up the identity embedding (F-SIM); raises when its weights are missing."""
        from emo_data.faces.dlib_backend import RESNET, dlib_model_dir

        name = identity_backend.lower()
        if name == "dlib":
            path = f"{dlib_model_dir(None)}/{RESNET}"
            self.identity = self.landmarker
            self.identity_weights = [WeightsInfo(path, file_sha256(path))]
            self.identity_label = "dlib ResNet 128-d (face-recognition-models)"
        elif name in ("insightface", "arcface"):
            import glob

            from emo_data.faces.insightface_backend import InsightFaceBackend, find_pack_dir

            backend = InsightFaceBackend(_eval_face_config("insightface", model_root))
            backend.setup()  # raises FaceBackendUnavailable without a local pack
            self.identity = backend
            pack = find_pack_dir(model_root)
            self.identity_weights = [WeightsInfo(p, file_sha256(p)) for p in sorted(glob.glob(f"{pack}/*.onnx"))]
            self.identity_label = "ArcFace 512-d (InsightFace pack)"
        else:
            raise ValueError(f"unknown identity backend {identity_backend!r} (dlib | insightface)")
        self.identity_name = name

    def detect_box(self, frame: np.ndarray) -> Optional[np.ndarray]:
        faces = self.landmarker.detect(frame)
        if not faces:
            return None
        best = max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
        return np.asarray(best.box, np.float32)

    def track(self, frames: np.ndarray, fallback_boxes: np.ndarray, embed: bool = True,
              embed_stride: int = 1) -> FaceTrack:
        """``frames`` [T, H, W, 3] uint8; ``fallback_boxes`` [T, 4] in the same pixels."""
        from emo_data.types import Face

        T = len(frames)
        boxes = np.zeros((T, 4), np.float32)
        detected = np.zeros(T, bool)
        landmarks = np.zeros((T, 68, 2), np.float32)
        embeddings = None
        for t in range(T):
            frame = np.ascontiguousarray(frames[t])
            box = self.detect_box(frame)
            detected[t] = box is not None
            boxes[t] = box if box is not None else fallback_boxes[min(t, len(fallback_boxes) - 1)]
            landmarks[t] = self.landmarker.landmarks(frame, [boxes[t]])[0]
            if embed and self.identity is not None and t % embed_stride == 0:
                emb = self.identity.embed(frame, Face(box=boxes[t], landmarks=landmarks[t] if self.identity_name == "dlib" else None))
                if embeddings is None:
                    embeddings = np.full((T, len(emb)), np.nan, np.float32)
                embeddings[t] = emb
        return FaceTrack(boxes=boxes, detected=detected, landmarks=landmarks, embeddings=embeddings)

    def embed_reference(self, image: np.ndarray, fallback_box: np.ndarray) -> tuple[np.ndarray, bool]:
        """(embedding, detected) of the reference portrait."""
        track = self.track(image[None], np.asarray(fallback_box, np.float32)[None], embed=True)
        return track.embeddings[0], bool(track.detected[0])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``a`` [N, E] with ``b`` [E] (NaN rows stay NaN)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a @ b) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b) + 1e-12)
