"""InsightFace backend: an ONNX model pack such as ``buffalo_l`` read from a local directory.

Gives SCRFD boxes, 106 landmarks (``landmark_2d_106``), a head pose from the 3-D 68-point model
(``landmark_3d_68``; insightface reports pitch, yaw, roll) and a 512-d ArcFace
``normed_embedding``. InsightFace downloads missing packs from GitHub, which fails (or hangs) on
an offline machine, so ``setup()`` first checks that a pack directory with ``.onnx`` files
exists and raises :class:`FaceBackendUnavailable` otherwise; ``FaceAnalysis`` is only called on
a directory path (which it loads without any download).

Pack directory lookup (first hit wins): ``model_root`` itself if it holds ``.onnx`` files, then
``model_root/models/<pack>``, ``model_root/<pack>``; without ``model_root``,
``~/.insightface/models/<pack>``.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import cv2
import numpy as np

from emo_data.config import FaceConfig
from emo_data.faces.base import FaceBackend, FaceBackendUnavailable, box_iou, unavailable_hint
from emo_data.types import Face

DEFAULT_PACK = "buffalo_l"
# ArcFace 112x112 alignment template (eyes, nose, mouth corners), used to fabricate 5 key points
# from a box when the detector does not re-find the face to embed.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32,
) / 112.0


def _has_onnx(path: str) -> bool:
    return os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.onnx")))


def find_pack_dir(model_root: Optional[str], pack: str = DEFAULT_PACK) -> Optional[str]:
    if model_root:
        root = os.path.expanduser(model_root)
        for cand in (root, os.path.join(root, "models", pack), os.path.join(root, pack)):
            if _has_onnx(cand):
                return cand
        return None
    cand = os.path.expanduser(os.path.join("~", ".insightface", "models", pack))
    return cand if _has_onnx(cand) else None


def insightface_pose_to_row(pose_pyr: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """insightface ``face.pose`` (pitch, yaw, roll deg) -> our (yaw, pitch, roll, 0, 0, 0).

    Translation is unknown (zeros); angle signs are insightface's. Speeds only use relative
    rotations, so a consistent sign convention does not change them.
    """
    if pose_pyr is None:
        return None
    p = np.asarray(pose_pyr, dtype=np.float32).ravel()
    return np.array([p[1], p[0], p[2], 0.0, 0.0, 0.0], dtype=np.float32)


class InsightFaceBackend(FaceBackend):
    name = "insightface"
    landmark_count = 106
    landmark_format = "insightface106"
    embedding_dim = 512
    provides_pose = True
    # SCRFD box vs 106-point bounding box; learned per track by the tracker anyway.
    landmark_box_prior = (-0.03, -0.15, 0.03, 0.02)
    detector_min_face_px = 20  # SCRFD: smallest anchors are 16 px at stride 8
    landmark_context = 0.3     # the 2d106 / 3d68 models read 1.5x the box around its centre

    def __init__(self, config: FaceConfig, pack: str = DEFAULT_PACK, det_thresh: float = 0.5):
        super().__init__(config)
        self.pack = pack
        self.det_thresh = det_thresh
        self._app = None
        self.models: dict = {}

    def setup(self) -> None:
        pack_dir = find_pack_dir(self.config.model_root, self.pack)
        if pack_dir is None:
            where = self.config.model_root or "~/.insightface/models"
            raise FaceBackendUnavailable(
                unavailable_hint(
                    "insightface",
                    f"no .onnx files for pack {self.pack!r} under {where} (looked in the root, "
                    f"models/{self.pack} and {self.pack}); insightface would try to download it",
                )
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise FaceBackendUnavailable(unavailable_hint("insightface", f"cannot import ({exc})")) from exc
        app = FaceAnalysis(
            name=pack_dir,
            root=os.path.dirname(pack_dir),
            allowed_modules=["detection", "landmark_2d_106", "landmark_3d_68", "recognition"],
            providers=["CPUExecutionProvider"],
        )
        side = max(32, int(round(self.config.detect_max_side / 32.0)) * 32)
        app.prepare(ctx_id=-1, det_thresh=self.det_thresh, det_size=(side, side))
        self._app = app
        self.models = dict(app.models)
        if "landmark_2d_106" not in self.models:
            raise FaceBackendUnavailable(
                unavailable_hint("insightface", f"pack {pack_dir} has no 2d106 landmark model")
            )
        self._is_setup = True

    # insightface models take BGR images
    def _detect_small(self, small_rgb):
        bgr = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2BGR)
        bboxes, _ = self.models["detection"].detect(bgr, max_num=0, metric="default")
        if bboxes is None or len(bboxes) == 0:
            return [], []
        return [b[:4].astype(np.float32) for b in bboxes], [float(b[4]) for b in bboxes]

    def landmarks_and_pose(self, frame_rgb, boxes):
        self.ensure_setup()
        from insightface.app.common import Face as IFace

        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        lms, poses = [], []
        for box in boxes:
            f = IFace(bbox=np.asarray(box, np.float32))
            self.models["landmark_2d_106"].get(bgr, f)
            lms.append(np.asarray(f.landmark_2d_106, np.float32)[:, :2])
            pose = None
            if "landmark_3d_68" in self.models:
                self.models["landmark_3d_68"].get(bgr, f)
                pose = insightface_pose_to_row(f.get("pose"))
            poses.append(pose)
        return lms, poses

    def landmarks_for_pose(self, frame_rgb, boxes):
        """106 landmarks plus the image points of the 3-D 68-point model (ibug-68 order), which
        head pose is solved from (None without a ``landmark_3d_68`` model)."""
        self.ensure_setup()
        from insightface.app.common import Face as IFace

        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        lms, points = [], []
        for box in boxes:
            f = IFace(bbox=np.asarray(box, np.float32))
            self.models["landmark_2d_106"].get(bgr, f)
            lms.append(np.asarray(f.landmark_2d_106, np.float32)[:, :2])
            pts = None
            if "landmark_3d_68" in self.models:
                self.models["landmark_3d_68"].get(bgr, f)
                lm3d = f.get("landmark_3d_68")
                if lm3d is not None and np.shape(lm3d)[0] == 68:
                    pts = np.asarray(lm3d, np.float32)[:, :2].copy()
            points.append(pts)
        return lms, points

    def _keypoints(self, bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        """5 key points of the face in ``box``: re-detect in a padded crop, else a template."""
        h, w = bgr.shape[:2]
        bw, bh = box[2] - box[0], box[3] - box[1]
        x0, y0 = int(max(0, box[0] - bw * 0.5)), int(max(0, box[1] - bh * 0.5))
        x1, y1 = int(min(w, box[2] + bw * 0.5)), int(min(h, box[3] + bh * 0.5))
        crop = bgr[y0:y1, x0:x1]
        if crop.size:
            bboxes, kpss = self.models["detection"].detect(crop, max_num=0, metric="default")
            if bboxes is not None and len(bboxes) and kpss is not None:
                off = np.array([x0, y0, x0, y0], np.float32)
                ious = [box_iou(b[:4] + off, box) for b in bboxes]
                best = int(np.argmax(ious))
                if ious[best] > 0.3:
                    return kpss[best].astype(np.float32) + np.array([x0, y0], np.float32)
        side = max(bw, bh)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return (ARCFACE_TEMPLATE - 0.5) * side + np.array([cx, cy], np.float32)

    def embed(self, frame_rgb, face: Face) -> np.ndarray:
        self.ensure_setup()
        from insightface.app.common import Face as IFace

        if "recognition" not in self.models:
            raise FaceBackendUnavailable(unavailable_hint("insightface", "the pack has no recognition model"))
        bgr = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR)
        box = np.asarray(face.box, np.float32)
        f = IFace(bbox=box, kps=self._keypoints(bgr, box))
        emb = np.asarray(self.models["recognition"].get(bgr, f), np.float32).ravel()
        return (emb / max(float(np.linalg.norm(emb)), 1e-12)).astype(np.float32)
