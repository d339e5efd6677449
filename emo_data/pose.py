"""Head pose from landmarks, head rotation speed and EMO's speed buckets.

Conventions (all documented because EMO publishes none of them):

- Pose rows are ``(yaw, pitch, roll, tx, ty, tz)``: angles in degrees, translation in the 3-D
  model's units (``FACE_MODEL_3D``, roughly millimetres x 4.5) in camera coordinates.
- Camera coordinates: x right, y down, z away from the camera. The generic face model is
  expressed in the same axes, so a frontal face has R ≈ I and all angles ≈ 0.
- Euler order: ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``. Yaw turns about the vertical (y) axis,
  pitch nods about x, roll tilts about the optical (z) axis.
- Rotation speed ``w_f`` is the angle (degrees) of the relative rotation ``R_{f-1}^T R_f``
  between consecutive frames, computed on rotation matrices (not on Euler differences, which are
  wrong for combined rotations); ``w_0 := w_1`` so the array has one value per frame (a single
  frame has speed 0).
- Speed buckets follow EMO exactly: ``s_i = tanh((w - c_i) / r_i * 3)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from emo_data.config import SpeedConfig
from emo_data.stage import Stage, StageError

# Generic 3-D face (the widely used 6-point model, e.g. learnopencv's head-pose tutorial),
# converted from its (x right, y up, z toward camera) axes to camera axes (x right, y down,
# z away from camera). Keys are 0-based ibug-68 indices.
_IBUG68_MODEL = {
    30: (0.0, 0.0, 0.0),            # nose tip
    8: (0.0, 330.0, 65.0),          # chin
    36: (-225.0, -170.0, 135.0),    # image-left eye, outer corner
    45: (225.0, -170.0, 135.0),     # image-right eye, outer corner
    48: (-150.0, 150.0, 125.0),     # image-left mouth corner
    54: (150.0, 150.0, 125.0),      # image-right mouth corner
}
IBUG68_INDICES = np.array(sorted(_IBUG68_MODEL), dtype=np.int64)
FACE_MODEL_3D = np.array([_IBUG68_MODEL[i] for i in IBUG68_INDICES], dtype=np.float64)

LANDMARK_FORMATS = ("ibug68", "insightface106")


# --------------------------------------------------------------------------------------------
# rotations
def euler_to_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) @ Ry(yaw) @ Rx(pitch), angles in degrees."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def matrix_to_euler(rot: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`euler_to_matrix`: (yaw, pitch, roll) in degrees."""
    yaw = np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))
    pitch = np.arctan2(rot[2, 1], rot[2, 2])
    roll = np.arctan2(rot[1, 0], rot[0, 0])
    return tuple(float(v) for v in np.rad2deg([yaw, pitch, roll]))  # type: ignore[return-value]


def camera_matrix(image_size: tuple[int, int]) -> np.ndarray:
    w, h = image_size
    f = float(w)
    return np.array([[f, 0, w / 2.0], [0, f, h / 2.0], [0, 0, 1]], dtype=np.float64)


def project_model(yaw: float, pitch: float, roll: float, t: Sequence[float],
                  image_size: tuple[int, int]) -> np.ndarray:
    """2-D image points of ``FACE_MODEL_3D`` posed by the given angles and translation ([6, 2])."""
    rot = euler_to_matrix(yaw, pitch, roll)
    pts = FACE_MODEL_3D @ rot.T + np.asarray(t, dtype=np.float64)
    uv = pts @ camera_matrix(image_size).T
    return (uv[:, :2] / uv[:, 2:3]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# pose
def head_pose_from_landmarks(landmarks: np.ndarray, image_size: tuple[int, int],
                             landmark_format: str = "ibug68") -> np.ndarray:
    """[T, 6] float32 (yaw, pitch, roll deg, tx, ty, tz) from [T, K, 2] landmarks via solvePnP.

    ``image_size`` is (width, height) of the image the landmarks live in (focal = width,
    principal point = centre). Each frame starts from the previous frame's solution, which keeps
    the iterative solver on the same branch through a clip. Frames whose landmarks are not
    finite get NaN rows. Only ``ibug68`` landmarks are supported: for ``insightface106`` pass
    the backend's own poses to :class:`HeadPoseStage` instead (ValueError otherwise).
    """
    lms = np.asarray(landmarks, dtype=np.float64)
    if lms.ndim == 2:
        lms = lms[None]
    if landmark_format != "ibug68":
        raise ValueError(
            f"head_pose_from_landmarks supports ibug68 landmarks only, got {landmark_format!r}; "
            "use the backend's pose (InsightFace provides one) for insightface106"
        )
    if lms.shape[1] != 68:
        raise ValueError(f"ibug68 landmarks must have 68 points, got {lms.shape[1]}")
    cam = camera_matrix(image_size)
    dist = np.zeros(4)
    out = np.full((len(lms), 6), np.nan, dtype=np.float32)
    rvec: Optional[np.ndarray] = None
    tvec: Optional[np.ndarray] = None
    for i, frame in enumerate(lms):
        img_pts = frame[IBUG68_INDICES]
        if not np.all(np.isfinite(img_pts)):
            continue
        if rvec is None:
            # frontal start: R = I, the face ~ in front of the camera at a plausible depth
            span = max(float(np.ptp(img_pts[:, 0])), 1.0)
            depth = cam[0, 0] * 450.0 / span
            c = img_pts.mean(axis=0)
            guess_t = np.array([(c[0] - cam[0, 2]) * depth / cam[0, 0],
                                (c[1] - cam[1, 2]) * depth / cam[1, 1], depth])
            rvec, tvec = np.zeros(3), guess_t
        ok, r, t = cv2.solvePnP(FACE_MODEL_3D, img_pts, cam, dist, rvec.copy(), tvec.copy(),
                                useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok:
            continue
        rvec, tvec = r.reshape(3), t.reshape(3)
        rot, _ = cv2.Rodrigues(rvec)
        out[i, :3] = matrix_to_euler(rot)
        out[i, 3:] = tvec
    return out


def pose_from_backend(backend_pose: np.ndarray) -> np.ndarray:
    """[T, 6] rows already in (yaw, pitch, roll, tx, ty, tz) order, as FaceBackend adapters emit."""
    pose = np.asarray(backend_pose, dtype=np.float32)
    if pose.ndim != 2 or pose.shape[1] != 6:
        raise ValueError(f"backend pose must be [T, 6], got {pose.shape}")
    return pose


def fill_missing(pose: np.ndarray) -> np.ndarray:
    """Linearly interpolate NaN rows (edge rows copy the nearest valid one)."""
    pose = np.array(pose, dtype=np.float32, copy=True)
    bad = ~np.all(np.isfinite(pose), axis=1)
    if not bad.any():
        return pose
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise ValueError("no frame has a valid pose")
    idx = np.arange(len(pose))
    for k in range(pose.shape[1]):
        pose[bad, k] = np.interp(idx[bad], good, pose[good, k])
    return pose


def smooth_pose(pose: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` frames (edge-padded), same length as the input.

    Angles are averaged as numbers, fine for head poses far from the ±180° wrap. An even window
    is widened to the next odd one so it stays centred; window <= 1 returns a copy.
    """
    pose = np.asarray(pose, dtype=np.float32)
    window = int(window)
    if window <= 1 or len(pose) == 0:
        return pose.copy()
    if window % 2 == 0:
        window += 1
    half = window // 2
    padded = np.pad(pose, ((half, half), (0, 0)), mode="edge").astype(np.float64)
    csum = np.cumsum(np.pad(padded, ((1, 0), (0, 0))), axis=0)
    return ((csum[window:] - csum[:-window]) / window).astype(np.float32)


def rotation_speed(pose: np.ndarray) -> np.ndarray:
    """[T] degrees per frame: angle of R_{f-1}^T R_f; w_0 = w_1 (0 for a single frame)."""
    pose = np.asarray(pose, dtype=np.float64)
    n = len(pose)
    speed = np.zeros(n, dtype=np.float32)
    if n < 2:
        return speed
    mats = [euler_to_matrix(*row[:3]) for row in pose]
    for f in range(1, n):
        rel = mats[f - 1].T @ mats[f]
        cos = np.clip((np.trace(rel) - 1.0) / 2.0, -1.0, 1.0)
        speed[f] = np.degrees(np.arccos(cos))
    speed[0] = speed[1]
    return speed


def speed_buckets(speed: np.ndarray, centers: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """[T, d] float32 with s_i = tanh((w - c_i) / r_i * 3) (EMO, Sec. 3.3)."""
    w = np.asarray(speed, dtype=np.float64)[:, None]
    c = np.asarray(centers, dtype=np.float64)[None, :]
    r = np.asarray(radii, dtype=np.float64)[None, :]
    if c.shape != r.shape:
        raise ValueError("centers and radii must have the same length")
    if np.any(r <= 0):
        raise ValueError("radii must be positive")
    return np.tanh((w - c) / r * 3.0).astype(np.float32)


def fit_bucket_centers(speeds: np.ndarray, d: int) -> tuple[list[float], list[float]]:
    """Bucket centres at evenly spaced quantiles of a corpus's speeds, radii = half the gaps.

    Centres are the (i + 0.5) / d quantiles, i = 0..d-1, of the finite speeds, made strictly
    increasing (ties are nudged apart by a small epsilon). Each radius is half the distance to
    the nearer neighbour (the single neighbour at the ends); d = 1 gets half the inter-quartile
    range. Every radius is positive.
    """
    if d < 1:
        raise ValueError("d must be >= 1")
    s = np.asarray(speeds, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if len(s) == 0:
        raise ValueError("no finite speeds to fit buckets on")
    qs = (np.arange(d) + 0.5) / d
    centers = np.quantile(s, qs)
    eps = max(1e-3, 1e-3 * float(np.ptp(s)))
    for i in range(1, d):
        if centers[i] <= centers[i - 1]:
            centers[i] = centers[i - 1] + eps
    if d == 1:
        iqr = float(np.subtract(*np.quantile(s, [0.75, 0.25])))
        radii = np.array([max(iqr / 2.0, eps)])
    else:
        gaps = np.diff(centers)
        left = np.r_[gaps[0], gaps]
        right = np.r_[gaps, gaps[-1]]
        radii = np.maximum(np.minimum(left, right) / 2.0, eps / 2.0)
    return [float(c) for c in centers], [float(r) for r in radii]


# --------------------------------------------------------------------------------------------
# stage
@dataclass
class HeadPoseInput:
    landmarks: np.ndarray                 # [T, K, 2] in crop pixels
    crop_size: tuple[int, int] | int      # (w, h) of the crop, or its side
    landmark_format: str = "ibug68"
    backend_pose: Optional[np.ndarray] = None  # [T, 6] if the face backend estimates pose


@dataclass
class HeadMotion:
    pose: np.ndarray     # [T, 6] float32 smoothed (yaw, pitch, roll deg, tx, ty, tz)
    speed: np.ndarray    # [T] float32 degrees per frame
    buckets: np.ndarray  # [T, d] float32


class HeadPoseStage(Stage[HeadPoseInput, HeadMotion]):
    """Pose (backend pose if given, else solvePnP on ibug-68), smoothing, speed, buckets."""

    name = "head_pose"

    def __init__(self, config: Optional[SpeedConfig] = None):
        super().__init__()
        self.config = config or SpeedConfig()

    def process(self, item: HeadPoseInput) -> HeadMotion:
        size = item.crop_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        if item.backend_pose is not None:
            raw = pose_from_backend(item.backend_pose)
        else:
            lms = np.asarray(item.landmarks)
            if lms.ndim != 3 or len(lms) == 0:
                raise StageError("no_landmarks", f"landmarks must be [T, K, 2], got {lms.shape}")
            try:
                raw = head_pose_from_landmarks(lms, tuple(size), item.landmark_format)
            except ValueError as exc:
                raise StageError("unsupported_landmarks", str(exc)) from exc
        try:
            raw = fill_missing(raw)
        except ValueError as exc:
            raise StageError("pose_failed", str(exc)) from exc
        pose = smooth_pose(raw, self.config.smooth_frames)
        speed = rotation_speed(pose)
        buckets = speed_buckets(speed, self.config.centers, self.config.radii)
        return HeadMotion(pose=pose, speed=speed, buckets=buckets)
