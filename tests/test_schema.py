"""Shard format (emo_data/shards): round trip, and each kind of damage the validator must catch."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

from emo_data.samples import face_union_mask
from emo_data.shards import (
    SampleMeta,
    ShardWriter,
    decode_sample,
    encode_mp4,
    iter_raw_samples,
    load_npy,
    npy_bytes,
    read_index,
    read_sample,
    validate_sample,
    validate_shard,
    wav_bytes,
    write_tar,
)
from emo_data.types import ClipSample


def _sample(key: str, T: int = 12, S: int = 64, audio: bool = True) -> ClipSample:
    rng = np.random.default_rng(0)
    frames = [np.full((S, S, 3), 40 + 10 * i, np.uint8) for i in range(T)]
    boxes = np.tile(np.array([[10, 12, 40, 44]], np.float32), (T, 1))
    speed = rng.uniform(0, 2, T).astype(np.float32)
    centers, radii = [0.0, 0.5, 1.0], [0.25, 0.25, 0.5]
    meta = SampleMeta(
        key=key, num_frames=T, crop_size=S, fps=25.0, sample_rate=16000, landmark_count=68, identity_dim=128,
        speed_buckets={"centers": centers, "radii": radii},
        audio_emb={"encoder": "tiny", "num_layers": 3, "dim": 8} if audio else None,
    )
    return ClipSample(
        key=key, mp4=encode_mp4(frames, 25.0), wav=wav_bytes(rng.uniform(-0.1, 0.1, T * 640).astype(np.float32)),
        face_mask=face_union_mask(boxes, S), face_boxes=boxes, landmarks=rng.uniform(10, 40, (T, 68, 2)).astype(np.float32),
        head_pose=rng.normal(size=(T, 6)).astype(np.float32), head_speed=speed,
        speed_buckets=np.tanh((speed[:, None] - np.array(centers)) / np.array(radii) * 3).astype(np.float32),
        identity_emb=rng.normal(size=128).astype(np.float32), meta=meta,
        audio_emb=rng.normal(size=(T, 3, 8)).astype(np.float16) if audio else None,
    )


@pytest.fixture()
def shard(tmp_path):
    from emo_data.shards import encode_sample

    writer = ShardWriter(str(tmp_path), "train", max_samples=2)
    for i in range(3):
        s = _sample(f"src_{i:05d}")
        writer.write(s.key, encode_sample(s), s.meta)
    paths = writer.close()
    assert [os.path.basename(p) for p in paths] == ["train-000000.tar", "train-000001.tar"]
    return paths[0]


def test_round_trip_keeps_every_member(shard):
    raws = list(iter_raw_samples(shard))
    assert [r["__key__"] for r in raws] == ["src_00000", "src_00001"]
    decoded = decode_sample(raws[0], decode_video=True)
    assert decoded["mp4"].shape == (12, 64, 64, 3)
    assert decoded["audio_emb.npy"].dtype == np.float16 and decoded["audio_emb.npy"].shape == (12, 3, 8)
    assert decoded["face_mask.png"].shape == (64, 64) and decoded["face_mask.png"].max() == 255
    assert decoded["json"]["key"] == "src_00000"
    assert len(decoded["wav"]) == 12 * 640
    by_key = read_sample(shard, key="src_00001")
    assert by_key["json"] == raws[1]["json"]
    assert validate_shard(shard) == (2, [])


def test_keys_with_dots_are_refused(tmp_path):
    s = _sample("a.b")
    from emo_data.shards import encode_sample

    with pytest.raises(ValueError):
        write_tar(str(tmp_path / "x.tar"), [("a.b", encode_sample(s), s.meta)])
    assert not os.path.exists(tmp_path / "x.tar")


def test_npy_never_unpickles():
    obj = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(buf.getvalue())


def _raw(shard):
    return next(iter_raw_samples(shard))


def test_missing_member_is_reported(shard):
    raw = _raw(shard)
    del raw["landmarks.npy"]
    assert any("missing members: landmarks.npy" in p for p in validate_sample(raw))


def test_wrong_dtype_and_frame_count_are_reported(shard):
    raw = _raw(shard)
    raw["head_speed.npy"] = npy_bytes(np.zeros(12, np.float64))
    raw["audio_emb.npy"] = npy_bytes(np.zeros((11, 3, 8), np.float16))
    problems = validate_sample(raw)
    assert any(p.startswith("head_speed.npy: dtype float64") for p in problems)
    assert any(p.startswith("audio_emb.npy: shape (11, 3, 8)") for p in problems)


def test_short_audio_and_unsafe_member_are_reported(shard):
    raw = _raw(shard)
    raw["wav"] = wav_bytes(np.zeros(12 * 640 - 700, np.float32))
    raw["extra.pickle"] = b"\x80\x04"
    problems = validate_sample(raw)
    assert any(p.startswith("wav:") for p in problems)
    assert any("unsafe member extra.pickle" in p for p in problems)


def test_bit_flip_is_caught_by_the_index(shard, tmp_path):
    index = read_index(shard)
    loc = index["samples"][0]["members"]["head_pose.npy"]
    data = bytearray(open(shard, "rb").read())
    data[loc["offset"] + loc["size"] - 3] ^= 0x01  # inside the float data: still loads fine
    open(shard, "wb").write(bytes(data))
    _, issues = validate_shard(shard)
    assert [(i.key, i.reason) for i in issues] == [("src_00000", "head_pose.npy: SHA-256 differs from the shard index (corrupted bytes)")]


def test_truncated_tar_is_caught(shard):
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    _, issues = validate_shard(shard)
    assert any("tar is not intact" in i.reason for i in issues)
    assert any("missing from the tar" in i.reason for i in issues)
