"""Variants of the real sample footage for the lip-sync gate's tests and benchmark.

Everything is generated from ``../shared/samples`` into a temporary folder: the same talking
head with its voice shifted, another speaker's voice, a still photo or a frozen frame over
speech. Video is re-encoded (H.264, 25 fps) and audio written as 16 kHz mono AAC with
:func:`emo_data.shards.write_mp4`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from emo_data.decode import AudioDecodeStage, iter_frames
from emo_data.shards import write_mp4
from emo_data.types import Source

SR = 16000
FPS = 25.0


def read_audio(path: str | Path) -> np.ndarray:
    """16 kHz mono float32, aligned to the file's timeline (leading silence for a late start)."""
    track = AudioDecodeStage()(Source(path=str(path), source_id="x"))
    lead = int(round(track.start_s * SR))
    return np.concatenate([np.zeros(max(lead, 0), np.float32), track.samples])


def read_frames(path: str | Path, max_frames: Optional[int] = None) -> list[np.ndarray]:
    frames = []
    for frame in iter_frames(str(path), fps=FPS):
        frames.append(frame.image)
        if max_frames and len(frames) >= max_frames:
            break
    return frames


def shift_audio(audio: np.ndarray, seconds: float) -> np.ndarray:
    """The same length; ``seconds > 0`` makes the voice late (silence first), < 0 early."""
    n = int(round(abs(seconds) * SR))
    if n == 0:
        return audio.copy()
    pad = np.zeros(n, np.float32)
    if seconds > 0:
        return np.concatenate([pad, audio[:-n]])
    return np.concatenate([audio[n:], pad])


def fit_length(audio: np.ndarray, num_frames: int) -> np.ndarray:
    need = int(round(num_frames * SR / FPS))
    if len(audio) >= need:
        return audio[:need]
    return np.concatenate([audio, np.zeros(need - len(audio), np.float32)])


def write_video(path: Path, frames: list[np.ndarray], audio: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(str(path), frames, fps=FPS, audio=fit_length(audio, len(frames)), sample_rate=SR)
    return path


def with_voice_shifted(video: Path, out: Path, seconds: float) -> Path:
    """``video``'s frames with its own voice ``seconds`` late (> 0) or early (< 0)."""
    frames = read_frames(video)
    return write_video(out, frames, shift_audio(read_audio(video), seconds))


def with_voice_of(video: Path, voice_from: Path, out: Path, start_s: float = 0.0) -> Path:
    """``video``'s frames with another recording's voice (a dubbed / voice-over clip)."""
    frames = read_frames(video)
    voice = read_audio(voice_from)[int(round(start_s * SR)):]
    return write_video(out, frames, voice)


def still_photo_over(image: Path, voice_from: Path, out: Path, seconds: float = 8.0) -> Path:
    """One photo held for ``seconds`` over a speech track (a still face 'talking')."""
    import cv2

    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    h, w = rgb.shape[:2]
    rgb = rgb[: h - h % 2, : w - w % 2]
    frames = [rgb] * int(round(seconds * FPS))
    return write_video(out, frames, read_audio(voice_from))


def frozen_after(video: Path, out: Path, freeze_at_frame: int) -> Path:
    """``video`` whose picture freezes at ``freeze_at_frame`` while its voice goes on."""
    frames = read_frames(video)
    held = frames[:freeze_at_frame] + [frames[freeze_at_frame]] * (len(frames) - freeze_at_frame)
    return write_video(out, held, read_audio(video))


def cropped(video: Path, out: Path, x0: int, y0: int, width: int, height: int) -> Path:
    """``video`` cut to a window (e.g. a portrait crop whose border cuts the face)."""
    frames = [f[y0:y0 + height, x0:x0 + width] for f in read_frames(video)]
    return write_video(out, frames, read_audio(video))


def panned(video: Path, out: Path, canvas: tuple[int, int], px_per_frame: float, scale: float = 1.0) -> Path:
    """``video`` (optionally scaled) sliding across a larger grey canvas (width, height) at a
    constant speed: a camera pan that carries the face across the frame."""
    import cv2

    frames = read_frames(video)
    W, H = canvas
    out_frames = []
    for i, f in enumerate(frames):
        if scale != 1.0:
            f = cv2.resize(f, (int(f.shape[1] * scale) // 2 * 2, int(f.shape[0] * scale) // 2 * 2), interpolation=cv2.INTER_AREA)
        h, w = f.shape[:2]
        x = int(round(i * px_per_frame))
        page = np.full((H, W, 3), 96, np.uint8)
        x0, x1 = max(x, 0), min(x + w, W)
        if x1 > x0:
            page[(H - h) // 2:(H - h) // 2 + h, x0:x1] = f[:, x0 - x:x1 - x]
        out_frames.append(page)
    return write_video(out, out_frames, read_audio(video))
