"""Face backends and tracker, on real sample footage (dlib) and stubs / random weights."""
from __future__ import annotations

import os
import socket
import time

import cv2
import numpy as np
import pytest

from emo_data.config import FaceConfig
from emo_data.faces import FaceBackend, FaceBackendUnavailable, FaceTracker, box_iou, make_face_backend
from emo_data.types import Face

from conftest import SAMPLES  # noqa: E402 - ../shared/samples or $EMO_SAMPLES_DIR

needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"sample footage not found at {SAMPLES} (read-only fixtures)"
)

KATIE = "video/sadtalker__WDA_KatieHill_000.mp4"
AOC = "video/sadtalker__WDA_AlexandriaOcasioCortez_000.mp4"
SWALWELL = "video/video-retalking__face_2.mp4"
COCKATOO = "video/imageio__cockatoo.mp4"
HAMILTON = "video/face_recognition__short_hamilton_clip.mp4"
TWO_PEOPLE = "images/face_recognition__two_people.jpg"


def frames(rel: str, indices) -> list[np.ndarray]:
    import av

    wanted = sorted(set(indices))
    out = {}
    with av.open(str(SAMPLES / rel)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in wanted:
                out[i] = f.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    return [out[i] for i in indices]


def image(rel: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(SAMPLES / rel)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def dlib_backend():
    b = make_face_backend(FaceConfig())
    b.setup()
    return b


# ---------------------------------------------------------------------------------- factory
def test_factory_names_and_attributes():
    for name, cls_name, k, fmt, dim, pose in [
        ("dlib", "DlibBackend", 68, "ibug68", 128, False),
        ("insightface", "InsightFaceBackend", 106, "insightface106", 512, True),
        ("face_alignment", "FaceAlignmentBackend", 68, "ibug68", 128, False),
    ]:
        b = make_face_backend(FaceConfig(backend=name))
        assert isinstance(b, FaceBackend) and type(b).__name__ == cls_name
        assert (b.name, b.landmark_count, b.landmark_format, b.embedding_dim, b.provides_pose) == (
            name, k, fmt, dim, pose)
    with pytest.raises(ValueError, match="unknown face backend"):
        make_face_backend(FaceConfig(backend="mediapipe"))
    assert issubclass(FaceBackendUnavailable, RuntimeError)


# ---------------------------------------------------------------------------------- dlib, real
@needs_samples
@pytest.mark.parametrize("rel,idx", [(KATIE, [0, 120]), (SWALWELL, [0, 100]), (AOC, [60])])
def test_dlib_one_face_in_talking_heads(dlib_backend, rel, idx):
    for img in frames(rel, idx):
        faces = dlib_backend.detect(img)
        assert len(faces) == 1, rel
        box = faces[0].box
        assert box.dtype == np.float32 and box.shape == (4,)
        h, w = img.shape[:2]
        # full-frame coordinates (not the 320-px detection image): a big face in a face crop
        assert 0.25 * w < box[2] - box[0] < 0.9 * w
        assert -0.1 * w < box[0] < box[2] < 1.1 * w and -0.1 * h < box[1] < box[3] < 1.1 * h


@needs_samples
def test_dlib_no_face_in_cockatoo(dlib_backend):
    for img in frames(COCKATOO, [0, 70, 140, 210, 270]):
        assert dlib_backend.detect(img) == []


@needs_samples
def test_dlib_two_faces_in_two_people():
    # The faces are 150 px in a 1126 px photo: at the default detect_max_side=320 they shrink to
    # ~43 px, below dlib HOG's 80 px window, so this needs a larger detection size.
    b = make_face_backend(FaceConfig(detect_max_side=800))
    img = image(TWO_PEOPLE)
    faces = b.detect(img)
    assert len(faces) >= 2
    boxes = sorted((f.box for f in faces), key=lambda b: b[0])
    assert box_iou(boxes[0], boxes[1]) == 0.0
    assert boxes[0][2] < img.shape[1] / 2 < boxes[1][0]  # one on each side of the photo


@needs_samples
def test_dlib_landmarks_inside_box(dlib_backend):
    img = frames(KATIE, [10])[0]
    faces = dlib_backend.detect(img)
    (lm,) = dlib_backend.landmarks(img, [faces[0].box])
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    lb = np.r_[lm.min(0), lm.max(0)]
    assert box_iou(lb, faces[0].box) > 0.6
    # anatomy: eyes above nose tip above mouth above chin (image y grows downwards)
    assert lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]
    assert lm[36, 0] < lm[45, 0]


@needs_samples
def test_dlib_embeddings_same_person_closer(dlib_backend):
    def emb(img):
        faces = dlib_backend.detect(img)
        assert len(faces) == 1
        (lm,) = dlib_backend.landmarks(img, [faces[0].box])
        faces[0].landmarks = lm
        e = dlib_backend.embed(img, faces[0])
        assert e.shape == (128,) and e.dtype == np.float32
        return e

    k0, k1 = (emb(x) for x in frames(KATIE, [0, 180]))
    a0 = emb(frames(AOC, [0])[0])
    s0 = emb(frames(SWALWELL, [0])[0])
    # embedding without landmarks (predicted internally) is close to the one with them
    img = frames(KATIE, [0])[0]
    f = dlib_backend.detect(img)[0]
    assert np.linalg.norm(dlib_backend.embed(img, f) - k0) < 0.1

    two = image(TWO_PEOPLE)
    tf = make_face_backend(FaceConfig(detect_max_side=800)).detect(two)
    t_a, t_b = (dlib_backend.embed(two, x) for x in tf[:2])
    same = np.linalg.norm(k0 - k1)
    diffs = [np.linalg.norm(k0 - a0), np.linalg.norm(k0 - s0), np.linalg.norm(t_a - t_b),
             np.linalg.norm(k0 - t_a), np.linalg.norm(a0 - s0)]
    assert same < 0.5 < min(diffs), (same, diffs)


def test_detection_scale_keeps_smallest_accepted_face_visible():
    # 1920x1080, faces down to 0.12 x 1080 = 130 px must stay >= 80 px for dlib's HOG
    b = make_face_backend(FaceConfig(detect_max_side=320, min_face_fraction=0.12, min_face_px=0))
    s = b.detection_scale(1920, 1080)
    assert 0.12 * 1080 * s == pytest.approx(80, rel=1e-6) and s > 320 / 1920
    up = make_face_backend(FaceConfig(detect_max_side=320, min_face_fraction=0.12, min_face_px=0, upsample=1))
    assert up.detection_scale(1920, 1080) == pytest.approx(s / 2)
    assert b.detection_scale(512, 512) == 1.0  # never upscales
    small = make_face_backend(FaceConfig(detect_max_side=320, min_face_fraction=0.0, min_face_px=0))
    assert small.detection_scale(1920, 1080) == pytest.approx(320 / 1920)
    # the absolute limit: a 96-px face in a 640x360 frame must stay >= 80 px
    absolute = make_face_backend(FaceConfig(detect_max_side=320, min_face_fraction=0.15, min_face_px=96))
    assert absolute.detection_scale(640, 360) == pytest.approx(80 / 96)
    ins = make_face_backend(FaceConfig(backend="insightface", detect_max_side=320))
    assert ins.detection_scale(512, 512) == pytest.approx(320 / 512)  # SCRFD sees 20-px faces


# ---------------------------------------------------------------------------------- tracker
@needs_samples
@pytest.mark.parametrize("need_landmarks", [True, False])
def test_tracker_stable_id_and_boxes_follow_detections(dlib_backend, need_landmarks):
    cfg = FaceConfig(detect_every=5)
    tracker = FaceTracker(dlib_backend, cfg)
    imgs = frames(KATIE, list(range(50)))
    ids, ious = set(), []
    for i, img in enumerate(imgs):
        faces = tracker.update(img, i, need_landmarks=need_landmarks)
        assert len(faces) == 1
        ids.add(faces[0].track_id)
        if need_landmarks:
            assert faces[0].landmarks is not None and faces[0].landmarks.shape == (68, 2)
        else:
            assert faces[0].landmarks is None
        per_frame = dlib_backend.detect(img)
        ious.append(box_iou(per_frame[0].box, faces[0].box))
    assert len(ids) == 1
    assert tracker.detections_run == 10
    assert np.median(ious) > 0.9
    # With landmarks the box is re-fitted every frame. Without, it is held between detections;
    # HOG boxes at 320 px themselves jump between consecutive frames (IoU down to ~0.68 here),
    # so a held box can be one such jump away from the next frame's fresh detection.
    assert min(ious) > (0.6 if need_landmarks else 0.5), min(ious)


@needs_samples
def test_tracker_reset_and_no_face(dlib_backend):
    tracker = FaceTracker(dlib_backend, FaceConfig(detect_every=5))
    k = frames(KATIE, [0, 1])
    first = tracker.update(k[0], 0, False)[0].track_id
    assert tracker.update(k[1], 1, False)[0].track_id == first
    tracker.reset()  # scene cut: the next frame is detected even though 2 % 5 != 0
    before = tracker.detections_run
    for i, img in enumerate(frames(COCKATOO, [0, 1, 2]), start=2):
        assert tracker.update(img, i, True) == []
    # detect after the reset (frame 2) and at frame 5's turn only: no face found is no reason to
    # run the detector on every frame of face-less footage
    assert tracker.detections_run == before + 1
    eager = FaceTracker(dlib_backend, FaceConfig(detect_every=5), detect_when_empty=True)
    for i, img in enumerate(frames(COCKATOO, [0, 1, 2]), start=2):
        assert eager.update(img, i, False) == []
    assert eager.detections_run == 3  # opt-in: no track -> detect every frame
    tracker.reset()
    assert tracker.update(k[0], 5, False)[0].track_id != first  # ids never reused


def coordinate_image(height: int, width: int) -> np.ndarray:
    """An image whose pixels spell their own (x, y): a stub backend reads where the crop it was
    handed starts from its first pixel (the tracker passes crops, not frames, to landmarks)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x & 255, y & 255, (x >> 8) | ((y >> 8) << 4)], axis=-1).astype(np.uint8)


def crop_origin(img: np.ndarray) -> np.ndarray:
    r, g, b = (int(v) for v in img[0, 0])
    return np.array([r + ((b & 15) << 8), g + ((b >> 4) << 8)], np.float32)


class ScriptedBackend(FaceBackend):
    """Returns scripted boxes per detect() call; two landmarks that move 10 px per call."""

    name = "scripted"

    def __init__(self, script):
        super().__init__(FaceConfig(min_face_fraction=0.0))
        self.script = list(script)
        self.calls = 0
        self.lm_calls = 0

    def setup(self):
        self._is_setup = True

    def detect(self, frame_rgb):
        boxes = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return [Face(box=np.asarray(b, np.float32)) for b in boxes]

    def landmarks_and_pose(self, frame_rgb, boxes):
        # the "true" face moves right by 10 px per landmark call, whatever box it is given
        shift = 10.0 * self.lm_calls
        self.lm_calls += 1
        origin = crop_origin(frame_rgb)  # landmarks are in the pixels of the image given
        out = [np.array([[110 + shift, 120], [190 + shift, 200]], np.float32) - origin for _ in boxes]
        return out, [None] * len(out)


def test_tracker_association_and_drop_logic():
    a, b = [0, 0, 100, 100], [300, 0, 400, 100]
    a2, b2 = [5, 0, 105, 100], [305, 0, 405, 100]
    backend = ScriptedBackend([[a, b], [b2, a2], [a2], [a2], [a2], [a2, b2]])
    tracker = FaceTracker(backend, FaceConfig(detect_every=1, max_track_lost=2))
    img = np.zeros((200, 500, 3), np.uint8)
    f0 = {tuple(f.box[:1]): f.track_id for f in tracker.update(img, 0, False)}
    f1 = {tuple(f.box[:1]): f.track_id for f in tracker.update(img, 1, False)}
    assert f0[(0.0,)] == f1[(5.0,)] and f0[(300.0,)] == f1[(305.0,)]  # order-independent
    id_b = f0[(300.0,)]
    assert len(tracker.update(img, 2, False)) == 1  # b missed once: not visible, still kept
    assert len(tracker.update(img, 3, False)) == 1  # missed twice: kept (max_track_lost=2)
    assert len(tracker.update(img, 4, False)) == 1  # third miss: dropped
    ids = {f.track_id for f in tracker.update(img, 5, False)}
    assert len(ids) == 2 and id_b not in ids  # b comes back as a new track


def test_tracker_refits_box_from_landmarks_between_detections():
    box = [100, 100, 200, 200]
    backend = ScriptedBackend([[box]])
    tracker = FaceTracker(backend, FaceConfig(detect_every=5))
    img = coordinate_image(400, 400)
    f = tracker.update(img, 0, True)[0]  # detection: relation learned, box = detector box
    np.testing.assert_allclose(f.box, box)
    xs = []
    for i in range(1, 4):  # propagation: the box follows the landmarks (+10 px / frame)
        f = tracker.update(img, i, True)[0]
        xs.append(f.box[0])
        assert f.box[2] - f.box[0] == pytest.approx(100, abs=1e-3)  # same convention / size
    np.testing.assert_allclose(xs, [110, 120, 130], atol=1e-3)
    assert backend.calls == 1
    tracker.update(img, 5, True)
    assert backend.calls == 2


class PosePointsBackend(FaceBackend):
    """A backend whose own landmarks are not ibug-68 (like InsightFace's 106) but which gives
    ibug-68 pose points: the posed rigid face model, turning by 1 deg of yaw per call."""

    name = "pose_points"
    landmark_format = "insightface106"
    landmark_count = 3

    def __init__(self):
        super().__init__(FaceConfig(min_face_fraction=0.0))
        self.calls = 0

    def setup(self):
        self._is_setup = True

    def detect(self, frame_rgb):
        return [Face(box=np.array([200, 150, 440, 390], np.float32), score=2.0)]

    def landmarks_for_pose(self, frame_rgb, boxes):
        from emo_data.pose import IBUG68_INDICES, project_model

        origin = crop_origin(frame_rgb)
        pts = np.full((68, 2), 320.0, np.float32)
        pts[IBUG68_INDICES] = project_model(float(self.calls), 0.0, 0.0, (0.0, 0.0, 3000.0), (640, 480), 1600.0)
        self.calls += 1
        lms = np.array([[210, 160], [430, 160], [320, 380]], np.float32)
        return [lms - origin for _ in boxes], [pts - origin for _ in boxes]

    def landmarks_and_pose(self, frame_rgb, boxes):
        return self.landmarks_for_pose(frame_rgb, boxes)[0], [None] * len(boxes)


def test_tracker_solves_pose_from_any_backends_ibug68_points():
    """Backends with other landmark layouts share the pose path: the tracker solves each frame's
    pose from the backend's ibug-68 points and leaves the backend's own landmarks as they are."""
    backend = PosePointsBackend()
    # blend 1: the detections as they are (this stub's image does not move with its points)
    tracker = FaceTracker(backend, FaceConfig(detect_every=5, landmark_flow_blend=1.0))
    img = coordinate_image(480, 640)
    poses = []
    for i in range(6):
        (face,) = tracker.update(img, i, True)
        assert face.landmarks.shape == (3, 2) and face.pose.shape == (6,) and face.pose.dtype == np.float32
        np.testing.assert_allclose(face.landmarks, [[210, 160], [430, 160], [320, 380]], atol=1e-4)
        poses.append(face.pose)
    yaw = np.array(poses)[:, 0]
    # the face stays centred and turns by 1 deg per frame (allocentric = egocentric on the axis)
    np.testing.assert_allclose(np.diff(yaw), 1.0, atol=0.1)
    assert tracker.update(img, 6, False)[0].pose is None  # no landmarks asked, no pose


def test_stabilizer_follows_motion_with_less_jitter_than_the_detector():
    """Sub-pixel shifts of a real face image: detections with 1-px noise go in, the stabilised
    rigid points follow the true motion several times more closely; a jump resets them."""
    from emo_data.faces.stabilizer import LandmarkStabilizer
    from emo_data.pose import IBUG68_INDICES

    rng = np.random.default_rng(0)
    face = image("images/face_recognition__obama.jpg")[100:500, 300:700]
    base = np.full((68, 2), 200.0, np.float32)
    base[IBUG68_INDICES] = rng.uniform(140, 260, (len(IBUG68_INDICES), 2))
    base[36], base[45] = (140, 180), (260, 180)  # eye span 120 px
    stab = LandmarkStabilizer(blend=0.02)
    err_in, err_out = [], []
    for f in range(40):
        shift = np.array([0.37 * f, 0.21 * f])
        frame = cv2.warpAffine(face, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (400, 400),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        truth = base + shift.astype(np.float32)
        measured = truth + rng.normal(0, 1.0, truth.shape).astype(np.float32)
        out = stab.update(frame, measured)
        assert out.shape == (68, 2) and out.dtype == np.float32
        np.testing.assert_array_equal(np.delete(out, IBUG68_INDICES, 0), np.delete(measured, IBUG68_INDICES, 0))
        err_in.append((measured - truth)[IBUG68_INDICES])
        err_out.append((out - truth)[IBUG68_INDICES])
    # frame-to-frame jitter (what speed sees) is a small fraction of the detector's; the error
    # itself stays bounded (the detections pull it back with a time constant of 1/blend frames)
    jitter_in = np.abs(np.diff(err_in, axis=0)).mean()
    jitter_out = np.abs(np.diff(err_out, axis=0)).mean()
    assert jitter_out < jitter_in / 10
    assert np.abs(err_out).mean() <= np.abs(err_in).mean()
    assert stab.resets == 1
    stab.update(frame, measured + 60.0)  # the detections jump: a different face
    assert stab.resets == 2


def test_upright_transform_roundtrip():
    from emo_data.faces.tracker import apply_affine, upright_transform

    pts = np.array([[100.0, 50.0], [160.0, 110.0]], np.float32)  # a line tilted by 45 deg
    m = upright_transform(np.array([130.0, 80.0]), 45.0, 200.0)
    up = apply_affine(m, pts)
    assert up[1, 1] - up[0, 1] == pytest.approx(0.0, abs=1e-4)  # level in the crop
    np.testing.assert_allclose(up.mean(axis=0), [100, 100], atol=1e-4)  # centred in the 200-px crop
    np.testing.assert_allclose(apply_affine(cv2.invertAffineTransform(m), up), pts, atol=1e-4)


# ---------------------------------------------------------------------------------- insightface
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a face backend tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("backend", ["insightface", "face_alignment"])
def test_unavailable_backends_fail_fast_with_hint(tmp_path, no_network, backend, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("not weights")
    for root in [None, str(tmp_path / "missing"), str(tmp_path / "junk")]:
        b = make_face_backend(FaceConfig(backend=backend, model_root=root))
        t0 = time.monotonic()
        with pytest.raises(FaceBackendUnavailable) as err:
            b.setup()
        assert time.monotonic() - t0 < 2.0
        msg = str(err.value)
        assert "--face-model-root" in msg and "model_root" in msg and backend in msg


def test_insightface_pack_lookup(tmp_path):
    from emo_data.faces.insightface_backend import find_pack_dir

    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    assert find_pack_dir(str(tmp_path)) is None  # empty pack dir: insightface would assert
    (pack / "det_10g.onnx").write_bytes(b"")
    assert find_pack_dir(str(tmp_path)) == str(pack)
    assert find_pack_dir(str(pack)) == str(pack)


def test_insightface_adapter_logic():
    """The adapter around insightface models, with stub models (no weights here)."""
    from emo_data.faces.insightface_backend import InsightFaceBackend

    seen = {}

    class Det:
        def detect(self, img, max_num=0, metric="default"):
            h, w = img.shape[:2]
            seen.setdefault("det_shapes", []).append(img.shape)
            box = np.array([[0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h, 0.9]], np.float32)
            kps = np.tile(np.array([[0.5 * w, 0.5 * h]], np.float32), (1, 5, 1))
            return box, kps

    class Lmk106:
        def get(self, img, face):
            seen["bgr_pixel"] = img[0, 0].tolist()
            x0, y0, x1, y1 = face.bbox
            face["landmark_2d_106"] = np.stack(
                [np.linspace(x0, x1, 106), np.linspace(y0, y1, 106)], 1).astype(np.float32)

    class Lmk3d:
        def get(self, img, face):
            face["pose"] = np.array([-5.0, 12.0, 3.0], np.float32)  # pitch, yaw, roll
            x0, y0, x1, y1 = face.bbox
            face["landmark_3d_68"] = np.stack(
                [np.linspace(x0, x1, 68), np.linspace(y1, y0, 68), np.zeros(68)], 1).astype(np.float32)

    class Rec:
        def get(self, img, face):
            seen["kps"] = face.kps
            return np.full(512, 3.0, np.float32)

    b = InsightFaceBackend(FaceConfig(backend="insightface", detect_max_side=320,
                                      min_face_fraction=0.0))
    b.models = {"detection": Det(), "landmark_2d_106": Lmk106(), "landmark_3d_68": Lmk3d(),
                "recognition": Rec()}
    b._is_setup = True
    img = np.zeros((640, 1280, 3), np.uint8)
    img[0, 0] = (255, 0, 0)  # red in RGB
    faces = b.detect(img)
    assert seen["det_shapes"][0][:2] == (160, 320)  # detection ran downscaled
    np.testing.assert_allclose(faces[0].box, [320, 160, 960, 480], atol=1)  # full-frame coords
    lms, poses = b.landmarks_and_pose(img, [faces[0].box])
    assert seen["bgr_pixel"] == [0, 0, 255]  # insightface models get BGR
    assert lms[0].shape == (106, 2) and lms[0].dtype == np.float32
    np.testing.assert_allclose(poses[0], [12, -5, 3, 0, 0, 0])  # (yaw, pitch, roll, t)
    assert b.landmarks(img, [faces[0].box])[0].shape == (106, 2)
    # head pose is solved from the 3-D 68-point model's image points (ibug-68 order)
    lms, points = b.landmarks_for_pose(img, [faces[0].box])
    assert lms[0].shape == (106, 2) and points[0].shape == (68, 2) and points[0].dtype == np.float32
    np.testing.assert_allclose(points[0][[0, -1]], [[320, 480], [960, 160]], atol=1e-3)
    e = b.embed(img, faces[0])
    assert e.shape == (512,) and e.dtype == np.float32
    assert np.linalg.norm(e) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(seen["kps"][0], [640, 320], atol=1)  # re-detected in the crop


# ---------------------------------------------------------------------------------- face_alignment
@needs_samples
@pytest.mark.skipif(
    os.environ.get("EMO_SLOW_TESTS") != "1",
    reason="slow (numba JIT of face_alignment + a FAN-4 forward: ~10 s idle, 40+ s on a busy "
    "2-core box); set EMO_SLOW_TESTS=1 to run",
)
def test_face_alignment_plumbing_with_random_weights(tmp_path, no_network):
    """Real S3FD / FAN-4 architectures with random weights saved as the expected files: checks
    that weights load from model_root and that shapes/coordinates flow through the adapter."""
    torch = pytest.importorskip("torch")
    from face_alignment.detection.sfd.net_s3fd import s3fd
    from face_alignment.models import FAN

    torch.manual_seed(0)
    det = s3fd().state_dict()
    # Random scores would make S3FD decode thousands of candidates in Python (slow): silence
    # every classifier level except fc7 (stride 32), which then calls every anchor a face.
    for k in [k for k in det if "mbox_conf" in k]:
        det[k].zero_()
        if k.endswith("bias"):
            det[k][-1] = 5.0 if k.startswith("fc7") else -20.0
    torch.save(det, tmp_path / "s3fd-619a316812.pth")
    torch.save(FAN(4).state_dict(), tmp_path / "2DFAN4-11f355bf06.pth.tar")
    b = make_face_backend(FaceConfig(backend="face_alignment", model_root=str(tmp_path),
                                     detect_max_side=96))
    b.setup()
    img = frames(KATIE, [0])[0]
    faces = b.detect(img)  # fc7 anchors (after NMS), detected at 96 px, in full-frame pixels
    assert faces and all(f.box.shape == (4,) and f.box.dtype == np.float32 for f in faces)
    assert max(float(f.box[2]) for f in faces) > 96 * 2  # scaled back from the 96-px image
    box = np.array([118, 150, 408, 438], np.float32)
    (lm,) = b.landmarks(img, [box])
    assert lm.shape == (68, 2) and lm.dtype == np.float32 and np.all(np.isfinite(lm))
    # FAN's crop is centred on the box: random heat-map maxima stay around it
    assert np.all(lm > -0.5 * 512) and np.all(lm < 1.5 * 512)
    e = b.embed(img, Face(box=box, landmarks=lm))
    assert e.shape == (128,) and e.dtype == np.float32
