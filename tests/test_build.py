"""The main command end to end on the real samples, plus bad inputs and resume."""
from __future__ import annotations

import json
import os
import shutil

import av
import numpy as np
import pandas as pd
import pytest

from emo_data.shards import SampleMeta, config_sha256, decode_sample, iter_raw_samples, read_index, validate_shard

from conftest import REPO, sample

TALKING_HEADS = [
    "sadtalker__WDA_AlexandriaOcasioCortez_000",
    "sadtalker__WDA_KatieHill_000",
    "aniportrait__pose_ref_video",
    "video-retalking__face_2",
    "video-retalking__face_5",
    "video-retalking__face_1",
    "v-express__RD_Radio10_0_clip_0",
]


@pytest.fixture(scope="module")
def manifest(built_corpus):
    return pd.read_parquet(built_corpus / "manifest.parquet")


def _samples(corpus):
    out = {}
    for shard in sorted(corpus.glob("*.tar")):
        for raw in iter_raw_samples(str(shard)):
            out[raw["__key__"]] = raw
    return out


def test_talking_heads_yield_clips(manifest):
    clips = manifest[manifest.status == "clip"]
    for source_id in TALKING_HEADS:
        assert (clips.source_id == source_id).sum() >= 1, f"{source_id} gave no clip"
    assert (clips.duration_s >= 2.0).all() and (clips.duration_s <= 10.0 + 1e-6).all()


def test_no_face_clips_are_rejected_with_reason(manifest):
    for source_id in ["imageio__cockatoo", "imageio__realshort"]:
        rows = manifest[manifest.source_id == source_id]
        assert (rows.status == "clip").sum() == 0
        assert set(rows.reason) == {"no_face"}
        # the whole video is accounted for
        assert rows.duration_s.sum() == pytest.approx(rows.end_s.max() - rows.start_s.min(), abs=0.05)


def test_no_clip_straddles_a_scene_cut_and_silences_are_rejected(manifest):
    hamilton = manifest[manifest.source_id == "face_recognition__short_hamilton_clip"]
    cuts = [1.52, 3.60, 7.88]
    for row in hamilton[hamilton.status == "clip"].itertuples():
        assert not any(row.start_s < cut < row.end_s - 0.04 for cut in cuts), row
    # the audience shot after the last cut gives no clip
    assert not ((hamilton.status == "clip") & (hamilton.end_s > 7.9)).any()
    rejected = manifest[manifest.status == "rejected"]
    assert "no_speech" in set(rejected[rejected.source_id.isin(TALKING_HEADS)].reason)


def _still_video(path, image_path, audio_path, seconds=3.0):
    """A real photo held for ``seconds`` with a real voice track: a multi-face 'shot'."""
    from fractions import Fraction

    import cv2

    image = cv2.imread(str(image_path))[..., ::-1]
    h, w = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    image = np.ascontiguousarray(image[:h, :w])
    with av.open(str(audio_path)) as src:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for fr in src.decode(audio=0) for f in resampler.resample(fr)])
    pcm = pcm[: int(seconds * 16000)]
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=Fraction(25))
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        a = c.add_stream("aac", rate=16000, layout="mono")
        for _ in range(int(seconds * 25)):
            for p in v.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode():
            c.mux(p)


def test_two_faces_are_rejected_as_multi_face(tmp_path):
    from emo_data.config import BuildConfig
    from emo_data.types import Source
    from pipelines.local import build_corpus

    video = tmp_path / "two_people.mp4"
    _still_video(video, sample("images/face_recognition__two_people.jpg"), sample("audio/sadtalker__RD_Radio31_000.wav"))
    config = BuildConfig()
    config.audio_features.enabled = False
    result = build_corpus([Source(str(video), "two_people")], str(tmp_path / "out"), config, progress=False)
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert result.summary.clips == 0
    assert "multi_face" in set(m.reason)


def test_vfr_clip_is_25_fps_with_audio_in_sync(built_corpus, manifest):
    samples = _samples(built_corpus)
    keys = [k for k in samples if k.startswith("video-retalking__face_1_")]
    assert keys
    for key in keys:
        raw = decode_sample(samples[key], decode_video=True)
        meta = raw["json"]
        T = meta["num_frames"]
        assert meta["fps"] == 25.0
        assert raw["mp4"].shape == (T, 512, 512, 3)
        assert len(raw["wav"]) == T * 640  # 16000 / 25 samples per frame
        assert raw["audio_emb.npy"].shape[0] == T
        with av.open(__import__("io").BytesIO(samples[key]["mp4"])) as c:
            assert float(c.streams.video[0].average_rate) == pytest.approx(25.0)


def test_every_shard_validates_and_members_agree(built_corpus):
    shards = sorted(built_corpus.glob("*.tar"))
    assert {p.name.split("-")[0] for p in shards} <= {"train", "test"}
    total = 0
    for shard in shards:
        count, issues = validate_shard(str(shard))
        assert issues == [], [str(i) for i in issues]
        total += count
        assert (shard.parent / (shard.name[:-4] + ".stats.json")).exists()
    assert total >= len(TALKING_HEADS)
    first = next(iter(_samples(built_corpus).values()))
    raw = decode_sample(first)
    T = raw["json"]["num_frames"]
    assert raw["landmarks.npy"].shape == (T, 68, 2)
    assert raw["speed_buckets.npy"].shape == (T, 9)
    assert raw["head_speed.npy"].shape == (T,)
    # the config is stored once, in the shard index (and build.json); the sample references it
    assert "config" not in raw["json"]
    stored = SampleMeta.from_dict(raw["json"]).build_config(read_index(first["__shard__"]))
    assert stored["_class"] == "BuildConfig" and stored["audio_features"]["encoder"]
    assert config_sha256(stored) == raw["json"]["config_sha256"]
    build = json.loads((built_corpus / "build.json").read_text())
    assert build["config"] == stored and build["config_sha256"] == raw["json"]["config_sha256"]
    mask = raw["face_mask.png"] > 0
    boxes = raw["face_boxes.npy"]
    # the mask is the union of the boxes: every box centre lies inside it, and it is not the whole frame
    for x0, y0, x1, y1 in boxes:
        assert mask[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    assert 0.05 < mask.mean() < 0.95


def test_splits_are_identity_disjoint(manifest):
    clips = manifest[manifest.status == "clip"]
    assert set(clips.split) == {"train", "test"}
    train_ids = set(clips[clips.split == "train"].identity)
    test_ids = set(clips[clips.split == "test"].identity)
    assert train_ids and test_ids and not (train_ids & test_ids)


def test_rerun_resumes_without_redoing_work(built_corpus, tiny_wav2vec, capsys):
    from pipelines.cli import main

    before = sorted(_samples(built_corpus))
    files = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in built_corpus.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["build", str(REPO / "manifests" / "samples.csv"), "--out", str(built_corpus), "--audio-encoder", tiny_wav2vec, "--executor", "local", "-q"]) == 0
    out = capsys.readouterr().out
    assert "11 were already done, 0 processed now" in out.replace("sources were", "were")
    assert "speed" not in out and "unchanged" in out  # no work: no speed figure, no file rewritten
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in built_corpus.iterdir() if p.is_file()} == files
    assert sorted(_samples(built_corpus)) == before


def test_bad_inputs_become_manifest_rows(tmp_path, tiny_wav2vec):
    from pipelines.cli import main

    good = sample("video/v-express__RD_Radio10_0_clip_0.mp4")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "good.mp4")
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(os.urandom(20_000))
    data = open(good, "rb").read()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 4])
    with av.open(good) as src, av.open(str(folder / "silent_film.mp4"), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    out_dir = tmp_path / "out"
    assert main(["build", str(folder), "--out", str(out_dir), "--audio-encoder", tiny_wav2vec, "--executor", "local", "-q"]) == 0
    m = pd.read_parquet(out_dir / "manifest.parquet")
    failed = m[m.status == "failed"].set_index("source_id")
    assert failed.loc["zero", "reason"] == "empty_file"
    assert failed.loc["garbage", "reason"] == "unreadable"
    assert failed.loc["silent_film", "reason"] == "no_audio_stream"
    assert failed.loc["truncated", "reason"] in {"unreadable", "corrupt_video"}
    for source_id, row in failed.iterrows():
        assert row.path.endswith(f"{source_id}.mp4") and row.detail
    assert (m[m.source_id == "good"].status == "clip").any()
    assert validate_shard(str(next(out_dir.glob("*.tar"))))[1] == []


def test_unloadable_audio_encoder_stops_before_work(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["build", str(REPO / "manifests" / "samples.csv"), "--out", str(tmp_path / "o"), "--audio-encoder", str(tmp_path / "nowhere"), "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--audio-encoder" in err and "--no-audio-features" in err
    assert not (tmp_path / "o" / "staging").exists()
