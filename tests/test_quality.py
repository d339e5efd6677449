"""Face image quality (emo_data/quality.py) on real frames of a real talking head.

Frames are the first, middle and last of a 512 x 512 HDTF clip from the shared samples (the
shape of the build's face crop); face boxes come from the build's offline face backend (dlib).
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from emo_data.quality import (
    FaceQualityScorer,
    MusiqFaceScorer,
    QualityConfig,
    QualityWeightsError,
    load_state_dict_safely,
    make_learned_iqa,
    pick_frames,
)
from emo_data.stage import StageError

from conftest import sample

CLIP = "video/sadtalker__WDA_KatieHill_000.mp4"


@pytest.fixture(scope="module")
def clip_frames():
    """(frames picked as the build picks them, their face boxes, the clip's frame count)."""
    from emo_data.config import FaceConfig
    from emo_data.decode import iter_frames
    from emo_data.faces.dlib_backend import DlibBackend

    images = [frame.image.copy() for frame in iter_frames(sample(CLIP))]
    picks = pick_frames(len(images))
    detector = DlibBackend(FaceConfig())
    detector.setup()
    frames, boxes = [], []
    for i in picks:
        faces = detector.detect(images[i])
        assert faces, f"no face in frame {i}"
        frames.append(images[i])
        boxes.append(max(faces, key=lambda f: f.box[2] - f.box[0]).box)
    return frames, np.stack(boxes).astype(np.float32), len(images)


@pytest.fixture(scope="module")
def scorer():
    s = FaceQualityScorer()
    s.setup()
    return s


def test_pick_frames_is_first_middle_last():
    assert pick_frames(201) == [0, 100, 200]
    assert pick_frames(2) == [0, 1] and pick_frames(1) == [0] and pick_frames(0) == []
    assert pick_frames(10, count=1) == [4]
    assert FaceQualityScorer(QualityConfig(frames=5)).pick_frames(9) == [0, 2, 4, 6, 8]


def test_scores_are_named_bounded_and_deterministic(clip_frames, scorer):
    frames, boxes, _ = clip_frames
    scores = scorer.score(frames, boxes)
    for name in ("sharpness", "blur_effect", "brightness", "dark_clipped", "bright_clipped", "exposure",
                 "face_quality", "face_quality_min"):
        assert 0.0 <= scores[name] <= 1.0, name
    assert scores["quality_frames"] == 3.0
    assert scores["sharpness_lapvar"] > 0 and scores["noise_sigma"] > 0
    assert scores["face_quality"] == pytest.approx(scores["sharpness"] * scores["exposure"], abs=0.02)
    # A clean, well-lit HDTF address: sharp and well exposed by these scores.
    assert scores["sharpness"] > 0.5 and scores["exposure"] > 0.9
    again = FaceQualityScorer().score([f.copy() for f in frames], boxes.copy())
    assert json.dumps(again, sort_keys=True) == json.dumps(scores, sort_keys=True)


def test_clip_boxes_with_frame_indices_equal_picked_boxes(clip_frames, scorer):
    frames, boxes, num_frames = clip_frames
    picks = pick_frames(num_frames)
    whole_clip_boxes = np.full((num_frames, 4), np.nan, np.float32)
    whole_clip_boxes[picks] = boxes
    assert scorer.score(frames, whole_clip_boxes, frame_indices=picks) == scorer.score(frames, boxes)


def test_blur_lowers_sharpness(clip_frames, scorer):
    frames, boxes, _ = clip_frames
    sharp = scorer.score(frames, boxes)
    blurred = scorer.score([cv2.GaussianBlur(f, (0, 0), 1.5) for f in frames], boxes)
    assert blurred["sharpness"] < 0.6 * sharp["sharpness"]
    assert blurred["blur_effect"] > sharp["blur_effect"] + 0.05
    assert blurred["exposure"] == pytest.approx(sharp["exposure"], abs=0.02)   # blur is not an exposure problem


def test_upscaled_small_face_scores_lower_than_the_same_face_sharp(clip_frames, scorer):
    # The crop of a small source face is upscaled: simulate a face 4x smaller blown up to 512.
    frames, boxes, _ = clip_frames
    upscaled = [cv2.resize(cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA), (512, 512),
                           interpolation=cv2.INTER_LINEAR) for f in frames]
    assert scorer.score(upscaled, boxes)["sharpness"] < 0.5 * scorer.score(frames, boxes)["sharpness"]


def test_sharpness_is_comparable_across_face_sizes(clip_frames, scorer):
    # The same footage at 1.6x the pixels (a bigger face box): the canonical face size keeps the
    # score close, where the Laplacian variance at the face's own resolution changes several-fold.
    frames, boxes, _ = clip_frames
    big_frames = [cv2.resize(f, (819, 819), interpolation=cv2.INTER_CUBIC) for f in frames]
    big_boxes = boxes * (819 / 512)
    small, big = scorer.score(frames, boxes)["sharpness"], scorer.score(big_frames, big_boxes)["sharpness"]
    assert abs(big - small) < 0.15 * small

    def native_lapvar(frame, box):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        luma = cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY).astype(np.float32)
        return cv2.Laplacian(luma, cv2.CV_32F, ksize=1).var()

    assert native_lapvar(frames[0], boxes[0]) > 2 * native_lapvar(big_frames[0], big_boxes[0])


def test_darkened_and_overexposed_copies_change_exposure(clip_frames, scorer):
    frames, boxes, _ = clip_frames
    normal = scorer.score(frames, boxes)
    dark = scorer.score([(f.astype(np.float32) * 0.25).astype(np.uint8) for f in frames], boxes)
    bright = scorer.score([np.clip(f.astype(np.float32) * 2.2, 0, 255).astype(np.uint8) for f in frames], boxes)
    assert dark["brightness"] < 0.5 * normal["brightness"]
    assert dark["dark_clipped"] > normal["dark_clipped"] + 0.05
    assert dark["exposure"] < 0.7 * normal["exposure"]
    assert bright["bright_clipped"] > 0.3 and normal["bright_clipped"] < 0.01
    assert bright["exposure"] < 0.5 * normal["exposure"]
    assert bright["face_quality"] < normal["face_quality"] and dark["face_quality"] < normal["face_quality"]


def test_noise_raises_the_noise_estimate(clip_frames, scorer):
    frames, boxes, _ = clip_frames
    rng = np.random.default_rng(0)
    noisy = [np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8) for f in frames]
    clean_sigma, noisy_sigma = scorer.score(frames, boxes)["noise_sigma"], scorer.score(noisy, boxes)["noise_sigma"]
    assert clean_sigma < 2.0 and 5.0 < noisy_sigma < 9.0


def test_frames_without_a_usable_box_are_skipped_and_none_is_a_stage_error(clip_frames, scorer):
    frames, boxes, _ = clip_frames
    partial = boxes.copy()
    partial[0] = np.nan                   # face lost in this frame
    partial[1] = [100, 100, 108, 108]     # too small to judge
    assert scorer.score(frames, partial)["quality_frames"] == 1.0
    assert scorer.score(frames, partial)["sharpness"] == scorer.score(frames[2:], boxes[2:])["sharpness"]
    with pytest.raises(StageError) as error:
        scorer.score(frames, np.full_like(boxes, np.nan))
    assert error.value.reason == "no_face_quality"
    with pytest.raises(ValueError, match="face boxes"):
        scorer.score(frames, boxes[:2])


def test_gate_and_config():
    gated = FaceQualityScorer(QualityConfig(min_face_quality=0.3))
    assert gated.passes({"face_quality": 0.31}) and not gated.passes({"face_quality": 0.29})
    assert FaceQualityScorer().passes({"face_quality": 0.0})
    for bad in (dict(frames=0), dict(min_face_quality=1.5), dict(iqa_backend="hyperiqa")):
        with pytest.raises(ValueError):
            QualityConfig(**bad)
    with pytest.raises(ValueError, match="needs iqa_weights"):
        QualityConfig(iqa_backend="musiq")
    assert make_learned_iqa(QualityConfig()) is None


# ---------------------------------------------------------------------------------------------
# Optional learned IQA (MUSIQ through pyiqa's architecture)
# ---------------------------------------------------------------------------------------------


class _RunsOnLoad:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_learned_iqa_loader_refuses_code_and_non_state_dicts(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code_ran"
    evil = tmp_path / "musiq.pth"
    torch.save({"head.weight": torch.zeros(1, 4), "payload": _RunsOnLoad(str(marker))}, evil)
    with pytest.raises(QualityWeightsError, match="refusing to load"):
        load_state_dict_safely(str(evil))
    assert not marker.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"module.head.weight": torch.ones(1, 4)}, plain)
    assert list(load_state_dict_safely(str(plain))) == ["head.weight"]
    notes = tmp_path / "notes.pth"
    torch.save({"lr": 0.1}, notes)
    with pytest.raises(QualityWeightsError, match="not a state dict"):
        load_state_dict_safely(str(notes))


def test_musiq_backend_without_pyiqa_says_how_to_install(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    weights = tmp_path / "musiq.pth"
    torch.save({"head.weight": torch.zeros(1, 384)}, weights)
    scorer = make_learned_iqa(QualityConfig(iqa_backend="musiq", iqa_weights=str(weights)))
    assert isinstance(scorer, MusiqFaceScorer)
    # Whether or not pyiqa is installed here, a machine without it must get this message.
    import builtins

    real_import = builtins.__import__

    def no_pyiqa(name, *args, **kwargs):
        if name.startswith("pyiqa"):
            raise ImportError("No module named 'pyiqa'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyiqa)
    with pytest.raises(QualityWeightsError, match="pip install pyiqa"):
        scorer.setup()
    missing = MusiqFaceScorer(str(tmp_path / "nowhere.pth"))
    with pytest.raises(QualityWeightsError, match="no such file"):
        missing.setup()


def test_musiq_random_weights_through_pyiqa_class(tmp_path, clip_frames):
    # Runs where pyiqa is installed (it is not in the dev extra, see emo_data/quality.py).
    torch = pytest.importorskip("torch")
    musiq_arch = pytest.importorskip("pyiqa.archs.musiq_arch")
    torch.manual_seed(0)
    weights = tmp_path / "musiq_random.pth"
    torch.save(musiq_arch.MUSIQ(pretrained=False).state_dict(), weights)
    scorer = make_learned_iqa(QualityConfig(iqa_backend="musiq", iqa_weights=str(weights)))
    frames, boxes, _ = clip_frames
    scores = scorer.score(frames, boxes)
    assert set(scores) == {"iqa_musiq", "iqa_musiq_min"} and np.isfinite(scores["iqa_musiq"])
    assert scores["iqa_musiq_min"] <= scores["iqa_musiq"]
    assert scorer.score(frames, boxes) == scores
    blurred = scorer.score([cv2.GaussianBlur(f, (0, 0), 3) for f in frames], boxes)
    assert blurred != scores     # the model sees the pixels (random weights: no direction implied)
