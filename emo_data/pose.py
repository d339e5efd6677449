"""Head pose from landmarks, head rotation speed and EMO's speed buckets.

Conventions (all documented because EMO publishes none of them; method and measured accuracy in
docs/pose.md):

- Pose rows are ``(yaw, pitch, roll, tx, ty, tz)``: angles in degrees, translation of the 3-D
  model's origin (the nose tip) in the model's units (``FACE_MODEL_3D``: outer eye corners 450
  apart, so one unit is about 0.2 mm) in camera coordinates.
- Camera coordinates: x right, y down, z away from the camera. The face model is expressed in
  the same axes, so a frontal face has R ≈ I and all angles ≈ 0.
- Euler order: ``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)``. Yaw turns about the vertical (y) axis,
  pitch nods about x, roll tilts about the optical (z) axis (positive = clockwise on screen).
- Rotations are *allocentric*: relative to the line of sight through the face, not to the
  optical axis. A face that only slides across the frame (a camera pan, a crop placed anywhere)
  keeps its angles; the egocentric rotation would turn by the viewing angle (about 0.1 deg per
  frame for a 2 px/frame pan in a 512-px crop), which is not head motion.
- The camera's focal length is ``FOCAL_EYE_SPANS`` outer-eye-corner distances of the first face
  measured (about four face widths: a normal lens at talking-head framing), fixed per track or
  clip, so the pose does not depend on the frame or crop size.
- Rotation speed ``w_f`` is the angle (degrees) of the relative rotation ``R_{f-1}^T R_f``
  between consecutive frames of the *smoothed* pose, computed on rotations (not on Euler
  differences, which are wrong for combined rotations); ``w_0 := w_1`` so the array has one
  value per frame (a single frame has speed 0).
- Smoothing is done on rotations: unit quaternions (sign-aligned) are fitted by a centred local
  polynomial (Savitzky-Golay) over ``SpeedConfig.smooth_frames`` frames and re-normalised.
- Speed buckets follow EMO exactly: ``s_i = tanh((w - c_i) / r_i * 3)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

from emo_data.config import SpeedConfig
from emo_data.shards.contract import speed_bucket_encoding as speed_buckets  # the contract's encoder
from emo_data.stage import Stage, StageError

# A mean 3-D face for the ibug-68 points that do not move with speech or expression: the nose
# (27-35) and the four eye corners (36, 39, 42, 45). The jaw line (an occluding contour, not a
# fixed point), the mouth and chin (they move with speech), the eyelids (blinks) and the brows
# (expression) are left out. Axes as the camera's (x right, y down, z away), origin at the nose
# tip, units such that the outer eye corners are 450 apart (the scale of the common 6-point
# model this replaces). x, y: the mean of 350 dlib ibug-68 shapes from the sample footage and
# photos (similarity-normalised, mirrored pairs averaged). z: fitted to the same shapes by
# alternating weak-perspective factorisation (they span ±20° of yaw and pitch), with the depth
# scale fixed to the 6-point model's eye-corner depth (135), because rotations that small leave
# the overall depth scale ambiguous (bas-relief ambiguity).
_IBUG68_RIGID_MODEL = {
    27: (0.0, -28.0, 72.0),      # nose bridge, top (between the eyes)
    28: (0.0, 30.0, 48.0),
    29: (0.0, 87.0, 23.0),
    30: (0.0, 146.0, 0.0),       # nose tip
    31: (-72.0, 202.0, 52.0),    # nostril wing, image left
    32: (-37.0, 213.0, 43.0),
    33: (0.0, 224.0, 38.0),      # below the nose tip
    34: (37.0, 213.0, 43.0),
    35: (72.0, 202.0, 52.0),     # nostril wing, image right
    36: (-225.0, 0.0, 135.0),    # outer eye corner, image left
    39: (-97.0, 2.0, 116.0),     # inner eye corner, image left
    42: (97.0, 2.0, 116.0),      # inner eye corner, image right
    45: (225.0, 0.0, 135.0),     # outer eye corner, image right
}
IBUG68_INDICES = np.array(sorted(_IBUG68_RIGID_MODEL), dtype=np.int64)
FACE_MODEL_3D = np.array([_IBUG68_RIGID_MODEL[i] for i in IBUG68_INDICES], dtype=np.float64)
_MODEL_CENTROID = FACE_MODEL_3D.mean(axis=0)
_EYE_OUTER = (36, 45)
# Focal length in outer-eye-corner distances (~0.4 face widths): ~4 face widths, a normal lens
# at talking-head framing. Only the perspective of the face itself depends on it (rotations are
# allocentric), so the exact value matters little; it is fixed so poses are reproducible.
FOCAL_EYE_SPANS = 10.0

# All 68 points of the same mean face, for the face *surface* (texture tracking needs the depth
# of any point on the upper face, not only of the rigid landmarks): x, y as above (the
# roll-normalised mean shape, mirrored pairs averaged), z from the same factorisation for brows
# and lids, the rigid points' z from the model above, the mouth's from the 6-point model's mouth
# depth tapered to the lips' centre, and the jaw contour from the chin's depth (98) growing to
# 428 at the ears (the contour is the silhouette: far behind the nose).
_IBUG68_MEAN_XY = (
    (-375, 36), (-369, 130), (-358, 225), (-341, 319), (-310, 407), (-257, 481), (-183, 540), (-97, 583),
    (0, 597), (97, 583), (183, 540), (257, 481), (310, 407), (341, 319), (358, 225), (369, 130), (375, 36),
    (-299, -71), (-257, -120), (-194, -142), (-126, -138), (-63, -112), (63, -112), (126, -138), (194, -142),
    (257, -120), (299, -71), (0, -30), (0, 27), (0, 84), (0, 142), (-72, 200), (-37, 211), (0, 221), (37, 211),
    (72, 200), (-225, 0), (-187, -25), (-140, -26), (-97, 1), (-141, 11), (-187, 12), (97, 1), (140, -26),
    (187, -25), (225, 0), (187, 12), (141, 11), (-138, 349), (-88, 310), (-37, 290), (0, 298), (37, 290),
    (88, 310), (138, 349), (90, 389), (40, 407), (0, 410), (-40, 407), (-90, 389), (-115, 348), (-37, 325),
    (0, 327), (37, 325), (115, 348), (38, 357), (0, 361), (-38, 357),
)
_IBUG68_MEAN_Z = np.concatenate([
    98.0 + 330.0 * (np.abs(np.arange(17) - 8) / 8.0) ** 1.6,                  # jaw contour 0-16
    [166, 146, 120, 97, 81, 81, 97, 120, 146, 166],                            # brows 17-26
    np.zeros(9),                                                               # nose: rigid model
    [135, 131, 124, 116, 118, 123, 116, 124, 131, 135, 123, 118],              # eyes 36-47
    [98, 75, 55, 47, 55, 75, 95, 80, 62, 55, 62, 80, 70, 62, 62, 62, 70, 62, 62, 62],  # mouth 48-67
])
IBUG68_MEAN_FACE = np.c_[np.asarray(_IBUG68_MEAN_XY, np.float64), _IBUG68_MEAN_Z]
for _k, _xyz in _IBUG68_RIGID_MODEL.items():
    IBUG68_MEAN_FACE[_k] = _xyz

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


def _rotations(pose: np.ndarray):
    """scipy Rotation of the [T, >=3] (yaw, pitch, roll) rows (R = Rz Ry Rx, intrinsic order)."""
    from scipy.spatial.transform import Rotation

    angles = np.asarray(pose, dtype=np.float64)[:, [2, 0, 1]]  # roll (z), yaw (y), pitch (x)
    return Rotation.from_euler("ZYX", angles, degrees=True)


def _euler_rows(rot) -> np.ndarray:
    """[T, 3] (yaw, pitch, roll) degrees of a scipy Rotation (inverse of :func:`_rotations`)."""
    zyx = rot.as_euler("ZYX", degrees=True)
    return np.stack([zyx[:, 1], zyx[:, 2], zyx[:, 0]], axis=1)


def camera_matrix(image_size: tuple[int, int], focal: Optional[float] = None) -> np.ndarray:
    """Pinhole camera: principal point at the image centre, ``focal`` (default: image width)."""
    w, h = image_size
    f = float(w if focal is None else focal)
    return np.array([[f, 0, w / 2.0], [0, f, h / 2.0], [0, 0, 1]], dtype=np.float64)


def project_model(yaw: float, pitch: float, roll: float, t: Sequence[float],
                  image_size: tuple[int, int], focal: Optional[float] = None) -> np.ndarray:
    """2-D image points of ``FACE_MODEL_3D`` (rows in ``IBUG68_INDICES`` order) posed by the given
    *egocentric* angles and translation ([K, 2])."""
    rot = euler_to_matrix(yaw, pitch, roll)
    pts = FACE_MODEL_3D @ rot.T + np.asarray(t, dtype=np.float64)
    uv = pts @ camera_matrix(image_size, focal).T
    return (uv[:, :2] / uv[:, 2:3]).astype(np.float32)


def line_of_sight_rotation(point: np.ndarray) -> np.ndarray:
    """The rotation taking the optical axis (0, 0, 1) onto the ray through ``point`` (camera
    coordinates), about the axis perpendicular to both."""
    x, y, z = (float(v) for v in point)
    norm = math.sqrt(x * x + y * y + z * z)
    s = math.hypot(x, y)  # |e_z x d| * norm
    if norm < 1e-12 or s < 1e-12 * norm:
        return np.eye(3)
    angle = math.atan2(s, z)
    return cv2.Rodrigues(np.array([-y / s * angle, x / s * angle, 0.0]))[0]


def focal_for(points: np.ndarray) -> float:
    """The focal length (pixels) for a face whose rigid points (``IBUG68_INDICES`` order) are given."""
    i, j = (int(np.flatnonzero(IBUG68_INDICES == k)[0]) for k in _EYE_OUTER)
    span = float(np.linalg.norm(np.asarray(points[j], np.float64) - np.asarray(points[i], np.float64)))
    return FOCAL_EYE_SPANS * max(span, 4.0)


# --------------------------------------------------------------------------------------------
# pose
class PoseSolver:
    """solvePnP of the rigid ibug-68 points, frame after frame (one per face track or clip).

    The first frame is solved globally (SQPnP); later frames start from the previous solution,
    which keeps the solver on the same branch. The focal length is fixed at the first frame
    (:func:`focal_for`) unless given; the principal point is the image centre. Returns
    allocentric (yaw, pitch, roll, tx, ty, tz) rows; NaN where the points are not finite or the
    solver fails.
    """

    def __init__(self, image_size: tuple[int, int], focal: Optional[float] = None):
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.focal = focal
        self._camera: Optional[np.ndarray] = None
        self._rvec: Optional[np.ndarray] = None
        self._tvec: Optional[np.ndarray] = None

    @property
    def camera(self) -> np.ndarray:
        if self._camera is None:
            self._camera = camera_matrix(self.image_size, self.focal)
        return self._camera

    def solve_rt(self, landmarks68: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(R, t) egocentric (model -> camera), or None where the points are not finite or the
        solver fails."""
        pts = np.asarray(landmarks68, dtype=np.float64)[IBUG68_INDICES]
        if not np.isfinite(pts).all():
            return None
        if self.focal is None:
            self.focal = focal_for(pts)
        ok = False
        if self._rvec is not None:
            ok, r, t = cv2.solvePnP(FACE_MODEL_3D, pts, self.camera, None, self._rvec, self._tvec,
                                    useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
            ok = bool(ok) and bool(np.isfinite(r).all()) and float(t[2, 0]) > 0
        if not ok:
            try:
                ok, r, t = cv2.solvePnP(FACE_MODEL_3D, pts, self.camera, None, flags=cv2.SOLVEPNP_SQPNP)
            except cv2.error:
                ok = False
            if not ok or float(t.ravel()[2]) <= 0:
                return None
        self._rvec, self._tvec = r.reshape(3, 1).copy(), t.reshape(3, 1).copy()
        return cv2.Rodrigues(self._rvec)[0], self._tvec[:, 0].copy()

    def solve(self, landmarks68: np.ndarray) -> np.ndarray:
        """[6] allocentric (yaw, pitch, roll, tx, ty, tz); NaN where the solver fails."""
        rt = self.solve_rt(landmarks68)
        return np.full(6, np.nan) if rt is None else pose_row(*rt)


def pose_row(rot: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """[6] (yaw, pitch, roll, tx, ty, tz) of an egocentric model pose: angles of the rotation
    relative to the line of sight through the rigid points' centre (allocentric)."""
    out = np.empty(6, dtype=np.float64)
    allo = line_of_sight_rotation(rot @ _MODEL_CENTROID + tvec).T @ rot
    out[:3] = matrix_to_euler(allo)
    out[3:] = tvec
    return out


def head_pose_from_landmarks(landmarks: np.ndarray, image_size: tuple[int, int],
                             landmark_format: str = "ibug68", focal: Optional[float] = None) -> np.ndarray:
    """[T, 6] float32 (yaw, pitch, roll deg, tx, ty, tz) from [T, 68, 2] ibug-68 landmarks.

    ``image_size`` is (width, height) of the image the landmarks live in (principal point =
    centre); ``focal`` defaults to :func:`focal_for` of the first valid frame. One
    :class:`PoseSolver` runs through the frames. Frames whose rigid points are not finite get NaN
    rows. Only ``ibug68`` landmarks are supported (ValueError otherwise): other backends hand
    per-frame poses to :class:`HeadPoseStage` (the face tracker computes them from the backend's
    ibug-68 points).
    """
    lms = np.asarray(landmarks, dtype=np.float64)
    if lms.ndim == 2:
        lms = lms[None]
    if landmark_format != "ibug68":
        raise ValueError(
            f"head_pose_from_landmarks supports ibug68 landmarks only, got {landmark_format!r}; "
            "pass per-frame poses (backend_pose) for other formats"
        )
    if lms.shape[1] != 68:
        raise ValueError(f"ibug68 landmarks must have 68 points, got {lms.shape[1]}")
    solver = PoseSolver(image_size, focal)
    return np.stack([solver.solve(frame) for frame in lms]).astype(np.float32) if len(lms) else np.zeros((0, 6), np.float32)


def pose_from_backend(backend_pose: np.ndarray) -> np.ndarray:
    """[T, 6] rows already in (yaw, pitch, roll, tx, ty, tz) order (the tracker's per-frame poses)."""
    pose = np.asarray(backend_pose, dtype=np.float32)
    if pose.ndim != 2 or pose.shape[1] != 6:
        raise ValueError(f"backend pose must be [T, 6], got {pose.shape}")
    return pose


def fill_missing(pose: np.ndarray) -> np.ndarray:
    """Interpolate NaN rows: rotations by spherical interpolation, translations linearly; edge
    rows copy the nearest valid one."""
    pose = np.array(pose, dtype=np.float32, copy=True)
    bad = ~np.all(np.isfinite(pose), axis=1)
    if not bad.any():
        return pose
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise ValueError("no frame has a valid pose")
    idx = np.arange(len(pose))
    for k in range(3, pose.shape[1]):
        pose[bad, k] = np.interp(idx[bad], good, pose[good, k])
    if len(good) == 1:
        pose[bad, :3] = pose[good[0], :3]
        return pose
    from scipy.spatial.transform import Slerp

    times = np.clip(idx[bad], good[0], good[-1]).astype(np.float64)
    pose[bad, :3] = _euler_rows(Slerp(good.astype(np.float64), _rotations(pose[good]))(times))
    return pose


def smooth_pose(pose: np.ndarray, window: int, order: int = 2) -> np.ndarray:
    """Centred local-polynomial (Savitzky-Golay) smoothing over ``window`` frames, on rotations.

    Rotations become unit quaternions, sign-aligned to their predecessor (q and -q are the same
    rotation), are fitted component-wise and re-normalised; translations are fitted the same way.
    Near the ends the fit of the first / last window is used, turning from the local polynomial
    into a straight line towards the end (less noise there), so a steady turn keeps its speed up
    to the last frame. An even window is widened to the next odd one;
    window <= order + 1 (or a clip shorter than that) returns a copy.
    """
    from scipy.spatial.transform import Rotation

    pose = np.asarray(pose, dtype=np.float32)
    window = int(window)
    if window % 2 == 0:
        window += 1
    window = min(window, len(pose) if len(pose) % 2 else len(pose) - 1)
    if window <= order + 1 or len(pose) == 0:
        return pose.copy()
    quat = _rotations(pose).as_quat()
    dots = np.sum(quat[1:] * quat[:-1], axis=1)
    flips = np.concatenate([[1.0], np.cumprod(np.where(dots < 0, -1.0, 1.0))])
    quat = quat * flips[:, None]
    quat = _savgol_edges_linear(quat, window, order)
    quat /= np.linalg.norm(quat, axis=1, keepdims=True)
    out = np.empty_like(pose, dtype=np.float64)
    out[:, :3] = _euler_rows(Rotation.from_quat(quat))
    out[:, 3:] = _savgol_edges_linear(pose[:, 3:].astype(np.float64), window, order)
    return out.astype(np.float32)


def _savgol_edges_linear(x: np.ndarray, window: int, order: int) -> np.ndarray:
    """Savitzky-Golay along axis 0; within half a window of either end the order-``order`` fit is
    blended (linearly over that half window) into a straight-line fit of the end window. A
    quadratic extrapolated to the clip's ends turns noise into speed there (measured on the
    sample corpus: the first/last 7 frames read up to ~2x the clip's median speed); a line does
    not, and both are exact for a steady turn."""
    from scipy.signal import savgol_filter

    fitted = savgol_filter(x, window, order, axis=0, mode="interp")
    if order <= 1:
        return fitted
    line = savgol_filter(x, window, 1, axis=0, mode="interp")
    half = window // 2
    weight = np.zeros(len(x))
    ramp = np.linspace(1.0, 0.0, half + 1)[:half]
    weight[:half] = ramp
    weight[len(x) - half:] = np.maximum(weight[len(x) - half:], ramp[::-1])
    weight = weight.reshape((-1,) + (1,) * (x.ndim - 1))
    return weight * line + (1.0 - weight) * fitted


def rotation_speed(pose: np.ndarray) -> np.ndarray:
    """[T] degrees per frame: angle of R_{f-1}^T R_f; w_0 = w_1 (0 for a single frame)."""
    pose = np.asarray(pose, dtype=np.float64)
    n = len(pose)
    speed = np.zeros(n, dtype=np.float32)
    if n < 2:
        return speed
    rot = _rotations(pose)
    speed[1:] = np.degrees((rot[:-1].inv() * rot[1:]).magnitude())
    speed[0] = speed[1]
    return speed


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
    backend_pose: Optional[np.ndarray] = None  # [T, 6] per-frame poses (the face tracker's)


@dataclass
class HeadMotion:
    pose: np.ndarray     # [T, 6] float32 smoothed (yaw, pitch, roll deg, tx, ty, tz)
    speed: np.ndarray    # [T] float32 degrees per frame, of the smoothed pose
    buckets: np.ndarray  # [T, d] float32
    raw_pose: Optional[np.ndarray] = None  # [T, 6] float32 per-frame pose before smoothing (gaps filled)


class HeadPoseStage(Stage[HeadPoseInput, HeadMotion]):
    """Per-frame pose (the tracker's, else solvePnP on ibug-68), gaps filled, smoothed on
    rotations, speed, buckets. The per-frame pose is kept (``raw_pose``) so users can re-derive
    speed with other smoothing."""

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
        pose = smooth_pose(raw, self.config.smooth_frames, self.config.smooth_order)
        speed = rotation_speed(pose)
        buckets = speed_buckets(speed, self.config.centers, self.config.radii)
        return HeadMotion(pose=pose, speed=speed, buckets=buckets, raw_pose=raw)
