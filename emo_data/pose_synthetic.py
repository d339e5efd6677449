"""Synthetic head motion with exact ground truth, measured through the build's own code path.

A real portrait photo (or one frame of a real video) is turned into a 25 fps video by a known
per-frame similarity transform about the face centre: in-plane rotation (roll) at constant or
varying rates, pans and zooms (true rotation speed 0) and stills. Mild sensor noise is added
to every frame (seeded) and the frames are encoded to H.264 like real footage, so the landmark
detector never sees two identical frames.

``measure_case`` runs the encoded file through :class:`emo_data.clips.VideoPassStage` (tracker,
clip selection, crop: exactly what a build does, speech declared everywhere) and then
:func:`emo_data.clip_work.add_head_motion` with :class:`emo_data.pose.HeadPoseStage`, and
compares the stored speed and pose with the truth.

What this proves and does not: an in-plane rotation of the image is exactly a rotation of the
head about the camera's optical axis, so roll and its speed have exact ground truth, and any
yaw/pitch the estimator reports is error. Pans, zooms and stills have exact truth too (speed 0).
A flat photo cannot turn in depth, so yaw and pitch cases (:func:`turn`) are rendered on a
*relief*: the photo's pixels get depths from the mean face (:data:`emo_data.pose.IBUG68_MEAN_FACE`
at the photo's own landmarks, thin-plate interpolated, flat behind the face) and are turned
about a pivot behind the face (orthographic, no occlusion). Those cases test the tracker on real
texture moving with parallax, but their truth is only as real as that relief: the estimator
uses the same mean face, so a real head whose depths differ reads larger or smaller yaw/pitch.
They are labelled "relief" in reports and are not part of the issue's targets.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SAMPLES = (Path(__file__).resolve().parents[1] / ".." / "shared" / "samples").resolve()
DEFAULT_PHOTO = SAMPLES / "images" / "face_recognition__obama.jpg"
FPS = 25.0


@dataclass
class MotionCase:
    """One synthetic clip: per-frame roll (deg), scale and centre shift (output pixels)."""

    name: str
    roll_deg: np.ndarray          # [T] in-plane head rotation, our roll convention (clockwise on screen)
    scale: np.ndarray             # [T] zoom factor relative to the nominal face size
    shift_px: np.ndarray          # [T, 2] face-centre displacement in output pixels
    kind: str = "roll"            # roll | sweep | varying | pan | zoom | still | yaw | pitch
    kinks: tuple = ()             # frames where the true rate jumps (a sweep's turnarounds)
    yaw_deg: Optional[np.ndarray] = None    # [T] out-of-plane turns (relief rendering, see module doc)
    pitch_deg: Optional[np.ndarray] = None  # [T]

    def __post_init__(self) -> None:
        n = len(self.roll_deg)
        self.yaw_deg = np.zeros(n) if self.yaw_deg is None else np.asarray(self.yaw_deg, np.float64)
        self.pitch_deg = np.zeros(n) if self.pitch_deg is None else np.asarray(self.pitch_deg, np.float64)

    @property
    def out_of_plane(self) -> bool:
        return bool(np.any(self.yaw_deg) or np.any(self.pitch_deg))

    def rotations(self) -> np.ndarray:
        """[T, 3, 3] head rotation applied in camera axes: R = Rz(roll) Ry(yaw) Rx(pitch)."""
        from emo_data.pose import euler_to_matrix

        return np.stack([euler_to_matrix(y, p, r) for y, p, r in zip(self.yaw_deg, self.pitch_deg, self.roll_deg)])

    @property
    def frames(self) -> int:
        return len(self.roll_deg)

    @property
    def true_speed(self) -> np.ndarray:
        """deg/frame, with the pose module's convention w_0 := w_1."""
        if self.out_of_plane:
            rot = self.rotations()
            w = np.array([_rotation_angle(a, b) for a, b in zip(rot[:-1], rot[1:])])
        else:
            w = np.abs(np.diff(self.roll_deg))
        return np.r_[w[:1], w] if len(w) else np.zeros(len(self.roll_deg))

    @property
    def nominal_rate(self) -> float:
        return float(np.median(self.true_speed))

    def steady(self, half_window: int) -> np.ndarray:
        """[T] bool: frames farther than ``half_window`` from a kink. A centred smoother rounds an
        instantaneous reversal off over its window, so speed there is not comparable with the
        piecewise-constant truth."""
        mask = np.ones(self.frames, bool)
        for k in self.kinks:
            mask[max(k - half_window, 0):k + half_window + 1] = False
        return mask


def constant_roll(rate: float, seconds: float, start_deg: float = 0.0, name: str = "") -> MotionCase:
    n = int(round(seconds * FPS))
    roll = start_deg + rate * np.arange(n, dtype=np.float64)
    return MotionCase(name or f"roll {rate:g}/f", roll, np.ones(n), np.zeros((n, 2)))


def sweep_roll(limit_deg: float, rate: float, name: str = "") -> MotionCase:
    """Upright -> +limit -> -limit -> upright at ``rate`` deg/frame: the face must stay tracked
    through the whole range (a detector alone loses it beyond ~25 degrees)."""
    leg = int(round(limit_deg / rate))
    roll = np.concatenate([
        rate * np.arange(leg),                      # 0 .. +limit
        limit_deg - rate * np.arange(2 * leg),      # +limit .. -limit
        -limit_deg + rate * np.arange(leg + 1),     # -limit .. 0
    ])
    n = len(roll)
    return MotionCase(name or f"sweep ±{limit_deg:g} @{rate:g}", roll, np.ones(n), np.zeros((n, 2)), kind="sweep",
                      kinks=(leg, 3 * leg))


def varying_roll(amplitude_deg: float, period_s: float, seconds: float, name: str = "") -> MotionCase:
    n = int(round(seconds * FPS))
    t = np.arange(n) / FPS
    roll = amplitude_deg * np.sin(2 * np.pi * t / period_s)
    return MotionCase(name or f"sine ±{amplitude_deg:g} {period_s:g}s", roll, np.ones(n), np.zeros((n, 2)), kind="varying")


def turn(axis: str, amplitude_deg: float, period_s: float, seconds: float, name: str = "") -> MotionCase:
    """A sine of yaw or pitch (out of plane: rendered from the photo on a face relief, see the
    module doc); peak rate = amplitude * 2 pi / (period * 25) deg/frame."""
    n = int(round(seconds * FPS))
    angle = amplitude_deg * np.sin(2 * np.pi * (np.arange(n) / FPS) / period_s)
    zeros = np.zeros(n)
    return MotionCase(name or f"{axis} ±{amplitude_deg:g} {period_s:g}s", zeros, np.ones(n), np.zeros((n, 2)), kind=axis,
                      yaw_deg=angle if axis == "yaw" else zeros, pitch_deg=angle if axis == "pitch" else zeros)


def pan(px_per_frame: float, seconds: float, name: str = "") -> MotionCase:
    n = int(round(seconds * FPS))
    x = px_per_frame * (np.arange(n) - n / 2.0)
    shift = np.stack([x, 0.3 * x], axis=1)
    return MotionCase(name or f"pan {px_per_frame:g}px/f", np.zeros(n), np.ones(n), shift, kind="pan")


def zoom(total: float, seconds: float, name: str = "") -> MotionCase:
    n = int(round(seconds * FPS))
    scale = np.linspace(1.0, total, n)
    return MotionCase(name or f"zoom x{total:g}", np.zeros(n), scale, np.zeros((n, 2)), kind="zoom")


def still(seconds: float, name: str = "still") -> MotionCase:
    n = int(round(seconds * FPS))
    return MotionCase(name, np.zeros(n), np.ones(n), np.zeros((n, 2)), kind="still")


def standard_cases(seconds: float = 4.0, relief: bool = True) -> list[MotionCase]:
    """The benchmark's cases: constant roll rates 0.1-1.5, ±45° sweeps, a sine, a pan, a zoom, a
    still (exact truth), and with ``relief`` yaw / pitch turns rendered on the face relief
    (truth relative to the mean face's depths, see the module doc)."""
    cases = [constant_roll(r, seconds) for r in (0.1, 0.2, 0.5, 1.0, 1.5)]
    cases += [
        sweep_roll(45.0, 0.5),
        sweep_roll(45.0, 1.5),
        varying_roll(20.0, 5.0, max(seconds, 5.0)),
        pan(2.0, seconds),
        zoom(1.3, seconds),
        still(seconds),
    ]
    if relief:
        cases += [
            turn("yaw", 15.0, 4.0, seconds),
            turn("pitch", 10.0, 3.0, seconds),
            turn("pitch", 3.0, 1.0, seconds, "nod ±3 1s"),
            turn("yaw", 2.0, 1.2, seconds, "shake ±2 1.2s"),
        ]
    return cases


# --------------------------------------------------------------------------------------------
# rendering
@dataclass
class Portrait:
    """A photo and where its face is (centre, size in source pixels)."""

    image: np.ndarray             # H x W x 3 uint8 RGB
    center: np.ndarray            # [2] face centre (landmark-box centre), source pixels
    face_px: float                # landmark-box long side, source pixels
    name: str = ""
    landmarks: Optional[np.ndarray] = None  # [68, 2] ibug-68, source pixels
    _depth: Optional[np.ndarray] = None

    def depth(self) -> np.ndarray:
        """[H, W] float32 relief (source pixels, larger = farther, 0 at the nose tip): a thin-plate
        spline through the face model's depths at the photo's landmarks, flat behind the face."""
        if self._depth is None:
            self._depth = _relief(self.image.shape[:2], self.landmarks)
        return self._depth


def load_portrait(path: Path | str = DEFAULT_PHOTO) -> Portrait:
    """Load a photo and find its face with the dlib backend (the largest face)."""
    import cv2

    from emo_data.config import FaceConfig
    from emo_data.faces import make_face_backend

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    backend = make_face_backend(FaceConfig(min_face_fraction=0.0, min_face_px=0, detect_max_side=0))
    backend.setup()
    faces = backend.detect(rgb)
    if not faces:
        raise ValueError(f"no face in {path}")
    face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    lm = backend.landmarks(rgb, [face.box])[0]
    lo, hi = lm.min(axis=0), lm.max(axis=0)
    return Portrait(rgb, (lo + hi) / 2.0, float(max(hi - lo)), Path(path).stem, lm.astype(np.float64))


_RELIEF_BACK = 450.0  # the head's silhouette and everything behind it
_RELIEF_PIVOT = 450.0  # turns pivot this far behind the nose tip (about the neck)


def _mean_face() -> np.ndarray:
    """The mean face of *this* checkout's pose module, also when the bench measures another
    checkout's build code (whose emo_data.pose may predate it)."""
    try:
        from emo_data.pose import IBUG68_MEAN_FACE
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("pose_synthetic_pose", Path(__file__).with_name("pose.py"))
        module = importlib.util.module_from_spec(spec)
        import sys

        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        IBUG68_MEAN_FACE = module.IBUG68_MEAN_FACE
    return IBUG68_MEAN_FACE


def _relief(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    import cv2
    from scipy.interpolate import RBFInterpolator

    z = _mean_face()[:, 2]  # the mean face's depths at the photo's own landmarks
    unit = float(np.linalg.norm(landmarks[45] - landmarks[36])) / 450.0
    centre = landmarks.mean(axis=0)
    half = (landmarks.max(axis=0) - landmarks.min(axis=0)) / 2.0
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ring = centre + np.stack([np.cos(angles) * half[0] * 1.35, np.sin(angles) * half[1] * 1.35], axis=1)
    pts = np.concatenate([landmarks, ring])
    vals = np.concatenate([z, np.full(len(ring), _RELIEF_BACK)]) * unit
    h, w = shape
    step = 8
    gy, gx = np.mgrid[0:h:step, 0:w:step]
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)
    tps = RBFInterpolator(pts, vals, kernel="thin_plate_spline", smoothing=1.0)(grid).reshape(gx.shape)
    # outside the ring the head is behind: flat at the back depth
    r = np.hypot((gx - centre[0]) / (half[0] * 1.35), (gy - centre[1]) / (half[1] * 1.35))
    depth = np.where(r <= 1.0, np.minimum(tps, _RELIEF_BACK * unit), _RELIEF_BACK * unit)
    return cv2.resize(depth.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def _turned(portrait: Portrait, yaw: float, pitch: float) -> np.ndarray:
    """The photo with its face relief turned by Ry(yaw) Rx(pitch) about a pivot behind the face
    (orthographic; backward mapping by fixed-point iteration, fine for turns up to ~20 deg)."""
    import cv2

    from emo_data.pose import euler_to_matrix

    img = portrait.image
    depth = portrait.depth()
    h, w = depth.shape
    unit = float(np.linalg.norm(portrait.landmarks[45] - portrait.landmarks[36])) / 450.0
    c = np.array([portrait.center[0], portrait.center[1], _RELIEF_PIVOT * unit])
    rot = euler_to_matrix(yaw, pitch, 0.0)
    a2 = np.linalg.inv(rot[:2, :2])
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    qx, qy = u - c[0], v - c[1]
    x, y = u.copy(), v.copy()
    for _ in range(4):
        pz = cv2.remap(depth, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) - c[2]
        rx = qx - rot[0, 2] * pz
        ry = qy - rot[1, 2] * pz
        x = (a2[0, 0] * rx + a2[0, 1] * ry + c[0]).astype(np.float32)
        y = (a2[1, 0] * rx + a2[1, 1] * ry + c[1]).astype(np.float32)
    return cv2.remap(img, x, y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def render_frames(portrait: Portrait, case: MotionCase, face_px: float = 285.0,
                  frame_size: tuple[int, int] = (720, 720), noise: float = 2.0, seed: int = 0):
    """Yield the case's RGB frames: the face centred (plus shift), ``face_px`` landmark-box side."""
    import cv2

    w, h = frame_size
    rng = np.random.default_rng(seed)
    base = face_px / portrait.face_px
    out_c = np.array([w / 2.0, h / 2.0])
    for f in range(case.frames):
        s = base * float(case.scale[f])
        source = portrait.image
        if case.yaw_deg[f] or case.pitch_deg[f]:
            source = _turned(portrait, float(case.yaw_deg[f]), float(case.pitch_deg[f]))
        # our roll is clockwise on screen; OpenCV's angle is counter-clockwise
        m = cv2.getRotationMatrix2D((float(portrait.center[0]), float(portrait.center[1])), -float(case.roll_deg[f]), s)
        m[:, 2] += out_c + case.shift_px[f] - portrait.center
        frame = cv2.warpAffine(source, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if noise > 0:
            frame = np.clip(frame + rng.normal(0.0, noise, frame.shape), 0, 255).astype(np.uint8)
        yield frame


def write_case_video(portrait: Portrait, case: MotionCase, path: str, face_px: float = 285.0,
                     frame_size: tuple[int, int] = (720, 720), crf: int = 18, seed: int = 0) -> str:
    from emo_data.shards import encode_mp4

    data = encode_mp4(render_frames(portrait, case, face_px, frame_size, seed=seed), FPS, crf=crf, preset="veryfast")
    tmp = path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# measuring through the build's code path
@dataclass
class CaseResult:
    case: MotionCase
    speed: np.ndarray             # [T] stored speed (NaN where no clip covers the frame)
    speed_raw: np.ndarray         # [T] speed of the stored per-frame (unsmoothed) pose, NaN where lost
    pose: np.ndarray              # [T, 6] stored pose (NaN where lost)
    frames_lost: int              # frames in no clip: the face was lost (or its clip was too short)
    clips: int
    pose_error: np.ndarray        # [T] deg: residual rotation vs truth, relative to each clip's first frame
    roll_span: float              # measured roll range (max - min) within the longest clip
    roll_span_true: float
    steady: np.ndarray            # [T] bool: frames away from the truth's kinks (see MotionCase.steady)
    seconds: float = 0.0          # wall time of video pass + head pose

    def speed_errors(self, steady_only: bool = True) -> np.ndarray:
        ok = np.isfinite(self.speed) & (self.steady if steady_only else True)
        return np.abs(self.speed[ok] - self.case.true_speed[ok])

    def summary(self) -> dict:
        err = self.speed_errors()
        err_all = self.speed_errors(steady_only=False)
        raw = np.abs(self.speed_raw - self.case.true_speed)[np.isfinite(self.speed_raw) & self.steady]
        perr = self.pose_error[np.isfinite(self.pose_error)]
        stat = (lambda a, fn: float(fn(a)) if len(a) else float("nan"))
        p90 = (lambda a: np.percentile(a, 90))
        return {
            "case": self.case.name,
            "kind": self.case.kind,
            "true_rate": self.case.nominal_rate,
            "frames": self.case.frames,
            "speed_median": stat(self.speed[np.isfinite(self.speed)], np.median),
            "speed_mean": stat(self.speed[np.isfinite(self.speed)], np.mean),
            "true_mean": stat(self.case.true_speed[np.isfinite(self.speed)], np.mean),
            "err_median": stat(err, np.median),
            "err_mean": stat(err, np.mean),
            "err_p90": stat(err, p90),
            "err_max": stat(err, np.max),
            "err_mean_all_frames": stat(err_all, np.mean),
            "raw_err_median": stat(raw, np.median),
            "raw_err_p90": stat(raw, p90),
            "pose_err_median": stat(perr, np.median),
            "pose_err_max": stat(perr, np.max),
            "roll_span": self.roll_span,
            "roll_span_true": self.roll_span_true,
            "frames_lost": self.frames_lost,
            "clips": self.clips,
            "seconds": self.seconds,
        }


def _rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = np.clip((np.trace(a.T @ b) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def measure_video(path: str, case: MotionCase, config=None, face_backend=None,
                  on_clip: Optional[Callable] = None) -> CaseResult:
    """Run ``path`` through VideoPassStage + HeadPoseStage (build defaults unless ``config``)."""
    import time

    from emo_data.clip_work import ClipInFlight, add_head_motion
    from emo_data.clips import VideoPassInput, VideoPassStage
    from emo_data.config import BuildConfig
    from emo_data.pose import HeadPoseStage, euler_to_matrix, rotation_speed
    from emo_data.types import AudioTrack, ClipCandidate, ProbeInfo, Source, SpeechSegment

    cfg = config or BuildConfig()
    n = case.frames
    duration = n / FPS
    source = Source(path=path, source_id=Path(path).stem.replace(".", "-"), kind="talk")
    probe = ProbeInfo(path=path, duration_s=duration, has_video=True, has_audio=True)
    audio = AudioTrack(np.zeros(int(duration * 16000), np.float32), 16000, 0.0)
    video = VideoPassStage(cfg, face_backend=face_backend)
    video.ensure_setup()
    pose_stage = HeadPoseStage(cfg.speed)
    t0 = time.perf_counter()
    clips: list[tuple[ClipCandidate, object]] = []
    for item in video.process(VideoPassInput(source, probe, audio, [SpeechSegment(0.0, duration + 1.0)])):
        if isinstance(item, ClipCandidate):
            flight = add_head_motion(ClipInFlight(item), pose_stage, cfg.clip.crop_size)
            clips.append((item, flight.motion))
            if on_clip is not None:
                on_clip(item, flight.motion)
    seconds = time.perf_counter() - t0

    speed = np.full(n, np.nan)
    speed_raw = np.full(n, np.nan)
    pose = np.full((n, 6), np.nan)
    pose_error = np.full(n, np.nan)
    covered = np.zeros(n, bool)
    roll_span = roll_span_true = 0.0
    longest = 0
    for clip, motion in clips:
        lo = int(round(clip.start_s * FPS))
        hi = lo + clip.num_frames
        covered[lo:hi] = True
        speed[lo:hi] = motion.speed
        pose[lo:hi] = motion.pose
        raw = getattr(motion, "raw_pose", None)  # absent in checkouts before head_pose_raw
        if raw is not None:
            speed_raw[lo:hi] = rotation_speed(raw)
        mats = [euler_to_matrix(*row[:3]) for row in motion.pose]
        truth = case.rotations()
        for k in range(clip.num_frames):
            applied = truth[lo + k] @ truth[lo].T  # the head's turn since the clip's first frame
            pose_error[lo + k] = _rotation_angle(mats[k], applied @ mats[0])
        if clip.num_frames > longest:
            longest = clip.num_frames
            roll_span = float(np.ptp(np.unwrap(np.radians(motion.pose[:, 2])))) * 180.0 / math.pi
            roll_span_true = float(np.ptp(case.roll_deg[lo:hi]))
    steady = case.steady(int(cfg.speed.smooth_frames) // 2)
    return CaseResult(case, speed, speed_raw, pose, int((~covered).sum()), len(clips), pose_error,
                      roll_span, roll_span_true, steady, seconds)


def measure_case(portrait: Portrait, case: MotionCase, workdir: str, config=None, face_backend=None,
                 face_px: float = 285.0, frame_size: tuple[int, int] = (720, 720), seed: int = 0) -> CaseResult:
    """Render (cached by name and parameters), then :func:`measure_video`."""
    import hashlib

    motion = np.concatenate([case.roll_deg, case.yaw_deg, case.pitch_deg, case.scale, case.shift_px.ravel()])
    if case.out_of_plane:  # the relief is part of what was rendered
        motion = np.concatenate([motion, _mean_face().ravel(), [_RELIEF_BACK, _RELIEF_PIVOT]])
    tag = hashlib.sha1(
        f"{portrait.name}|{case.name}|{face_px}|{frame_size}|{seed}|".encode() + motion.tobytes()
    ).hexdigest()[:12]
    path = os.path.join(workdir, f"{portrait.name}-{tag}.mp4")
    if not os.path.exists(path):
        write_case_video(portrait, case, path, face_px, frame_size, seed=seed)
    return measure_video(path, case, config, face_backend)
