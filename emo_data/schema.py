"""The EMO shard schema: one module that both the data and the model side import.

A shard is a WebDataset tar, ``<split>-000000.tar``; one sample per clip, key
``<source_id>_<clip:05d>`` (no dots). Members (never pickle):

================== ===================== =================================================
member             dtype / shape          meaning
================== ===================== =================================================
``mp4``            H.264, S x S, fps      the cropped clip (S = crop size, default 512)
``wav``            PCM16 mono, 16 kHz     the clip's audio, exactly T * sr / fps samples
``face_mask.png``  uint8 [S, S] 0/255     face-union mask M (union of the clip's boxes)
``face_boxes.npy`` float32 [T, 4]         per-frame face box x0, y0, x1, y1 (crop pixels)
``landmarks.npy``  float32 [T, K, 2]      per-frame landmarks (crop pixels), K in json
``head_pose.npy``  float32 [T, 6]         yaw, pitch, roll (degrees), tx, ty, tz
``head_speed.npy`` float32 [T]            head rotation speed w_f, degrees per frame (of the smoothed pose)
``head_pose_raw.npy`` float32 [T, 6]      per-frame pose before smoothing (optional: builds since the
                                         flow-stabilised pose, docs/pose.md), to re-derive speed
``speed_buckets.npy`` float32 [T, d]      s_i = tanh((w_f - c_i) / r_i * 3)
``identity_emb.npy`` float32 [E]          face embedding of the clip (identity splits)
``audio_emb.npy``  float16 [T, L, D]      wav2vec hidden states per frame (optional)
``latents.npy``    float16 [T, C, s, s]   VAE posterior means per frame, unscaled (optional; emo-data add-latents)
``json``           utf-8                  metadata, schema version, build config
================== ===================== =================================================

Next to each tar, ``<shard>.index.json`` lists every sample's members with byte offsets,
sizes and SHA-256 digests (random access over fsspec and bit-flip detection) plus each
sample's metadata (so ``ls``/``stats`` need not read the tar).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import wave
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np

SCHEMA_VERSION = 1
SAMPLE_RATE = 16000

REQUIRED_MEMBERS = (
    "mp4",
    "wav",
    "face_mask.png",
    "face_boxes.npy",
    "landmarks.npy",
    "head_pose.npy",
    "head_speed.npy",
    "speed_buckets.npy",
    "identity_emb.npy",
    "json",
)
OPTIONAL_MEMBERS = ("audio_emb.npy", "latents.npy", "head_pose_raw.npy")
ALL_MEMBERS = REQUIRED_MEMBERS + OPTIONAL_MEMBERS
# Extensions that imply pickle or arbitrary code: refused on read, reported by validate.
UNSAFE_EXTENSIONS = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".ckpt", ".cls", ".joblib")

INDEX_SUFFIX = ".index.json"


# --------------------------------------------------------------------------- encoding
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    pcm16 = (pcm * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16.tobytes())
    return buf.getvalue()


def load_wav(data: bytes) -> tuple[np.ndarray, int]:
    """PCM16 WAV bytes -> (float32 mono samples, sample rate)."""
    with wave.open(io.BytesIO(data), "rb") as w:
        channels, width, rate, count = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        raw = w.readframes(count)
    if width != 2:
        raise ValueError(f"wav sample width {width * 8} bit, expected 16")
    if len(raw) != count * channels * width:
        raise ValueError(f"wav truncated: {len(raw)} of {count * channels * width} data bytes")
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32767.0
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def png_bytes(image: np.ndarray) -> bytes:
    import cv2

    arr = np.ascontiguousarray(image)
    if arr.ndim == 3:
        arr = arr[..., ::-1]  # RGB -> BGR for OpenCV
    ok, enc = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return enc.tobytes()


def load_png(data: bytes) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("PNG does not decode")
    if arr.ndim == 3:
        arr = arr[..., ::-1].copy()
    return arr


def encode_mp4(frames: Iterable[np.ndarray], fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """RGB uint8 frames -> H.264 yuv420p mp4 bytes (every frame kept, constant ``fps``)."""
    import av
    from fractions import Fraction

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("encode_mp4 got no frames")
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, max_frames: Optional[int] = None) -> np.ndarray:
    """mp4 bytes -> [T, H, W, 3] uint8 RGB (all frames, or the first ``max_frames``)."""
    import av

    frames = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError("mp4 holds no decodable frames")
    return np.stack(frames)


def count_mp4_frames(data: bytes) -> tuple[int, int, int]:
    """Decode every frame (so corruption shows) and return (frames, width, height)."""
    import av

    count, width, height = 0, 0, 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: ~1.4x faster on 2 cores, same frames
        for frame in container.decode(stream):
            count += 1
            width, height = frame.width, frame.height
    return count, width, height


def encode_sample(sample) -> dict[str, bytes]:
    """A :class:`emo_data.types.ClipSample` -> {member: bytes}."""
    members = {
        "mp4": sample.mp4,
        "wav": sample.wav,
        "face_mask.png": png_bytes(sample.face_mask),
        "face_boxes.npy": npy_bytes(sample.face_boxes.astype(np.float32)),
        "landmarks.npy": npy_bytes(sample.landmarks.astype(np.float32)),
        "head_pose.npy": npy_bytes(sample.head_pose.astype(np.float32)),
        "head_speed.npy": npy_bytes(sample.head_speed.astype(np.float32)),
        "speed_buckets.npy": npy_bytes(sample.speed_buckets.astype(np.float32)),
        "identity_emb.npy": npy_bytes(sample.identity_emb.astype(np.float32)),
        "json": json.dumps(sample.meta, sort_keys=True, default=_json_default).encode("utf-8"),
    }
    if sample.audio_emb is not None:
        members["audio_emb.npy"] = npy_bytes(sample.audio_emb.astype(np.float16))
    if getattr(sample, "head_pose_raw", None) is not None:
        members["head_pose_raw.npy"] = npy_bytes(sample.head_pose_raw.astype(np.float32))
    return members


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def decode_member(name: str, data: bytes, decode_video: bool = False):
    """Bytes of one member -> a Python value. Never unpickles."""
    if ("." + name).endswith(UNSAFE_EXTENSIONS):
        raise ValueError(f"refusing to decode {name}: pickle-like member")
    if name.endswith(".npy"):
        return load_npy(data)
    if name == "json" or name.endswith(".json"):
        return json.loads(data.decode("utf-8"))
    if name.endswith("png"):
        return load_png(data)
    if name.endswith("wav"):
        return load_wav(data)[0]
    if name.endswith("mp4") and decode_video:
        return decode_mp4(data)
    return data


def decode_sample(raw: dict[str, Any], decode_video: bool = False) -> dict[str, Any]:
    """A raw WebDataset sample ({'__key__', member: bytes}) -> decoded arrays.

    Use as ``webdataset.WebDataset(urls).map(decode_sample)``; ``mp4`` stays bytes unless
    ``decode_video`` (decode on the training worker when you need the frames).
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("__"):
            out[name] = value
        else:
            out[name] = decode_member(name, value, decode_video=decode_video)
    return out


# --------------------------------------------------------------------------- writing
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# Every member header is the same apart from name and size (no wall-clock mtime, no user ids),
# so the same samples always give the same tar bytes and a re-run can be checked with a digest.
MEMBER_MTIME = 0


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "emo"
    return info


def scan_tar_index(path: str) -> list[dict[str, Any]]:
    """Offsets of every member in a finished tar (reads headers only)."""
    entries = []
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            if info.isfile():
                entries.append({"name": info.name, "offset": info.offset_data, "size": info.size})
    return entries


class StreamingTarWriter:
    """Writes samples one at a time to a temporary file beside ``path``; ``close()`` renames it
    and writes the index. Temporary names carry the process id, so two attempts at the same
    file (a retried Ray task) never write into one temporary file.

    Memory holds one sample at a time, whatever the number of samples. A shard that has its
    ``.index.json`` is complete: the tar is renamed first, the index written after it.
    """

    def __init__(self, path: str, extra_index: Optional[dict] = None):
        self.path = path
        self.extra_index = extra_index or {}
        self._tmp = f"{path}.{os.getpid()}.tmp"
        self._fh = open(self._tmp, "wb")
        self._tf = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self._digests: dict[str, dict[str, str]] = {}
        self._metas: list[tuple[str, dict[str, Any]]] = []
        self.bytes_written = 0

    def __len__(self) -> int:
        return len(self._metas)

    def write(self, key: str, members: dict[str, bytes], meta: dict[str, Any]) -> None:
        if "." in key:
            raise ValueError(f"sample key {key!r} contains a dot")
        if key in self._digests:
            raise ValueError(f"duplicate sample key {key!r}")
        self._digests[key] = {}
        for member in ALL_MEMBERS:
            if member not in members:
                continue
            data = members[member]
            self._tf.addfile(_tarinfo(f"{key}.{member}", len(data)), io.BytesIO(data))
            self._digests[key][member] = hashlib.sha256(data).hexdigest()
            self.bytes_written += len(data) + 512
        self._metas.append((key, meta))

    def abort(self) -> None:
        try:
            self._tf.close()
            self._fh.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def close(self) -> dict[str, Any]:
        self._tf.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        by_key: dict[str, dict[str, Any]] = {}
        for entry in scan_tar_index(self.path):
            key, member = entry["name"].split(".", 1)
            by_key.setdefault(key, {})[member] = {
                "offset": entry["offset"],
                "size": entry["size"],
                "sha256": self._digests[key][member],
            }
        index = {
            "schema_version": SCHEMA_VERSION,
            "shard": os.path.basename(self.path),
            "bytes": os.path.getsize(self.path),
            "num_samples": len(self._metas),
            "samples": [{"key": key, "members": by_key[key], "meta": meta} for key, meta in self._metas],
        }
        index.update(self.extra_index)
        index_path = index_path_for(self.path)
        index_tmp = f"{index_path}.{os.getpid()}.tmp"
        with open(index_tmp, "w") as fh:
            json.dump(index, fh, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(index_tmp, index_path)
        return index


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes], dict[str, Any]]], extra_index: Optional[dict] = None) -> dict[str, Any]:
    """Write ``samples`` [(key, members, meta)] to ``path`` atomically, plus its index."""
    writer = StreamingTarWriter(path, extra_index)
    try:
        for key, members, meta in samples:
            writer.write(key, members, meta)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def index_path_for(shard_path: str) -> str:
    return shard_path[: -len(".tar")] + INDEX_SUFFIX if shard_path.endswith(".tar") else shard_path + INDEX_SUFFIX


class ShardWriter:
    """Rolls samples into ``<split>-NNNNNN.tar`` shards of bounded size, streaming to disk."""

    def __init__(self, out_dir: str, split: str = "train", max_samples: int = 200, max_bytes: int = 1 << 30,
                 start_index: int = 0, extra_index: Optional[dict] = None):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.extra_index = extra_index
        self.index = start_index
        self.written: list[str] = []
        self._current: Optional[StreamingTarWriter] = None

    def write(self, key: str, members: dict[str, bytes], meta: dict[str, Any]) -> None:
        size = sum(len(v) for v in members.values())
        cur = self._current
        if cur is not None and len(cur) and (len(cur) >= self.max_samples or cur.bytes_written + size > self.max_bytes):
            self.flush()
        if self._current is None:
            self._current = StreamingTarWriter(os.path.join(self.out_dir, shard_name(self.split, self.index)), self.extra_index)
        self._current.write(key, members, meta)

    def flush(self) -> Optional[str]:
        if self._current is None:
            return None
        self._current.close()
        self.written.append(self._current.path)
        self._current = None
        self.index += 1
        return self.written[-1]

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def close(self) -> list[str]:
        self.flush()
        return self.written


# --------------------------------------------------------------------------- reading
def _open(url: str, mode: str = "rb"):
    if "://" in url:
        import fsspec

        return fsspec.open(url, mode).open()
    return open(url, mode)


def read_index(shard_url: str) -> Optional[dict[str, Any]]:
    """The shard's sidecar index, or None when it has none."""
    try:
        with _open(index_path_for(shard_url), "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None


def iter_raw_samples(shard_url: str) -> Iterator[dict[str, Any]]:
    """Stream a shard's samples as {'__key__', '__shard__', member: bytes} (tar order)."""
    with _open(shard_url, "rb") as fh:
        with tarfile.open(fileobj=fh, mode="r|") as tf:
            current: dict[str, Any] = {}
            for info in tf:
                if not info.isfile():
                    continue
                key, _, member = info.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                if not current:
                    current = {"__key__": key, "__shard__": shard_url}
                extracted = tf.extractfile(info)
                current[member] = extracted.read() if extracted else b""
            if current:
                yield current


def read_sample(shard_url: str, key: Optional[str] = None, index: Optional[int] = None) -> dict[str, Any]:
    """One sample's raw members, by key or position. With an index, only its bytes are read."""
    idx = read_index(shard_url)
    if idx is not None:
        entries = idx["samples"]
        if key is not None:
            matches = [e for e in entries if e["key"] == key]
            if not matches:
                raise KeyError(f"{key} not in {shard_url}")
            entry = matches[0]
        else:
            if index is None or not 0 <= index < len(entries):
                raise IndexError(f"sample index {index} out of range (shard has {len(entries)})")
            entry = entries[index]
        raw: dict[str, Any] = {"__key__": entry["key"], "__shard__": shard_url}
        with _open(shard_url, "rb") as fh:
            for member, loc in sorted(entry["members"].items(), key=lambda kv: kv[1]["offset"]):
                fh.seek(loc["offset"])
                raw[member] = fh.read(loc["size"])
        return raw
    for position, raw in enumerate(iter_raw_samples(shard_url)):
        if (key is not None and raw["__key__"] == key) or (key is None and position == index):
            return raw
    raise KeyError(f"{key if key is not None else index} not in {shard_url}")


# --------------------------------------------------------------------------- validation
@dataclass
class ValidationIssue:
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}\t{self.key}\t{self.reason}"


def validate_sample(raw: dict[str, Any], expected_digests: Optional[dict[str, dict]] = None, decode_media: bool = True) -> list[str]:
    """Every check on one raw sample; returns human-readable failure reasons (empty = valid)."""
    problems: list[str] = []
    key = raw.get("__key__", "?")
    names = [k for k in raw if not k.startswith("__")]
    for name in names:
        if ("." + name).endswith(UNSAFE_EXTENSIONS):
            problems.append(f"unsafe member {name} (pickle-like)")
        elif name not in ALL_MEMBERS:
            problems.append(f"unexpected member {name}")
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        problems.append("missing members: " + ", ".join(missing))
    if expected_digests is not None:
        for name, info in expected_digests.items():
            if name in raw:
                data = raw[name]
                if len(data) != info["size"]:
                    problems.append(f"{name}: {len(data)} bytes, index says {info['size']}")
                elif hashlib.sha256(data).hexdigest() != info["sha256"]:
                    problems.append(f"{name}: SHA-256 differs from the shard index (corrupted bytes)")
            else:
                problems.append(f"{name}: listed in the shard index but absent from the tar")
    if "json" not in raw:
        return problems
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
        return problems + [f"json does not parse: {exc}"]
    if meta.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {meta.get('schema_version')} != {SCHEMA_VERSION}")
    if meta.get("key") != key:
        problems.append(f"json key {meta.get('key')!r} != sample key {key!r}")
    T = meta.get("num_frames")
    S = meta.get("crop_size")
    if not isinstance(T, int) or T <= 0 or not isinstance(S, int):
        return problems + ["json lacks num_frames/crop_size"]

    def arr(name: str) -> Optional[np.ndarray]:
        if name not in raw:
            return None
        try:
            return load_npy(raw[name])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} does not load: {exc}")
            return None

    def check(name: str, a: Optional[np.ndarray], dtype, shape: tuple) -> None:
        if a is None:
            return
        if a.dtype != np.dtype(dtype):
            problems.append(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
        if len(a.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            problems.append(f"{name}: shape {tuple(a.shape)}, expected {tuple('*' if s is None else s for s in shape)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            problems.append(f"{name}: holds NaN or inf")

    K = meta.get("landmark_count")
    d = len(meta.get("speed_buckets", {}).get("centers", [])) or None
    check("face_boxes.npy", arr("face_boxes.npy"), np.float32, (T, 4))
    check("landmarks.npy", arr("landmarks.npy"), np.float32, (T, K, 2))
    check("head_pose.npy", arr("head_pose.npy"), np.float32, (T, 6))
    check("head_pose_raw.npy", arr("head_pose_raw.npy"), np.float32, (T, 6))
    speed = arr("head_speed.npy")
    check("head_speed.npy", speed, np.float32, (T,))
    buckets = arr("speed_buckets.npy")
    check("speed_buckets.npy", buckets, np.float32, (T, d))
    if buckets is not None and buckets.size and (buckets.min() < -1.0001 or buckets.max() > 1.0001):
        problems.append("speed_buckets.npy: values outside [-1, 1]")
    radii = (meta.get("speed_buckets") or {}).get("radii") or []
    if (speed is not None and buckets is not None and d and len(radii) == d and buckets.shape == (T, d) and speed.shape == (T,)
            and np.all(np.isfinite(speed)) and np.all(np.isfinite(buckets))):
        c = np.asarray(meta["speed_buckets"]["centers"], np.float64)[None, :]
        r = np.asarray(radii, np.float64)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            err = float(np.nanmax(np.abs(np.tanh((speed.astype(np.float64)[:, None] - c) / r * 3.0) - buckets)))
        if err > 1e-3:
            problems.append(f"speed_buckets.npy disagrees with tanh((head_speed - c) / r * 3) by up to {err:.3g}")
    check("identity_emb.npy", arr("identity_emb.npy"), np.float32, (meta.get("identity_dim"),))
    audio_meta = meta.get("audio_emb")
    if audio_meta:
        if "audio_emb.npy" not in raw:
            problems.append("json declares audio_emb but audio_emb.npy is missing")
        check("audio_emb.npy", arr("audio_emb.npy"), np.float16, (T, audio_meta.get("num_layers"), audio_meta.get("dim")))
    elif "audio_emb.npy" in raw:
        problems.append("audio_emb.npy present but json.audio_emb is null")
    latents_meta = meta.get("latents")  # written by emo-data add-latents (emo_data/latents.py)
    if latents_meta:
        if "latents.npy" not in raw:
            problems.append("json declares latents but latents.npy is missing")
        side = latents_meta.get("latent_size")
        check("latents.npy", arr("latents.npy"), np.float16, (T, latents_meta.get("channels"), side, side))
    elif "latents.npy" in raw:
        problems.append("latents.npy present but json.latents is null")

    if "face_mask.png" in raw:
        try:
            mask = load_png(raw["face_mask.png"])
            if mask.shape != (S, S) or mask.dtype != np.uint8:
                problems.append(f"face_mask.png: {mask.dtype} {mask.shape}, expected uint8 ({S}, {S})")
            elif not mask.any():
                problems.append("face_mask.png: empty mask")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"face_mask.png does not decode: {exc}")
    if "wav" in raw:
        try:
            samples, rate = load_wav(raw["wav"])
            expected = int(round(T * rate / meta.get("fps", 25.0)))
            if rate != meta.get("sample_rate", SAMPLE_RATE):
                problems.append(f"wav: {rate} Hz, json says {meta.get('sample_rate')}")
            if abs(len(samples) - expected) > 1:
                problems.append(f"wav: {len(samples)} samples, {T} frames need {expected}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"wav does not decode: {exc}")
    if "mp4" in raw and decode_media:
        try:
            count, width, height = count_mp4_frames(raw["mp4"])
            if count != T:
                problems.append(f"mp4: {count} frames, json says {T}")
            if (width, height) != (S, S):
                problems.append(f"mp4: {width}x{height}, expected {S}x{S}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"mp4 does not decode: {exc}")
    return problems


def _size_of(url: str) -> Optional[int]:
    try:
        if "://" in url:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            return int(fs.size(path))
        return os.path.getsize(url)
    except Exception:  # noqa: BLE001 - size unknown is not a finding by itself
        return None


def validate_shard(shard_url: str, decode_media: bool = True) -> tuple[int, list[ValidationIssue]]:
    """Check a whole shard: tar integrity, index agreement, every sample. Returns (samples, issues).

    Never raises for a bad shard: an unreadable index, a truncated or garbled tar, a sample
    that crashes a check all become issues.
    """
    issues: list[ValidationIssue] = []
    try:
        index = read_index(shard_url)
    except (ValueError, UnicodeDecodeError) as exc:
        index = None
        issues.append(ValidationIssue(shard_url, "-", f"shard index does not parse: {exc}"))
    expected: Optional[dict[str, dict]] = None
    if index is not None:
        try:
            expected = {e["key"]: e["members"] for e in index["samples"]}
        except (KeyError, TypeError) as exc:
            issues.append(ValidationIssue(shard_url, "-", f"shard index is malformed: {type(exc).__name__}: {exc}"))
        size = _size_of(shard_url)
        if isinstance(index.get("bytes"), int) and size is not None and size != index["bytes"]:
            issues.append(ValidationIssue(
                shard_url, "-", f"tar is {size} bytes, index says {index['bytes']} (truncated or appended to)"))
    elif not issues:
        issues.append(ValidationIssue(shard_url, "-", "no shard index (.index.json): bit flips cannot be detected"))
    seen: set[str] = set()
    count = 0
    try:
        for raw in iter_raw_samples(shard_url):
            key = raw["__key__"]
            count += 1
            if key in seen:
                issues.append(ValidationIssue(shard_url, key, "duplicate key in shard (or its members are not contiguous)"))
            seen.add(key)
            digests = expected.get(key) if expected is not None else None
            if expected is not None and digests is None:
                issues.append(ValidationIssue(shard_url, key, "sample not listed in the shard index"))
            try:
                reasons = validate_sample(raw, digests, decode_media=decode_media)
            except Exception as exc:  # noqa: BLE001 - a check that crashes is a finding, not a crash
                reasons = [f"sample check crashed: {type(exc).__name__}: {exc}"]
            for reason in reasons:
                issues.append(ValidationIssue(shard_url, key, reason))
    except FileNotFoundError as exc:
        issues.append(ValidationIssue(shard_url, "-", f"shard not found: {exc}"))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        issues.append(ValidationIssue(shard_url, "-", f"tar is not intact: {type(exc).__name__}: {exc}"))
    if expected is not None:
        for key in expected:
            if key not in seen:
                issues.append(ValidationIssue(shard_url, key, "listed in the shard index but missing from the tar"))
    return count, issues


# --------------------------------------------------------------------------- rewriting
def rewrite_shard(shard_path: str, transform) -> int:
    """Rewrite a local shard in place, sample by sample: ``transform(raw) -> raw`` (members as bytes).

    Written to a temporary file and renamed, so an interrupted rewrite leaves the old shard whole.
    Extra index fields (e.g. the build config) are kept. Returns the number of samples.
    """
    old_index = read_index(shard_path) or {}
    extra = {k: v for k, v in old_index.items() if k not in ("schema_version", "shard", "bytes", "num_samples", "samples")}
    tmp_path = shard_path + ".rewrite.tar"
    writer = StreamingTarWriter(tmp_path, extra)
    count = 0
    try:
        for raw in iter_raw_samples(shard_path):
            raw = transform(raw)
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            meta = json.loads(members["json"].decode("utf-8"))
            writer.write(raw["__key__"], members, meta)
            count += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    os.replace(tmp_path, shard_path)
    os.replace(index_path_for(tmp_path), index_path_for(shard_path))
    index = read_index(shard_path)
    index["shard"] = os.path.basename(shard_path)
    with open(index_path_for(shard_path), "w") as fh:
        json.dump(index, fh, default=_json_default)
    return count


def list_shards(specs: Iterable[str]) -> list[str]:
    """Files, directories (their ``*.tar``) and globs -> shard paths/URLs, sorted, no duplicates."""
    import glob as _glob

    out: list[str] = []
    for spec in specs:
        if "://" in spec:
            out.append(spec)
        elif os.path.isdir(spec):
            out.extend(sorted(_glob.glob(os.path.join(spec, "*.tar"))))
        elif any(ch in spec for ch in "*?["):
            out.extend(sorted(_glob.glob(spec)))
        else:
            out.append(spec)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]
