"""Head pose (solvePnP), rotation speed, EMO speed buckets and HeadPoseStage."""
from __future__ import annotations


import numpy as np
import pytest

from emo_data.config import SpeedConfig
from emo_data.pose import (
    IBUG68_INDICES,
    HeadMotion,
    HeadPoseInput,
    HeadPoseStage,
    euler_to_matrix,
    fit_bucket_centers,
    head_pose_from_landmarks,
    matrix_to_euler,
    project_model,
    rotation_speed,
    smooth_pose,
    speed_buckets,
)
from emo_data.stage import StageError

from conftest import SAMPLES  # noqa: E402 - ../shared/samples or $EMO_SAMPLES_DIR
SIZE = (512, 512)
T_FACE = (20.0, -15.0, 2400.0)


def synthetic_landmarks(angles, size=SIZE, t=T_FACE, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((len(angles), 68, 2), np.float32)
    for i, (y, p, r) in enumerate(angles):
        out[i] = 256.0  # unused points: anywhere finite
        out[i, IBUG68_INDICES] = project_model(y, p, r, t, size)
    return out + rng.normal(0, noise, out.shape).astype(np.float32) if noise else out


def test_euler_roundtrip():
    for ang in [(0, 0, 0), (30, -20, 10), (-60, 40, -75)]:
        np.testing.assert_allclose(matrix_to_euler(euler_to_matrix(*ang)), ang, atol=1e-9)


@pytest.mark.parametrize("angles", [(0, 0, 0), (20, -10, 5), (-35, 15, -12), (10, 25, 30),
                                    (-45, -20, 0)])
def test_solvepnp_recovers_known_rotation(angles):
    pose = head_pose_from_landmarks(synthetic_landmarks([angles]), SIZE)
    assert pose.shape == (1, 6) and pose.dtype == np.float32
    np.testing.assert_allclose(pose[0, :3], angles, atol=2.0)
    np.testing.assert_allclose(pose[0, 3:], T_FACE, rtol=0.02, atol=2.0)


def test_solvepnp_sequence_with_landmark_noise():
    angles = [(15 * np.sin(i / 8), 8 * np.cos(i / 11), 5 * np.sin(i / 5)) for i in range(40)]
    pose = head_pose_from_landmarks(synthetic_landmarks(angles, noise=0.3), SIZE)
    err = np.abs(pose[:, :3] - np.array(angles))
    assert np.median(err) < 1.5 and err.max() < 6.0


def test_nonfinite_landmarks_give_nan_rows_and_stage_interpolates():
    lms = synthetic_landmarks([(0, 0, 0), (2, 0, 0), (4, 0, 0)])
    lms[1] = np.nan
    pose = head_pose_from_landmarks(lms, SIZE)
    assert np.isnan(pose[1]).all() and np.isfinite(pose[[0, 2]]).all()
    motion = HeadPoseStage(SpeedConfig(smooth_frames=1))(HeadPoseInput(lms, 512))
    assert motion.pose[1, 0] == pytest.approx(2.0, abs=0.5)


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


def test_smooth_pose():
    t = np.arange(20, dtype=np.float32)
    pose = np.stack([t, 2 * t, np.full(20, 3.0), t, t, t], 1)
    sm = smooth_pose(pose, 5)
    assert sm.shape == pose.shape and sm.dtype == np.float32
    np.testing.assert_allclose(sm[2:-2], pose[2:-2], atol=1e-5)  # linear ramps kept inside
    np.testing.assert_allclose(sm[:, 2], 3.0)
    assert sm[0, 0] == pytest.approx((0 + 0 + 0 + 1 + 2) / 5)  # edge padding
    spike = np.zeros((9, 6), np.float32)
    spike[4] = 5
    np.testing.assert_allclose(smooth_pose(spike, 5)[2:7, 0], 1.0)  # centred
    np.testing.assert_allclose(smooth_pose(pose, 1), pose)


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
    assert motion.pose.shape == (30, 6) and motion.speed.shape == (30,)
    assert motion.buckets.shape == (30, len(cfg.centers))
    np.testing.assert_allclose(motion.speed[3:-3], omega, atol=0.05)
    np.testing.assert_allclose(motion.buckets, speed_buckets(motion.speed, cfg.centers, cfg.radii))


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
def test_speed_on_real_talking_head_is_small():
    import av

    from emo_data.config import FaceConfig
    from emo_data.faces import FaceTracker, make_face_backend

    backend = make_face_backend(FaceConfig())
    tracker = FaceTracker(backend, FaceConfig(detect_every=5))
    lms = []
    with av.open(str(SAMPLES / "video/sadtalker__WDA_KatieHill_000.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= 75:
                break
            faces = tracker.update(f.to_ndarray(format="rgb24"), i, need_landmarks=True)
            assert len(faces) == 1
            lms.append(faces[0].landmarks)
    motion = HeadPoseStage(SpeedConfig())(HeadPoseInput(np.stack(lms), (512, 512)))
    assert np.all(np.isfinite(motion.pose)) and np.all(np.isfinite(motion.speed))
    assert np.median(motion.speed) < 3.0
    assert motion.speed.max() < 15.0
    assert np.all(np.abs(motion.pose[:, :3]) < 60)  # a frontal address: no wild angles
