"""emo-eval metrics on real footage with random-weight networks loaded the real way.

The ground truth is a test shard cut from a real talking head (tests/shard_fixtures.py); a
"generated" directory is written by hand so that each check knows what the answer must be:
the ground truth's own bytes (every distance 0), or another person's real footage (F-SIM drops).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from emo_model.eval import ScoreConfig, frechet_distance, frechet_distance_between, score_corpus
from emo_model.eval.frechet import GaussianStats

from conftest import sample

torch.set_num_threads(1)  # a second thread mostly adds sync cost on a busy 2-core box

OTHER_PERSON = "video/sadtalker__WDA_AlexandriaOcasioCortez_000.mp4"
# kept cheap for CI's 2 cores: every 10th frame into FID, every 4th face embedded, FVD clips at
# 80 px (the protocol's 224 costs ~8x on CPU; the network and the code path are the same)
FAST = dict(fid_frame_stride=10, face_frame_stride=4, fvd_resolution=80, batch_size=8)


def _decode(path: str, n: int) -> np.ndarray:
    from emo_data.decode import iter_frames

    frames = []
    for frame in iter_frames(path, fps=25.0):
        frames.append(frame.image)
        if len(frames) >= n:
            break
    return np.stack(frames)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from shard_fixtures import make_shard

    sample("video/sadtalker__WDA_KatieHill_000.mp4")
    return make_shard(str(tmp_path_factory.mktemp("eval_corpus")), n_samples=2, frames=20, split="test",
                      identity="id_katie")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from emo_model.eval.testing import write_test_weights

    d = tmp_path_factory.mktemp("eval_weights")
    written = write_test_weights(str(d), networks=["inception", "i3d", "syncnet"])
    assert set(written) == {"inception", "i3d", "syncnet"}
    return str(d)


@pytest.fixture(scope="module")
def other_person():
    frames = _decode(sample(OTHER_PERSON), 40)
    assert frames.shape[1:] == (512, 512, 3)
    return frames


def make_gen_dir(path, shard: str, frames_for=None) -> str:
    """A directory in ``emo-eval generate``'s layout: per sample the given frames (or the ground
    truth's own mp4 bytes) as ``<key>.generated.mp4`` and its json."""
    from emo_data.shards import encode_mp4, iter_raw_samples

    os.makedirs(path, exist_ok=True)
    for i, raw in enumerate(iter_raw_samples(shard)):
        key = raw["__key__"]
        meta = json.loads(raw["json"])
        data = raw["mp4"] if frames_for is None else encode_mp4(frames_for(i, meta["num_frames"]), meta["fps"])
        with open(os.path.join(path, f"{key}.generated.mp4"), "wb") as fh:
            fh.write(data)
        with open(os.path.join(path, f"{key}.json"), "w") as fh:
            json.dump({"key": key, "reference_frame": 0, "files": {"generated": f"{key}.generated.mp4"}}, fh)
    return str(path)


@pytest.fixture(scope="module")
def scores(corpus, weights, other_person, tmp_path_factory):
    """Scores of (a) the ground truth against itself, (b) another person's real footage, twice."""
    root = tmp_path_factory.mktemp("gen")
    cfg = ScoreConfig(weights_dir=weights, **FAST)
    same = score_corpus(make_gen_dir(root / "same", corpus), [corpus], cfg, progress=False)
    other_dir = make_gen_dir(root / "other", corpus, lambda i, n: other_person[i * n:(i + 1) * n])
    other = score_corpus(other_dir, [corpus], cfg, progress=False)
    again = score_corpus(other_dir, [corpus], cfg, progress=False)
    return same, other, again


# --------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_equals_pytorch_fid_on_real_inception_features(corpus, weights, other_person):
    """Same features in, same number out as pytorch-fid's calculate_frechet_distance (and
    torchmetrics' when installed): Inception's 64-d pool features of 40 real frames of one person
    and 40 of another (fewer frames than dimensions: singular covariances, our low-rank route)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    from emo_data.shards import decode_mp4, iter_raw_samples
    from emo_model.eval.inception import InceptionFeatures

    real = np.concatenate([decode_mp4(raw["mp4"]) for raw in iter_raw_samples(corpus)])  # 40 frames
    net = InceptionFeatures(os.path.join(weights, "inception.safetensors"), feature="64", batch_size=20)
    a, b = net.features(real), net.features(other_person)
    assert a.shape == b.shape == (40, 64) and np.isfinite(a).all()
    sa, sb = GaussianStats.of(a), GaussianStats.of(b)
    ref = calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ref > 1e-3  # different people: a clearly non-zero distance
    assert frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_between(a, b) == pytest.approx(ref, rel=1e-6)
    try:
        from torchmetrics.image.fid import _compute_fid
    except ImportError:
        return
    tm = float(_compute_fid(torch.from_numpy(sa.mu), torch.from_numpy(sa.sigma), torch.from_numpy(sb.mu),
                            torch.from_numpy(sb.sigma)))
    assert frechet_distance_between(a, b) == pytest.approx(tm, rel=1e-5)


def test_frechet_low_rank_route_equals_full_route():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    full_a, full_b = rng.normal(size=(400, 64)), 1.3 * rng.normal(size=(300, 64)) + 0.1  # full-rank covariances
    sa, sb = GaussianStats.of(full_a), GaussianStats.of(full_b)
    assert frechet_distance_between(full_a, full_b) == pytest.approx(
        calculate_frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-9)
    a = rng.standard_t(3, size=(30, 300))
    b = 0.5 * rng.standard_t(3, size=(25, 300)) + 0.2
    sa, sb = GaussianStats.of(a), GaussianStats.of(b)
    assert frechet_distance_between(a, b) == pytest.approx(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)
    assert frechet_distance_between(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        frechet_distance_between(a[:1], b)


# --------------------------------------------------------------------------- whole scorer
def test_ground_truth_against_itself_scores_zero(scores, weights):
    from emo_model.eval.weights import file_sha256

    same, other, _ = scores
    m = same["metrics"]
    assert same["samples"] == 2 and same["frames"] == 40 and not same["errors"]
    for name in ("fid", "fvd", "efid"):
        assert "value" in m[name], (name, m[name])
        assert m[name]["value"] <= 1e-6 * max(1.0, other["metrics"][name]["value"]), name
        assert other["metrics"][name]["value"] > 1e-3, name
    assert m["fvd"]["clips"] == 2  # one 16-frame clip per 20-frame sample
    assert m["fid"]["generated_frames"] == m["fid"]["real_frames"] == 4
    # the same video on both sides: every paired figure is identical
    assert m["fsim"]["generated"]["value"] == m["fsim"]["ground_truth"]["value"] > 90.0
    assert m["syncnet"]["generated"] == m["syncnet"]["ground_truth"]
    if "skipped" not in m["sync_offline"]:  # the offline backend is another module (emo_data.sync.envelope)
        assert m["sync_offline"]["generated"] == m["sync_offline"]["ground_truth"]
    # provenance: the file that was loaded
    path = os.path.join(weights, "inception.safetensors")
    assert m["fid"]["weights"] == {"path": os.path.abspath(path), "sha256": file_sha256(path)[:16]}
    assert m["fvd"]["weights"]["path"].endswith("i3d.safetensors")
    assert m["syncnet"]["weights"]["path"].endswith("syncnet.safetensors")
    assert m["efid"]["extractor"] == "landmarks" and "NOT the paper" in m["efid"]["label"]


def test_another_identity_lowers_fsim(scores):
    same, other, _ = scores
    fsim = other["metrics"]["fsim"]
    assert fsim["ground_truth"]["value"] > 90.0                      # the person in the reference
    assert fsim["generated"]["value"] < fsim["ground_truth"]["value"] - 10.0  # someone else
    assert fsim["face_fallback_frames"] == {"generated": 0, "ground_truth": 0}  # real faces were found
    assert other["metrics"]["fid"]["value"] > 0.0


def test_scores_are_deterministic(scores):
    _, other, again = scores
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(other) == strip(again)


def test_table_lists_every_metric(scores):
    from emo_model.eval import format_table

    table = format_table(scores[1])
    for label in ("FID", "FVD", "SyncNet LSE-C", "SyncNet LSE-D", "F-SIM (dlib)", "E-FID", "offline sync"):
        assert label in table, label
    assert "sha256:" in table and "NOT the paper's 3DMM E-FID" in table


def test_missing_weights_are_skipped_not_numbers(corpus, tmp_path):
    gen = make_gen_dir(tmp_path / "gen", corpus)
    cfg = ScoreConfig(metrics=["fid", "fvd", "syncnet", "efid", "fsim"], expression="deep3d",
                      i3d_weights=str(tmp_path / "nope.safetensors"), identity="insightface",
                      face_model_root=str(tmp_path))  # no ArcFace pack there
    result = score_corpus(gen, [corpus], cfg, progress=False)
    m = result["metrics"]
    assert set(m) == {"fid", "fvd", "syncnet", "efid", "fsim"}
    assert all(set(v) == {"skipped"} for v in m.values()), m
    assert "no Inception (FID) weights given" in m["fid"]["skipped"]
    assert "nope.safetensors" in m["fvd"]["skipped"]
    assert "Deep3DFaceRecon" in m["efid"]["skipped"]
    assert "insightface" in m["fsim"]["skipped"]
    from emo_model.eval import format_table

    assert format_table(result).count("skipped") == 5


# --------------------------------------------------------------------------- offline sync
def test_shifted_audio_loses_offline_sync_confidence():
    """The data side's weight-free scorer on 8 s of a real talking head: the clip's own audio
    against copies of it rotated by 1-3 s (audio that belongs to other frames)."""
    pytest.importorskip("emo_data.sync.envelope", reason="the lead's offline sync backend has not landed")
    from emo_data.decode import AudioDecodeStage
    from emo_data.types import Source
    from emo_model.eval.faces import FaceAnalyzer
    from emo_model.eval.sync import OfflineSyncScorer

    path = sample(OTHER_PERSON)
    frames = _decode(path, 200)
    audio = AudioDecodeStage().process(Source(path=path, source_id="aoc")).segment(0.0, len(frames) * 640)
    track = FaceAnalyzer().track(frames, np.tile(np.float32([100, 100, 400, 400]), (len(frames), 1)), embed=False)
    assert track.fallback_frames == 0
    scorer = OfflineSyncScorer(max_offset=15)
    own = scorer.score("aoc", frames, track.landmarks, track.boxes, audio, 25.0)
    assert abs(own["offset_frames"]) <= 3 and own["confidence"] > 3.0
    for seconds in (1.0, 2.0, 3.0):
        shifted = scorer.score("aoc", frames, track.landmarks, track.boxes, np.roll(audio, int(seconds * 16000)), 25.0)
        assert shifted["confidence"] < own["confidence"] - 1.0, (seconds, shifted, own)


# --------------------------------------------------------------------------- networks and files
class NotATensor:
    """Unpickling this needs a global the weights-only loader does not allow (like any code in a file)."""


def test_i3d_reads_the_pytorch_port_layout_and_refuses_pickled_code(tmp_path, other_person):
    from safetensors.torch import save_file

    from emo_model.eval.i3d import I3DFeatures, convert_state, random_i3d_state

    state = random_i3d_state(1)
    save_file(state, str(tmp_path / "i3d.safetensors"))
    # the PyTorch port's checkpoint: saved by old torch (no BN step counters), DataParallel prefix
    port = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(port, str(tmp_path / "rgb_imagenet.pt"))
    video = other_person[:16]
    a = I3DFeatures(str(tmp_path / "i3d.safetensors"), resolution=112).features(video)
    b = I3DFeatures(str(tmp_path / "rgb_imagenet.pt"), resolution=112).features(video)
    assert a.shape == (1, 400) and np.array_equal(a, b) and np.abs(a).max() > 0
    converted = convert_state(str(tmp_path / "rgb_imagenet.pt"))
    assert all(torch.equal(converted[k], state[k]) for k in state if not k.endswith("num_batches_tracked"))

    torch.save({"Conv3d_1a_7x7.conv3d.weight": NotATensor()}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="weights_only"):
        I3DFeatures(str(tmp_path / "evil.pt"))
    del port["module.logits.conv3d.bias"]
    torch.save(port, str(tmp_path / "partial.pt"))
    with pytest.raises(ValueError, match="missing logits.conv3d.bias"):
        I3DFeatures(str(tmp_path / "partial.pt"))


def test_deep3d_extractor_from_a_checkpoint(tmp_path, other_person):
    """The 3DMM route: a Deep3DFaceRecon-style checkpoint ({'net_recon': ...}) read with
    weights_only, crops aligned on the face, 64 expression coefficients per frame."""
    from scipy.io import savemat

    from emo_model.eval.expression import Deep3DExpression, align_crop, five_points, random_deep3d_state
    from emo_model.eval.faces import FaceAnalyzer
    from emo_model.eval.testing import standard_face_lm3d

    torch.save({"net_recon": random_deep3d_state(0), "epoch": 20}, str(tmp_path / "epoch_20.pth"))
    savemat(str(tmp_path / "similarity_Lm3D_all.mat"), {"lm": standard_face_lm3d()})
    frames = other_person[:3]
    track = FaceAnalyzer().track(frames, np.tile(np.float32([100, 100, 400, 400]), (3, 1)), embed=False)
    extractor = Deep3DExpression(str(tmp_path / "epoch_20.pth"), str(tmp_path / "similarity_Lm3D_all.mat"))
    exp = extractor.extract(frames, track.landmarks, frames[0], track.landmarks[0])
    assert exp.shape == (3, 64) and np.isfinite(exp).all() and np.abs(exp).max() > 0
    # the aligned crop holds the face: the nose tip lands near the crop centre
    crop = align_crop(frames[0], track.landmarks[0], extractor.lm3d)
    assert crop.shape == (224, 224, 3)
    lm5 = five_points(track.landmarks[0])
    face_h = lm5[3:, 1].mean() - lm5[:2, 1].mean()
    assert 30 < face_h < 200  # sanity of the landmarks the crop is fitted to
    assert crop[80:150, 80:150].std() > 5  # face texture, not padding


def test_landmark_descriptor_ignores_pose_and_sees_the_mouth(other_person):
    from emo_model.eval.expression import LandmarkExpression
    from emo_model.eval.faces import FaceAnalyzer

    lm = FaceAnalyzer().track(other_person[:1], np.float32([[100, 100, 400, 400]]), embed=False).landmarks[0]
    desc = LandmarkExpression()
    th = np.deg2rad(12.0)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    moved = (lm - 256) @ rot.T * 0.7 + 256 + np.array([30.0, -12.0])
    opened = lm.copy()
    opened[[56, 57, 58, 65, 66, 67]] += np.array([0.0, 12.0])  # lower lip down: the mouth opens
    out = desc.extract(None, np.stack([lm, moved, opened]), None, lm)
    assert out.shape == (3, desc.dim)
    assert np.abs(out[0]).max() < 1e-9 and np.abs(out[1]).max() < 1e-6
    assert np.abs(out[2]).max() > 0.02
