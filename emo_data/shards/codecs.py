"""Member codecs: .npy (never pickle), PCM16 wav, PNG, and the one H.264 writer.

Every mp4 the project writes (shard clips, the sync gate's trimmed clips, ``emo-sample`` /
``emo-eval`` / validation videos, overlay renders, test footage) goes through :func:`encode_mp4`,
with libx264 settings chosen so that the same frames give the same bytes.
"""
from __future__ import annotations

import io
import json
import wave
from fractions import Fraction
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from .contract import (
    DEFAULT_FPS,
    MEMBER_SPECS,
    SAMPLE_RATE,
    UNSAFE_EXTENSIONS,
    SampleMeta,
)


def json_default(obj: Any):
    """numpy values in metadata -> their Python value (json.dumps ``default``)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------- arrays, audio, images
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


# --------------------------------------------------------------------------- video
# Deterministic libx264 (same frames -> same bytes, so a re-run or --seed reproduces the file):
# measured, libx264 with its default threads / lookahead / mb-tree gave a different bitstream for
# identical frames in 3 of 1200 encodes (and in 2 of ~10 CLI runs inside a process that had just
# run torch); with threads=1, no mb-tree, no lookahead and no B-frames 0 of 70 CLI runs differed.
# Re-measured: one thread alone (or with lookahead-threads=1) still gave 2-5 different bitstreams in
# 8-30 encodes of a smooth synthetic gradient in one process; mb-tree off is what makes it repeat
# (120 of 120), and mb-tree is also what the +25-45 % file size pays for. Same bytes wins.
# On 512 x 512 clips it encodes as fast as the defaults on 2 cores.
X264_DETERMINISTIC = {"threads": "1", "x264-params": "mbtree=0:rc-lookahead=0:bframes=0"}


def encode_mp4(frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS, crf: int = 18, preset: str = "veryfast",
               audio: Optional[np.ndarray] = None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """RGB uint8 frames (+ float32 mono audio -> AAC) -> H.264 yuv420p mp4 bytes.

    Every frame is kept at a constant ``fps``; frames are streamed (one in memory at a time).
    An odd width or height is padded to even by repeating the edge (yuv420p needs even sides).
    """
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = astream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height = w + (w % 2), h + (h % 2)
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset, **X264_DETERMINISTIC}
                if audio is not None:  # every stream exists before the first packet is muxed
                    astream = container.add_stream("aac", rate=sample_rate)
                    astream.layout = "mono"
            if frame.shape[0] != stream.height or frame.shape[1] != stream.width:
                frame = np.pad(frame, ((0, stream.height - frame.shape[0]), (0, stream.width - frame.shape[1]), (0, 0)),
                               mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("encode_mp4: no frames")
        for packet in stream.encode():
            container.mux(packet)
        if astream is not None and audio is not None:
            _mux_aac(container, astream, audio, sample_rate)
    return buf.getvalue()


def _mux_aac(container, astream, audio: np.ndarray, sample_rate: int) -> None:
    import av

    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    step = 1024 * 16
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        af = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        af.sample_rate = sample_rate
        af.pts = start
        af.time_base = Fraction(1, sample_rate)
        for packet in astream.encode(af):
            container.mux(packet)
    for packet in astream.encode():
        container.mux(packet)


def write_mp4(path: str, frames: Iterable[np.ndarray], fps: float = DEFAULT_FPS, audio: Optional[np.ndarray] = None,
              sample_rate: int = SAMPLE_RATE, crf: int = 18, preset: str = "veryfast") -> None:
    """:func:`encode_mp4` to a file (videos people watch: ``emo-sample``, ``emo-eval``, renders)."""
    data = encode_mp4(frames, fps, crf=crf, preset=preset, audio=audio, sample_rate=sample_rate)
    with open(str(path), "wb") as fh:
        fh.write(data)


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


# --------------------------------------------------------------------------- whole samples
def _npy_member(name: str, array: np.ndarray) -> bytes:
    return npy_bytes(np.asarray(array).astype(np.dtype(MEMBER_SPECS[name].dtype)))


def encode_sample(sample) -> dict[str, bytes]:
    """A :class:`emo_data.types.ClipSample` -> {member: bytes}, arrays in the contract's dtypes."""
    meta = sample.meta
    members = {
        "mp4": sample.mp4,
        "wav": sample.wav,
        "face_mask.png": png_bytes(sample.face_mask),
        "face_boxes.npy": _npy_member("face_boxes.npy", sample.face_boxes),
        "landmarks.npy": _npy_member("landmarks.npy", sample.landmarks),
        "head_pose.npy": _npy_member("head_pose.npy", sample.head_pose),
        "head_speed.npy": _npy_member("head_speed.npy", sample.head_speed),
        "speed_buckets.npy": _npy_member("speed_buckets.npy", sample.speed_buckets),
        "identity_emb.npy": _npy_member("identity_emb.npy", sample.identity_emb),
        "json": meta.to_json() if isinstance(meta, SampleMeta) else SampleMeta.from_dict(meta).to_json(),
    }
    if sample.audio_emb is not None:
        members["audio_emb.npy"] = _npy_member("audio_emb.npy", sample.audio_emb)
    if getattr(sample, "head_pose_raw", None) is not None:
        members["head_pose_raw.npy"] = _npy_member("head_pose_raw.npy", sample.head_pose_raw)
    return members


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


def decode_sample(raw: Mapping[str, Any], decode_video: bool = False) -> dict[str, Any]:
    """A raw WebDataset sample ({'__key__', member: bytes}) -> decoded arrays.

    Use as ``webdataset.WebDataset(urls).map(decode_sample)``; ``mp4`` stays bytes unless
    ``decode_video`` (decode on the training worker when you need the frames). ``json`` becomes
    a plain dict; ``SampleMeta.from_dict`` types it.
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("__"):
            out[name] = value
        else:
            out[name] = decode_member(name, value, decode_video=decode_video)
    return out
