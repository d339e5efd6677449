"""The shard contract (emo_data/shards): per-sample metadata and its versions, the config stored once
and referenced by hash, older shards and configs still read, one deterministic H.264 writer."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from emo_data.config import BuildConfig, ClipConfig, SpeedConfig
from emo_data.shards import (
    CROP_SCALE,
    DEFAULT_SPEED_CENTERS,
    DEFAULT_SPEED_RADII,
    MEMBERS,
    OPTIONAL_MEMBERS,
    REQUIRED_MEMBERS,
    SAMPLE_META_VERSION,
    SCHEMA_VERSION,
    SampleMeta,
    config_sha256,
    encode_mp4,
    iter_raw_samples,
    read_index,
    rewrite_shard,
    validate_shard,
    write_mp4,
    write_tar,
)

from conftest import REPO
from shard_fixtures import fixture_index, make_sample

# A sample json as the builds before config references wrote it (meta_version absent = 1): the
# whole build config inline, no quality / vocals / audio_source keys yet, one key this code does
# not know.
OLD_CONFIG = {"decode": {"fps": 25.0, "audio_sample_rate": 16000, "threads": 0, "backend": "pyav"},
              "clip": {"crop_size": 512, "crop_scale": 1.8, "min_seconds": 2.0},
              "sync": {"enabled": True, "min_face_quality": 0.3},
              "identity": {"test_fraction": 0.1, "seed": 0, "distance_threshold": 0.5}}
OLD_JSON = {"schema_version": 1, "key": "src_00000", "source_id": "src", "num_frames": 40, "fps": 25.0,
            "crop_size": 512, "sample_rate": 16000, "speed_buckets": {"centers": [0.0, 1.0], "radii": [0.5, 0.5]},
            "head_speed_mean": 0.4, "audio_emb": None, "split": "train", "config": OLD_CONFIG,
            "gaze_note": {"from": "a newer writer"}}


# ----------------------------------------------------------------------------- SampleMeta
def test_sample_meta_round_trips_and_its_bytes_are_stable():
    meta = SampleMeta(key="a_00001", source_id="a", num_frames=30, crop_size=256, crop_box=[1.0, 2.0, 300.0, 301.0],
                      speed_buckets={"centers": [0.0, 0.5], "radii": [0.25, 0.25], "formula": "tanh((w - c) / r * 3)"},
                      head_speed_mean=np.float32(0.25), scores={"face_size_mean": np.float64(0.4)},
                      audio_emb={"encoder": "tiny", "num_layers": 3, "dim": 8}, config_sha256="ab" * 32)
    data = meta.to_json()
    back = SampleMeta.from_json(data)
    assert back.to_json() == data
    assert back.key == "a_00001" and back.head_speed_mean == 0.25 and back.speed_centers == [0.0, 0.5]
    parsed = json.loads(data)
    assert parsed["meta_version"] == SAMPLE_META_VERSION and parsed["schema_version"] == SCHEMA_VERSION
    # keys whose absence means something are not written as null
    assert "latents" not in parsed and "config" not in parsed
    assert list(parsed) == sorted(parsed)  # sorted keys: the same metadata gives the same bytes
    assert meta.dims() == {"T": 30, "S": 256, "K": None, "d": 2, "E": None, "L": 3, "D": 8, "C": None, "s": None}


def test_old_sample_json_stays_readable_and_keeps_unknown_keys():
    meta = SampleMeta.from_dict(OLD_JSON)
    assert meta.meta_version == 1 and meta.config == OLD_CONFIG and meta.config_sha256 is None
    assert meta.quality is None and meta.vocals is None and meta.head_speed_unit == "degrees per frame"  # defaults
    assert meta.extra == {"gaze_note": {"from": "a newer writer"}}
    written = json.loads(meta.to_json())
    assert written["gaze_note"] == {"from": "a newer writer"}  # kept, not dropped
    assert written["meta_version"] == SAMPLE_META_VERSION
    # the config it was made with: the inline one, marked as layout 1 of BuildConfig
    stored = meta.build_config(None)
    assert stored["_class"] == "BuildConfig" and stored["_version"] == 1 and stored["clip"] == OLD_CONFIG["clip"]
    assert meta.crop_scale(None) == 1.8
    # a record without a schema version is no shard sample at all
    assert SampleMeta.from_dict({"key": "x"}).schema_version is None
    with pytest.raises(ValueError):
        SampleMeta.from_json(b"[1, 2]")


# ----------------------------------------------------------------------------- configs
def test_config_reference_covers_exactly_what_shapes_samples():
    config = BuildConfig()
    ref = config_sha256(config.to_dict())
    assert ref == config_sha256(config.to_stored())  # the class / version markers are not content
    assert len(ref) == 64 and int(ref, 16) >= 0
    finalize_only = BuildConfig()
    finalize_only.identity.test_fraction, finalize_only.shards.max_samples, finalize_only.decode.threads = 0.5, 7, 4
    assert config_sha256(finalize_only.to_dict()) == ref  # re-splitting or re-sharding leaves every sample json alone
    shaping = BuildConfig()
    shaping.clip.min_seconds = 3.0
    assert config_sha256(shaping.to_dict()) != ref


def test_stored_configs_carry_class_and_version_and_older_layouts_load():
    config = BuildConfig()
    config.clip.min_seconds = 3.0
    stored = config.to_stored()
    assert stored["_class"] == "BuildConfig" and stored["_version"] == BuildConfig.CONFIG_VERSION == 2
    assert BuildConfig.from_dict(stored) == config
    assert BuildConfig.from_dict(config.to_dict()) == config  # a partial / unmarked user config file
    # what a build stored before markers, with fields since removed (decode.backend) or moved
    # (sync.min_face_quality -> quality.min_face_quality)
    old = BuildConfig.from_dict(OLD_CONFIG)
    assert old.quality.min_face_quality == 0.3 and old.clip.min_seconds == 2.0 and not hasattr(old.decode, "backend")
    assert BuildConfig.from_dict({"_class": "BuildConfig", "_version": 1, **OLD_CONFIG}) == old
    with pytest.raises(ValueError, match="is not a BuildConfig"):
        BuildConfig.from_dict({"_class": "ExecutorConfig", "_version": 1})
    with pytest.raises(ValueError, match="newer than this code reads"):
        BuildConfig.from_dict({"_class": "BuildConfig", "_version": 3})
    with pytest.raises(ValueError, match="unknown config key BuildConfig.decoder"):
        BuildConfig.from_dict({"decoder": {}})  # a typo is still an error, whatever the version


def test_validator_checks_the_config_reference(tmp_path):
    key, members, meta = make_sample(0, frames=12, with_audio_emb=False)
    shard = str(tmp_path / "train-000000.tar")
    write_tar(shard, [(key, members, meta)], extra_index=fixture_index(meta["crop_size"]))
    assert validate_shard(shard, decode_media=False)[1] == []
    index_path = tmp_path / "train-000000.index.json"
    index = json.loads(index_path.read_text())
    (ref, stored), = index["configs"].items()
    index["configs"] = {ref: dict(stored, clip=dict(stored["clip"], min_seconds=9.0))}  # content no longer matches its key
    index_path.write_text(json.dumps(index))
    assert [i.reason for i in validate_shard(shard, decode_media=False)[1]] == [
        f"shard index config {ref[:12]}... does not hash to its key"]
    index["configs"] = {}
    index_path.write_text(json.dumps(index))
    assert [i.reason for i in validate_shard(shard, decode_media=False)[1]] == [
        f"json config_sha256 {ref[:12]}... names no config in the shard index"]


def _old_shard(path: str) -> str:
    """A shard as builds wrote it before references: config inline in every sample and once in the index."""
    samples = []
    for i in range(2):
        key, members, meta = make_sample(i, frames=12, with_audio_emb=False)
        old = {k: v for k, v in meta.items() if k not in ("config_sha256", "meta_version")}
        old["config"] = OLD_CONFIG
        members = dict(members, json=json.dumps(old, sort_keys=True).encode())
        samples.append((key, members, old))
    write_tar(path, samples, extra_index={"config": OLD_CONFIG})
    return path


def test_an_old_shard_validates_and_a_rewrite_moves_its_config_into_the_index(tmp_path):
    shard = _old_shard(str(tmp_path / "train-000000.tar"))
    assert validate_shard(shard, decode_media=False)[1] == []
    before = {r["__key__"]: r for r in iter_raw_samples(shard)}
    assert rewrite_shard(shard, lambda raw: raw) == 2
    index = read_index(shard)
    assert "config" not in index
    (ref, stored), = index["configs"].items()
    assert stored == {"_class": "BuildConfig", "_version": 1, **OLD_CONFIG} and config_sha256(stored) == ref
    for raw in iter_raw_samples(shard):
        meta = json.loads(raw["json"])
        assert "config" not in meta and meta["config_sha256"] == ref and meta["meta_version"] == SAMPLE_META_VERSION
        assert {k: v for k, v in raw.items() if k != "json"} == {k: v for k, v in before[raw["__key__"]].items() if k != "json"}
    assert validate_shard(shard, decode_media=False)[1] == []
    # a rewrite that changes the config: the hash follows, the old entry goes
    rewrite_shard(shard, lambda raw: raw, update_config=lambda s: {**s, "clip": {**s["clip"], "min_seconds": 4.0}})
    (new_ref, new_stored), = read_index(shard)["configs"].items()
    assert new_ref != ref and new_stored["clip"]["min_seconds"] == 4.0
    assert {SampleMeta.from_json(r["json"]).config_sha256 for r in iter_raw_samples(shard)} == {new_ref}


def test_resume_reads_the_config_of_old_and_new_final_shards(tmp_path):
    from emo_data.finalize import SampleStore

    out = tmp_path / "out"
    out.mkdir()
    _old_shard(str(out / "train-000000.tar"))
    key, members, meta = make_sample(5, frames=12, with_audio_emb=False, source_id="newer")
    write_tar(str(out / "test-000000.tar"), [(key, members, meta)], extra_index=fixture_index(meta["crop_size"]))
    store = SampleStore(str(out))
    path, entry = store.locate("WDA_KatieHill_000", "WDA_KatieHill_000_00001")
    assert store.build_config(path, entry)["clip"] == OLD_CONFIG["clip"]
    path, entry = store.locate("newer", key)
    assert store.build_config(path, entry) == next(iter(fixture_index(meta["crop_size"])["configs"].values()))


# ----------------------------------------------------------------------------- shared definitions
def test_one_definition_of_members_buckets_and_constants():
    from emo_data import pose
    from emo_model import conditioning, media

    assert [m.name for m in MEMBERS] == list(REQUIRED_MEMBERS + OPTIONAL_MEMBERS)
    assert {"audio_emb.npy", "latents.npy", "head_pose_raw.npy"} == set(OPTIONAL_MEMBERS)
    assert pose.speed_buckets is conditioning.speed_bucket_encoding  # the contract's encoder, everywhere
    assert tuple(SpeedConfig().centers) == DEFAULT_SPEED_CENTERS and tuple(SpeedConfig().radii) == DEFAULT_SPEED_RADII
    assert ClipConfig().crop_scale == CROP_SCALE
    w = np.array([0.0, 0.3, 2.0], np.float32)
    s = conditioning.speed_bucket_encoding(w, [0.0, 0.5], [0.1, 0.25])
    assert s.dtype == np.float32 and s.shape == (3, 2)
    np.testing.assert_allclose(s, np.tanh((w[:, None] - [0.0, 0.5]) / np.array([0.1, 0.25]) * 3), atol=1e-6)
    assert conditioning.speed_bucket_encoding(0.5).shape == (len(DEFAULT_SPEED_CENTERS),)
    with pytest.raises(ValueError):
        conditioning.speed_bucket_encoding(w, [0.0, 1.0], [0.1])
    # the model side's reference crop is the data side's: CROP_SCALE x the face box's long side
    assert media.square_crop_box((1000, 1000), (400, 400, 500, 500)) == (360, 360, int(round(100 * CROP_SCALE)))


# ----------------------------------------------------------------------------- the H.264 writer
_ENCODE = """
import hashlib, sys
import numpy as np
sys.path.insert(0, {repo!r})
import torch  # as in emo-sample / emo-eval: the writer runs in processes that hold torch
from emo_data.shards import encode_mp4
yy, xx = np.mgrid[0:96, 0:96]
frames = [np.stack([(xx * 2 + 3 * i) % 256, (yy * 2 + i) % 256, (xx + yy + 2 * i) % 256], -1).astype(np.uint8) for i in range(20)]
print(hashlib.sha256(encode_mp4(frames, 25.0)).hexdigest())
"""


def _moving_gradient() -> list:
    """Smooth motion: libx264's default settings code most of these frames as B-frames."""
    yy, xx = np.mgrid[0:96, 0:96]
    return [np.stack([(xx * 2 + 3 * i) % 256, (yy * 2 + i) % 256, (xx + yy + 2 * i) % 256], -1).astype(np.uint8)
            for i in range(20)]


def test_one_h264_writer_gives_the_same_bytes_for_the_same_frames(tmp_path):
    import av

    frames = _moving_gradient()
    audio = np.random.default_rng(0).uniform(-0.2, 0.2, 16000 * 20 // 25).astype(np.float32)
    first = encode_mp4(frames, 25.0)
    assert encode_mp4(iter(frames), 25.0) == first  # streamed or listed, the same file
    # in fresh processes too (where the thread count of an auto-threaded encoder may differ)
    script = _ENCODE.format(repo=str(REPO))
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert runs == {hashlib.sha256(first).hexdigest()}
    # the file writer (videos with audio) is the same encoder
    write_mp4(str(tmp_path / "a.mp4"), frames, fps=25.0, audio=audio)
    write_mp4(str(tmp_path / "b.mp4"), frames, fps=25.0, audio=audio)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    with av.open(str(tmp_path / "a.mp4")) as container:
        assert len(container.streams.audio) == 1
        types = [int(f.pict_type) for f in container.decode(video=0)]
    assert len(types) == 20 and int(av.video.frame.PictureType.B) not in types  # the deterministic settings: no B-frames
    # odd sizes are padded to even (yuv420p), not refused
    with av.open(io.BytesIO(encode_mp4([f[:-1, :-3] for f in frames[:3]], 25.0))) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (94, 96)
