"""Head pose (solvePnP), rotation speed, EMO speed buckets and HeadPoseStage."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from emo_data.config import SpeedConfig
from emo_data.pose import (
    FACE_MODEL_3D,
    FOCAL_EYE_SPANS,
    IBUG68_INDICES,
    HeadMotion,
    HeadPoseInput,
    HeadPoseStage,
    PoseSolver,
    euler_to_matrix,
    fill_missing,
    fit_bucket_centers,
    head_pose_from_landmarks,
    line_of_sight_rotation,
    matrix_to_euler,
    project_model,
    rotation_speed,
    smooth_pose,
    speed_buckets,
)
from emo_data.stage import StageError

SAMPLES = (Path(__file__).parents[1] / ".." / "shared" / "samples").resolve()
SIZE = (512, 512)
T_FACE = (20.0, -15.0, 2400.0)
FOCAL = 1500.0


def synthetic_landmarks(angles, size=SIZE, t=T_FACE, noise=0.0, seed=0, focal=FOCAL):
    """ibug-68 arrays whose rigid points are the face model posed by egocentric ``angles``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(angles), 68, 2), np.float32)
    for i, (y, p, r) in enumerate(angles):
        out[i] = 256.0  # points the pose does not use: anywhere finite
        out[i, IBUG68_INDICES] = project_model(y, p, r, t, size, focal)
    return out + rng.normal(0, noise, out.shape).astype(np.float32) if noise else out


def allocentric(angles, t=T_FACE):
    """The angles the solver reports for a face posed by egocentric ``angles`` at ``t``."""
    rot = euler_to_matrix(*angles)
    centre = rot @ FACE_MODEL_3D.mean(axis=0) + np.asarray(t)
    return matrix_to_euler(line_of_sight_rotation(centre).T @ rot)


def test_euler_roundtrip():
    for ang in [(0, 0, 0), (30, -20, 10), (-60, 40, -75)]:
        np.testing.assert_allclose(matrix_to_euler(euler_to_matrix(*ang)), ang, atol=1e-9)


def test_line_of_sight_rotation():
    for p in [(0.0, 0.0, 3.0), (10.0, -20.0, 100.0), (-300.0, 40.0, 500.0)]:
        rot = line_of_sight_rotation(np.array(p))
        np.testing.assert_allclose(rot @ [0, 0, 1], np.array(p) / np.linalg.norm(p), atol=1e-12)
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, -10, 5), (-35, 15, -12), (10, 25, 30),
                                    (-45, -20, 0)])
def test_solvepnp_recovers_known_rotation(angles):
    pose = head_pose_from_landmarks(synthetic_landmarks([angles]), SIZE, focal=FOCAL)
    assert pose.shape == (1, 6) and pose.dtype == np.float32
    np.testing.assert_allclose(pose[0, :3], allocentric(angles), atol=0.05)
    np.testing.assert_allclose(pose[0, 3:], T_FACE, rtol=1e-3, atol=0.5)
    # the line of sight through this (off-centre) face is ~0.5 deg off the axis
    assert np.abs(np.subtract(allocentric(angles), angles)).max() > 0.2


def test_pose_does_not_change_when_the_face_slides_across_the_image():
    """A camera pan moves the face's image, not its rotation: allocentric angles stay, the
    egocentric ones would turn by the viewing angle (~3.8 deg for 100 px at f = 1500)."""
    lms = synthetic_landmarks([(10, -5, 3)], t=(0.0, 0.0, 2400.0))
    moved = lms.copy()
    moved[0, IBUG68_INDICES] += np.array([100.0, 40.0], np.float32)
    a = head_pose_from_landmarks(lms, SIZE, focal=FOCAL)[0]
    b = head_pose_from_landmarks(moved, SIZE, focal=FOCAL)[0]
    assert np.abs(a[:3] - b[:3]).max() < 0.3
    rvec = [cv2.solvePnP(FACE_MODEL_3D, m[0, IBUG68_INDICES].astype(np.float64),
                         np.array([[FOCAL, 0, 256], [0, FOCAL, 256], [0, 0, 1.0]]), None,
                         flags=cv2.SOLVEPNP_SQPNP)[1] for m in (lms, moved)]
    ego = np.degrees(np.linalg.norm(cv2.Rodrigues(cv2.Rodrigues(rvec[0])[0].T @ cv2.Rodrigues(rvec[1])[0])[0]))
    assert ego > 3.0


def test_default_focal_scales_with_the_face():
    """Without a focal the solver picks FOCAL_EYE_SPANS eye spans: the same face at half the
    size (and half the focal) gives the same angles."""
    angles = [(15, -8, 4)]
    big = synthetic_landmarks(angles, t=(0.0, 0.0, 2000.0), focal=2000.0)
    small = (big - 256.0) * 0.5 + 256.0
    a = head_pose_from_landmarks(big, SIZE)[0]
    b = head_pose_from_landmarks(small, SIZE)[0]
    np.testing.assert_allclose(a[:3], b[:3], atol=0.05)
    solver = PoseSolver(SIZE)
    solver.solve(big[0])
    span = np.linalg.norm(big[0, 45] - big[0, 36])
    assert solver.focal == pytest.approx(FOCAL_EYE_SPANS * span, rel=1e-5)


def test_solvepnp_sequence_with_landmark_noise():
    angles = [(15 * np.sin(i / 8), 8 * np.cos(i / 11), 5 * np.sin(i / 5)) for i in range(40)]
    pose = head_pose_from_landmarks(synthetic_landmarks(angles, noise=0.3), SIZE, focal=FOCAL)
    err = np.abs(pose[:, :3] - np.array([allocentric(a) for a in angles]))
    assert np.median(err) < 1.5 and err.max() < 6.0


def test_nonfinite_landmarks_give_nan_rows_and_stage_interpolates():
    lms = synthetic_landmarks([(0, 0, 0), (2, 0, 0), (4, 0, 0)])
    lms[1] = np.nan
    pose = head_pose_from_landmarks(lms, SIZE, focal=FOCAL)
    assert np.isnan(pose[1]).all() and np.isfinite(pose[[0, 2]]).all()
    motion = HeadPoseStage(SpeedConfig(smooth_frames=1))(HeadPoseInput(lms, 512))
    assert motion.pose[1, 0] == pytest.approx((motion.pose[0, 0] + motion.pose[2, 0]) / 2, abs=0.05)
    assert np.isfinite(motion.raw_pose).all()


def test_fill_missing_interpolates_rotations_on_the_sphere():
    pose = np.zeros((5, 6), np.float32)
    pose[:, 2] = [170, np.nan, np.nan, np.nan, -170]  # 20 deg of roll across the +-180 wrap
    pose[1:4, :] = np.nan
    pose[:, 3:] = [[0, 0, 1000]] * 5
    pose[1:4, 3:] = np.nan
    filled = fill_missing(pose)
    np.testing.assert_allclose(rotation_speed(filled), 5.0, atol=1e-3)  # not 85 deg steps
    np.testing.assert_allclose(filled[:, 5], 1000.0)


def test_rotation_speed_of_constant_rotation():
    # R_f = R_0 · Rot(axis, f·ω) about a fixed oblique axis: every step is exactly ω degrees,
    # though all three Euler angles change non-uniformly.
    axis = np.array([0.3, 0.8, 0.5])
    axis /= np.linalg.norm(axis)
    omega = 1.7
    r0 = euler_to_matrix(10, -5, 3)
    import cv2

    pose = np.zeros((30, 6), np.float32)
    for f in range(30):
        rf = r0 @ cv2.Rodrigues(axis * np.radians(omega * f))[0]
        pose[f, :3] = matrix_to_euler(rf)
    speed = rotation_speed(pose)
    assert speed.shape == (30,) and speed.dtype == np.float32
    np.testing.assert_allclose(speed, omega, atol=1e-3)  # includes w_0 := w_1
    # Euler-difference "speed" would be wrong here: the rotation-matrix speed is not that
    eul = np.linalg.norm(np.diff(pose[:, :3], axis=0), axis=1)
    assert np.abs(eul - omega).max() > 0.05


def test_rotation_speed_edge_cases():
    assert rotation_speed(np.zeros((1, 6))).tolist() == [0.0]
    assert rotation_speed(np.zeros((0, 6))).shape == (0,)
    pose = np.zeros((3, 6), np.float32)
    pose[1:, 0] = 4.0  # a single 4-degree yaw step between frames 0 and 1
    np.testing.assert_allclose(rotation_speed(pose), [4, 4, 0], atol=1e-4)


def test_smooth_pose_keeps_steady_turns_and_removes_jitter():
    rng = np.random.default_rng(0)
    n = 60
    truth = np.zeros((n, 6), np.float32)
    truth[:, 0] = 0.4 * np.arange(n) - 12      # yaw 0.4 deg/frame
    truth[:, 2] = 0.3 * np.arange(n)           # roll 0.3 deg/frame
    truth[:, 3:] = [10, 20, 3000]
    true_speed = rotation_speed(truth)
    sm = smooth_pose(truth, 15)
    assert sm.shape == truth.shape and sm.dtype == np.float32
    np.testing.assert_allclose(rotation_speed(sm), true_speed, atol=1e-3)  # up to the last frame
    noisy = truth + np.c_[rng.normal(0, 0.3, (n, 3)), np.zeros((n, 3))].astype(np.float32)
    raw_err = np.abs(rotation_speed(noisy) - true_speed).mean()
    sm_err = np.abs(rotation_speed(smooth_pose(noisy, 15)) - true_speed).mean()
    assert sm_err < raw_err / 5
    np.testing.assert_allclose(smooth_pose(truth, 1), truth)  # too short a window: a copy
    assert smooth_pose(truth[:2], 15).shape == (2, 6)          # clip shorter than the window


def test_smooth_pose_on_rotations_across_the_euler_wrap():
    """Roll passing +-180: the Euler numbers jump by 360, the rotation does not. Smoothing the
    numbers (the old moving average) made a spike of ~70 deg/frame; quaternions do not."""
    pose = np.zeros((40, 6), np.float32)
    roll = 160 + np.arange(40) * 1.0
    pose[:, 2] = (roll + 180) % 360 - 180
    np.testing.assert_allclose(rotation_speed(smooth_pose(pose, 9)), 1.0, atol=1e-3)


def test_speed_buckets_formula():
    centers, radii = [0.0, 0.5, 1.5], [0.1, 0.25, 0.5]
    w = np.array([0.0, 0.3, 0.5, 2.0, 10.0], np.float32)
    s = speed_buckets(w, centers, radii)
    assert s.shape == (5, 3) and s.dtype == np.float32
    for i, wi in enumerate(w):
        for j, (c, r) in enumerate(zip(centers, radii)):
            assert s[i, j] == pytest.approx(np.tanh((wi - c) / r * 3), abs=1e-6)
    assert s[2, 1] == 0.0  # at a centre the bucket reads 0
    with pytest.raises(ValueError):
        speed_buckets(w, [0.0], [0.0])


def test_fit_bucket_centers_monotone():
    rng = np.random.default_rng(0)
    speeds = rng.exponential(0.6, 5000)
    for d in (1, 4, 9):
        centers, radii = fit_bucket_centers(speeds, d)
        assert len(centers) == len(radii) == d
        assert all(b > a for a, b in zip(centers, centers[1:]))
        assert all(r > 0 for r in radii)
    centers, radii = fit_bucket_centers(speeds, 4)
    np.testing.assert_allclose(centers, np.quantile(speeds, [0.125, 0.375, 0.625, 0.875]))
    gaps = np.diff(centers)
    np.testing.assert_allclose(radii, [gaps[0] / 2, min(gaps[:2]) / 2, min(gaps[1:]) / 2, gaps[-1] / 2])
    # many ties (a corpus of still heads): still strictly increasing, positive radii
    centers, radii = fit_bucket_centers(np.r_[np.zeros(900), rng.uniform(0, 2, 100)], 9)
    assert all(b > a for a, b in zip(centers, centers[1:])) and min(radii) > 0


def test_stage_shapes_and_speed_on_synthetic_turn():
    omega = 0.8  # pure yaw turn: degrees per frame
    angles = [(omega * f - 12, 0, 0) for f in range(30)]
    cfg = SpeedConfig()
    motion = HeadPoseStage(cfg)(HeadPoseInput(synthetic_landmarks(angles), (512, 512)))
    assert isinstance(motion, HeadMotion)
    assert motion.pose.shape == (30, 6) and motion.speed.shape == (30,) and motion.raw_pose.shape == (30, 6)
    assert motion.buckets.shape == (30, len(cfg.centers))
    # the solver's focal (FOCAL_EYE_SPANS eye spans, ~2800 px here) is ~2x the projection's
    # (1500 px): yaw rates come out up to ~7 % high -- the real focal of footage is unknown too
    np.testing.assert_allclose(motion.speed, omega, rtol=0.1)
    np.testing.assert_allclose(motion.buckets, speed_buckets(motion.speed, cfg.centers, cfg.radii))
    np.testing.assert_allclose(motion.raw_pose, head_pose_from_landmarks(synthetic_landmarks(angles), SIZE))


def test_stage_backend_pose_and_unsupported_format():
    stage = HeadPoseStage(SpeedConfig(smooth_frames=1))
    bp = np.zeros((10, 6), np.float32)
    bp[:, 0] = np.arange(10) * 0.5
    lm106 = np.zeros((10, 106, 2), np.float32)
    m = stage(HeadPoseInput(lm106, 512, "insightface106", backend_pose=bp))
    np.testing.assert_allclose(m.speed, 0.5, atol=1e-4)
    with pytest.raises(StageError) as err:
        stage(HeadPoseInput(lm106, 512, "insightface106"))
    assert err.value.reason == "unsupported_landmarks"
    with pytest.raises(StageError):
        stage(HeadPoseInput(np.zeros((0,), np.float32), 512))


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample footage not found at {SAMPLES}")
def test_tracker_pose_on_real_talking_head():
    """The tracker's per-frame poses (what clips carry as backend_pose) on a real address."""
    import av

    from emo_data.config import FaceConfig
    from emo_data.faces import FaceTracker, make_face_backend

    backend = make_face_backend(FaceConfig())
    tracker = FaceTracker(backend, FaceConfig(detect_every=5))
    poses = []
    with av.open(str(SAMPLES / "video/video-retalking__face_2.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= 75:
                break
            faces = tracker.update(f.to_ndarray(format="rgb24"), i, need_landmarks=True)
            assert len(faces) == 1 and faces[0].pose is not None and faces[0].pose.shape == (6,)
            poses.append(faces[0].pose)
    motion = HeadPoseStage(SpeedConfig())(HeadPoseInput(np.zeros((75, 68, 2), np.float32), 512, backend_pose=np.stack(poses)))
    assert np.all(np.isfinite(motion.pose)) and np.all(np.isfinite(motion.speed))
    # a calm address: below EMO's speech range's top (measured 0.45 median, 1.4 max)
    assert np.median(motion.speed) < 1.0 and motion.speed.max() < 3.0
    assert np.all(np.abs(motion.pose[:, :3]) < 40)  # a frontal address: no wild angles
    # smoothing removes the per-frame pose's remaining jitter: the stored speed's upper tail is lower
    raw_speed = rotation_speed(motion.raw_pose)
    assert np.percentile(motion.speed, 90) < np.percentile(raw_speed, 90) and motion.speed.max() < raw_speed.max()


def test_render_plots_raw_and_smoothed_speed(tmp_path):
    """emo-shards render's speed panel: the stored (smoothed) speed and the speed of
    head_pose_raw.npy when the sample has it; samples without it still render."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    from emo_data import schema
    from emo_data.inspect.render import contact_sheet, decode_for_render

    from shard_fixtures import make_sample

    key, members, _meta = make_sample(0, frames=20, with_audio_emb=False)
    raw = dict(members, __key__=key)
    pose = schema.load_npy(raw["head_pose.npy"])
    jitter = np.random.default_rng(0).normal(0, 0.5, pose.shape).astype(np.float32)
    raw["head_pose_raw.npy"] = schema.npy_bytes(pose + jitter)
    meta = json.loads(raw["json"])
    assert schema.validate_sample(raw, decode_media=False) == []  # an optional, valid member
    d = decode_for_render(raw)
    assert d["pose_raw"].shape == pose.shape
    drawn = {}
    import matplotlib.axes

    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn[kwargs.get("label")] = np.asarray(args[1])
        return plot(self, *args, **kwargs)

    matplotlib.axes.Axes.plot = spy
    try:
        contact_sheet(d, str(tmp_path / "sheet.png"), n_frames=2)
        raw_no = dict(raw)
        del raw_no["head_pose_raw.npy"]
        contact_sheet(decode_for_render(raw_no), str(tmp_path / "sheet2.png"), n_frames=2)
    finally:
        matplotlib.axes.Axes.plot = plot
    assert (tmp_path / "sheet.png").stat().st_size > 0 and (tmp_path / "sheet2.png").stat().st_size > 0
    raw_label = next(k for k in drawn if k and "head_pose_raw" in k)
    np.testing.assert_allclose(drawn[raw_label], rotation_speed(pose + jitter))
    assert meta["num_frames"] == 20
