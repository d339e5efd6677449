"""face-alignment backend: S3FD detector + 2D-FAN-4 (68 ibug landmarks), weights from disk.

``face_alignment.FaceAlignment`` downloads its weights into the torch hub cache at
construction, which fails offline. This adapter never lets it: ``setup()`` looks for the two
files in ``FaceConfig.model_root`` (or ``$TORCH_HOME/hub/checkpoints`` when no root is given)
and raises :class:`FaceBackendUnavailable` if either is missing:

- ``s3fd*.pth``        (face_alignment's ``s3fd-619a316812.pth``)
- ``2DFAN4*.pth.tar``  (face_alignment's ``2DFAN4-11f355bf06.pth.tar``; a plain state dict)

FAN has no identity model, so ``embed`` uses dlib's 128-d ResNet descriptor (from the
face-recognition-models wheel) on the FAN landmarks: ``embedding_dim`` is 128, comparable
with the dlib backend's embeddings.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import numpy as np

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, FaceBackendUnavailable, unavailable_hint
from emo_data.types import Face

S3FD_GLOB = "s3fd*.pth"
FAN_GLOB = "2DFAN4*.pth.tar"


def _torch_hub_checkpoints() -> str:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return os.path.join(torch_home, "hub", "checkpoints")


def find_fan_weights(model_root: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    root = os.path.expanduser(model_root) if model_root else _torch_hub_checkpoints()
    dirs = [root, os.path.join(root, "face_alignment"), os.path.join(root, "hub", "checkpoints")]
    s3fd = fan = None
    for d in dirs:
        s3fd = s3fd or next(iter(sorted(glob.glob(os.path.join(d, S3FD_GLOB)))), None)
        fan = fan or next(iter(sorted(glob.glob(os.path.join(d, FAN_GLOB)))), None)
    return s3fd, fan


class FaceAlignmentBackend(FaceBackend):
    name = "face_alignment"
    landmark_count = 68
    landmark_format = "ibug68"
    embedding_dim = 128
    provides_pose = False
    landmark_box_prior = (-0.05, -0.10, 0.05, 0.02)
    detector_min_face_px = 20  # S3FD: smallest anchors are 16 px at stride 4
    # FAN crops ~2x the box around a centre raised by 0.12 of its height
    landmark_context = 0.7

    def __init__(self, config: FaceConfig, flip_input: bool = False, det_thresh: float = 0.5):
        super().__init__(config)
        self.flip_input = flip_input
        self.det_thresh = det_thresh
        self._fa = None
        self._detector = None
        self._dlib = None  # (facerec, predictor) for embeddings

    def setup(self) -> None:
        s3fd, fan = find_fan_weights(self.config.model_root)
        missing = [n for n, p in (("s3fd*.pth", s3fd), ("2DFAN4*.pth.tar", fan)) if p is None]
        if missing:
            where = self.config.model_root or _torch_hub_checkpoints()
            raise FaceBackendUnavailable(
                unavailable_hint(
                    "face_alignment",
                    f"missing {', '.join(missing)} in {where}; face_alignment would try to "
                    "download them",
                )
            )
        self._build(s3fd, fan)
        self._is_setup = True

    def _build(self, s3fd_path: str, fan_path: str) -> None:
        import torch
        from face_alignment.api import FaceAlignment, LandmarksType
        from face_alignment.detection.sfd.sfd_detector import SFDDetector
        from face_alignment.models import FAN

        detector = SFDDetector(device="cpu", path_to_detector=s3fd_path,
                               filter_threshold=self.det_thresh)
        net = FAN(4)
        state = torch.load(fan_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        net.load_state_dict(state)
        net.eval()
        # FaceAlignment.__init__ would download; build the object around our modules instead
        # and reuse its (pre/post-processing) get_landmarks_from_image.
        fa = FaceAlignment.__new__(FaceAlignment)
        fa.device = "cpu"
        fa.flip_input = self.flip_input
        fa.landmarks_type = LandmarksType.TWO_D
        fa.verbose = False
        fa.dtype = torch.float32
        fa.max_batch_size = 4
        fa.face_detector = detector
        fa.face_alignment_net = net
        self._fa = fa
        self._detector = detector

    def _detect_small(self, small_rgb):
        import torch

        with torch.no_grad():
            dets = self._detector.detect_from_image(small_rgb.copy())
        boxes = [np.asarray(d[:4], np.float32) for d in dets]
        scores = [float(d[4]) for d in dets]
        return boxes, scores

    def landmarks_and_pose(self, frame_rgb, boxes):
        self.ensure_setup()
        if not boxes:
            return [], []
        # float64: face_alignment assigns numpy scalars into torch tensors (float32 fails)
        dets = [np.r_[np.asarray(b, np.float64), 1.0] for b in boxes]
        lms = self._fa.get_landmarks_from_image(np.ascontiguousarray(frame_rgb), detected_faces=dets)
        out = [np.asarray(lm, np.float32)[:, :2] for lm in lms]
        return out, [None] * len(out)

    def embed(self, frame_rgb, face: Face) -> np.ndarray:
        self.ensure_setup()
        if self._dlib is None:
            import dlib

            from emo_data.faces.dlib_backend import RESNET, SHAPE_68, dlib_model_dir

            d = dlib_model_dir(None)
            self._dlib = (dlib.face_recognition_model_v1(os.path.join(d, RESNET)),
                          dlib.shape_predictor(os.path.join(d, SHAPE_68)))
        from emo_data.faces.dlib_backend import dlib_embedding

        return dlib_embedding(self._dlib[0], self._dlib[1], frame_rgb, face)
