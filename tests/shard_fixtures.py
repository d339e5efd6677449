"""Valid EMO shards made from real footage, and ways to break them (for ``emo-shards`` tests).

``make_shard`` decodes frames of a real 512x512 25 fps talking-head clip, finds the face once per
frame with OpenCV's Haar cascade, and fills every member with the dtypes and shapes that
:func:`emo_data.shards.validate_sample` checks; pose, speeds and speed buckets are synthetic but
mutually consistent (the contract's bucket encoder with the default SpeedConfig). Samples reference
:func:`fixture_config` by ``config_sha256``; shards written with :func:`fixture_index` hold it, as
a real build's do.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from emo_data.config import BuildConfig, SpeedConfig
from emo_data.shards import (
    ALL_MEMBERS,
    INDEX_SUFFIX,
    SAMPLE_META_VERSION,
    SCHEMA_VERSION,
    config_sha256,
    encode_mp4,
    index_path_for,
    npy_bytes,
    png_bytes,
    speed_bucket_encoding,
    wav_bytes,
    write_tar,
)

from conftest import SAMPLES  # noqa: E402 - the one documented place: ../shared/samples or $EMO_SAMPLES_DIR

SAMPLE_VIDEO = str(SAMPLES / "video" / "sadtalker__WDA_KatieHill_000.mp4")
FPS = 25.0
SR = 16000
LANDMARKS = 68
IDENTITY_DIM = 128


@lru_cache(maxsize=1)
def _footage(max_frames: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(frames [N, 512, 512, 3] uint8, audio float32 16 kHz) of the sample clip, decoded once."""
    from emo_data.decode import AudioDecodeStage, iter_frames
    from emo_data.types import Source

    frames = []
    for frame in iter_frames(SAMPLE_VIDEO, fps=FPS):
        frames.append(frame.image)
        if len(frames) >= max_frames:
            break
    track = AudioDecodeStage().process(Source(path=SAMPLE_VIDEO, source_id="fixture"))
    audio = track.segment(0.0, int(round(len(frames) * SR / FPS)))
    return np.stack(frames), audio


@lru_cache(maxsize=1)
def _face_boxes() -> np.ndarray:
    """A face box per decoded frame from OpenCV's Haar cascade (keyframes, interpolated)."""
    import cv2

    frames, _ = _footage()
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    step = 8  # detect on every 8th frame, interpolate in between (Haar is ~25 ms a frame)
    keys = list(range(0, len(frames), step))
    if keys[-1] != len(frames) - 1:
        keys.append(len(frames) - 1)
    found_boxes = []
    last = np.array([110.0, 110.0, 310.0, 330.0], np.float32)  # plausible fallback
    for i in keys:
        small = cv2.cvtColor(frames[i][::2, ::2], cv2.COLOR_RGB2GRAY)
        found = cascade.detectMultiScale(small, 1.1, 5, minSize=(40, 40))
        if len(found):
            x, y, w, h = max(found, key=lambda b: b[2] * b[3]) * 2
            # Haar boxes stop at the mouth; stretch down to the chin like a landmark box.
            last = np.array([x, y, x + w, y + h * 1.12], np.float32)
        found_boxes.append(last)
    found_arr = np.stack(found_boxes)
    idx = np.arange(len(frames))
    boxes = np.stack([np.interp(idx, keys, found_arr[:, j]) for j in range(4)], 1)
    return boxes.astype(np.float32)


def _template68() -> np.ndarray:
    """A rough iBUG-68 mean shape in unit box coordinates."""
    pts = []
    for i in range(17):  # jaw
        th = np.pi * i / 16
        pts.append((0.5 - 0.5 * np.cos(th), 0.3 + 0.67 * np.sin(th)))
    for x0, x1 in ((0.1, 0.42), (0.58, 0.9)):  # brows
        for j in range(5):
            x = x0 + (x1 - x0) * j / 4
            pts.append((x, 0.22 - 0.05 * np.sin(np.pi * j / 4)))
    for j in range(4):  # nose bridge
        pts.append((0.5, 0.32 + 0.08 * j))
    for j in range(5):  # nostrils
        pts.append((0.4 + 0.05 * j, 0.6 + 0.02 * (1 - abs(j - 2) / 2)))
    for cx in (0.3, 0.7):  # eyes
        for j in range(6):
            th = 2 * np.pi * j / 6
            pts.append((cx - 0.08 * np.cos(th), 0.38 - 0.03 * np.sin(th)))
    for j in range(12):  # outer lips
        th = 2 * np.pi * j / 12
        pts.append((0.5 - 0.18 * np.cos(th), 0.78 - 0.06 * np.sin(th)))
    for j in range(8):  # inner lips
        th = 2 * np.pi * j / 8
        pts.append((0.5 - 0.11 * np.cos(th), 0.78 - 0.025 * np.sin(th)))
    arr = np.array(pts, np.float32)
    assert arr.shape == (LANDMARKS, 2)
    return arr


def speed_buckets(speed: np.ndarray, config: Optional[SpeedConfig] = None) -> np.ndarray:
    cfg = config or SpeedConfig()
    return speed_bucket_encoding(speed, cfg.centers, cfg.radii)


def fixture_config(crop_size: int) -> dict[str, Any]:
    """The stored build config fixture samples of side ``crop_size`` reference: the defaults."""
    config = BuildConfig()
    config.clip.crop_size = crop_size
    return config.to_stored()


def fixture_index(crop_size: int) -> dict[str, Any]:
    """Index keys of a shard of fixture samples: the config they reference, under its hash."""
    stored = fixture_config(crop_size)
    return {"configs": {config_sha256(stored): stored}}


def make_sample(
    clip_index: int,
    frames: int = 40,
    with_audio_emb: bool = True,
    *,
    source_id: str = "WDA_KatieHill_000",
    start_frame: Optional[int] = None,
    kind: str = "talk",
    language: str = "en",
    identity: str = "id_0000",
    split: str = "train",
    seed: int = 0,
) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    """(key, members, meta) of one valid sample cut from the real footage."""
    all_frames, audio = _footage()
    boxes_all = _face_boxes()
    n = len(all_frames)
    if frames > n:
        raise ValueError(f"at most {n} frames")
    start = (clip_index * frames) % (n - frames + 1) if start_frame is None else start_frame
    rng = np.random.default_rng(seed * 1000 + clip_index)
    T, S = frames, all_frames.shape[1]
    clip = all_frames[start : start + T]
    boxes = boxes_all[start : start + T].copy()
    unit = _template68()
    wh = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    landmarks = (boxes[:, None, :2] + unit[None] * wh + rng.normal(0, 1.0, (T, LANDMARKS, 2))).astype(np.float32)
    landmarks = np.clip(landmarks, boxes[:, None, :2], boxes[:, None, 2:]).astype(np.float32)

    t = (start + np.arange(T)) / FPS
    phase = rng.uniform(0, 2 * np.pi, 3)
    amp = 4.0 + 6.0 * rng.uniform()
    yaw = amp * np.sin(2 * np.pi * t / 3.0 + phase[0])
    pitch = 0.5 * amp * np.sin(2 * np.pi * t / 2.1 + phase[1])
    roll = 2.0 * np.sin(2 * np.pi * t / 4.0 + phase[2])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    pose = np.stack([yaw, pitch, roll, centre[:, 0] - S / 2, centre[:, 1] - S / 2, np.full(T, 1.0)], 1).astype(np.float32)
    rot = pose[:, :3]
    speed = np.zeros(T, np.float32)
    speed[1:] = np.linalg.norm(np.diff(rot, axis=0), axis=1)
    speed[0] = speed[1] if T > 1 else 0.0
    buckets = speed_buckets(speed)

    mask = np.zeros((S, S), np.uint8)
    x0, y0 = np.floor(boxes[:, :2].min(0)).astype(int)
    x1, y1 = np.ceil(boxes[:, 2:].max(0)).astype(int)
    mask[max(y0, 0) : min(y1, S), max(x0, 0) : min(x1, S)] = 255

    ident = rng.normal(size=IDENTITY_DIM).astype(np.float32)
    ident /= np.linalg.norm(ident)
    n_audio = int(round(T * SR / FPS))
    a0 = int(round(start * SR / FPS))
    wav = audio[a0 : a0 + n_audio]
    key = f"{source_id}_{clip_index:05d}"
    cfg = SpeedConfig()
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "meta_version": SAMPLE_META_VERSION,
        "key": key,
        "source_id": source_id,
        "source_path": SAMPLE_VIDEO,
        "clip_index": clip_index,
        "kind": kind,
        "language": language,
        "identity": identity,
        "split": split,
        "start_s": round(start / FPS, 6),
        "end_s": round((start + T) / FPS, 6),
        "num_frames": T,
        "fps": FPS,
        "crop_size": S,
        "sample_rate": SR,
        "landmark_count": LANDMARKS,
        "identity_dim": IDENTITY_DIM,
        "speed_buckets": {"centers": list(cfg.centers), "radii": list(cfg.radii)},
        "audio_emb": {"encoder": "random-fixture", "num_layers": 3, "dim": 8} if with_audio_emb else None,
        # as the real build writes them (emo_data/samples.py)
        "crop_box": [0.0, 0.0, float(S), float(S)],
        "source_size": [S, S],
        "head_speed_unit": "degrees per frame",
        "head_speed_mean": float(speed.mean()),
        "config_sha256": config_sha256(fixture_config(S)),
    }
    members = {
        "mp4": encode_mp4(clip, FPS),
        "wav": wav_bytes(wav, SR),
        "face_mask.png": png_bytes(mask),
        "face_boxes.npy": npy_bytes(boxes),
        "landmarks.npy": npy_bytes(landmarks),
        "head_pose.npy": npy_bytes(pose),
        "head_speed.npy": npy_bytes(speed),
        "speed_buckets.npy": npy_bytes(buckets),
        "identity_emb.npy": npy_bytes(ident),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if with_audio_emb:
        members["audio_emb.npy"] = npy_bytes(rng.normal(size=(T, 3, 8)).astype(np.float16))
    return key, members, meta


def make_shard(
    dir: str,
    n_samples: int = 2,
    frames: int = 40,
    with_audio_emb: bool = True,
    *,
    name: Optional[str] = None,
    split: str = "train",
    kind: str = "talk",
    language: str = "en",
    identity: str = "id_0000",
    source_id: str = "WDA_KatieHill_000",
    seed: int = 0,
) -> str:
    """Write a valid shard of ``n_samples`` real-footage samples under ``dir``; returns its path."""
    os.makedirs(dir, exist_ok=True)
    path = os.path.join(dir, name or f"{split}-000000.tar")
    samples = [
        make_sample(i, frames, with_audio_emb, source_id=source_id, kind=kind, language=language,
                    identity=identity, split=split, seed=seed)
        for i in range(n_samples)
    ]
    write_tar(path, samples, extra_index=fixture_index(samples[0][2]["crop_size"]))
    return path


# --------------------------------------------------------------------------- corruptions
def load_index(path: str) -> dict:
    with open(index_path_for(path)) as fh:
        return json.load(fh)


def save_index(path: str, index: dict) -> None:
    with open(index_path_for(path), "w") as fh:
        json.dump(index, fh)


def truncate_shard(path: str, keep_fraction: float = 0.6) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))


def flip_bit(path: str, key: str, member: str, byte: int = 100, bit: int = 3) -> None:
    """Flip one bit inside ``member``'s data (offset from the sidecar index); index left as is."""
    entry = next(e for e in load_index(path)["samples"] if e["key"] == key)
    loc = entry["members"][member]
    pos = loc["offset"] + min(byte, loc["size"] - 1)
    with open(path, "r+b") as fh:
        fh.seek(pos)
        value = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([value ^ (1 << bit)]))


def _read_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:") as tf:
        return [(info.name, tf.extractfile(info).read()) for info in tf if info.isfile()]


def _rewrite(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))


def drop_member(path: str, key: str, member: str) -> None:
    """Rewrite the tar without ``key.member`` (the index keeps listing it, as a real loss would)."""
    _rewrite(path, [(n, d) for n, d in _read_members(path) if n != f"{key}.{member}"])


def replace_member(path: str, key: str, member: str, data: bytes) -> None:
    """Rewrite the tar with new bytes for ``key.member`` and make the index agree (digest, offsets).

    The shard then passes every integrity check, so only content checks can catch the change.
    """
    members = [(n, data if n == f"{key}.{member}" else d) for n, d in _read_members(path)]
    _rewrite(path, members)
    index = load_index(path)
    with tarfile.open(path, "r:") as tf:
        offsets = {info.name: (info.offset_data, info.size) for info in tf if info.isfile()}
    for entry in index["samples"]:
        for m, loc in entry["members"].items():
            off, size = offsets[f"{entry['key']}.{m}"]
            loc["offset"], loc["size"] = off, size
            if entry["key"] == key and m == member:
                loc["sha256"] = hashlib.sha256(data).hexdigest()
    index["bytes"] = os.path.getsize(path)
    save_index(path, index)


__all__ = [
    "ALL_MEMBERS", "INDEX_SUFFIX", "make_sample", "make_shard", "truncate_shard", "flip_bit",
    "drop_member", "replace_member", "load_index", "save_index", "speed_buckets", "fixture_config", "fixture_index",
]
