"""Probe and decode a source exactly once, streaming.

Audio (cheap: 64 KB per second at 16 kHz float32) is decoded whole so speech activity can be
known before the video pass; video frames are streamed on a constant frame-rate grid and never
held together. Times are seconds on the container's timeline, so audio and video stay aligned
when their streams start at different times.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np

from .config import DecodeConfig
from .stage import Stage, StageError
from .types import AudioTrack, ProbeInfo, Source


class DecodedFrame:
    """One output frame. Pixels are converted lazily: ``image`` (full size RGB) only when a stage
    needs it, ``resized`` through FFmpeg's scaler straight from the decoded YUV planes, which is
    far cheaper than converting the full frame and shrinking it afterwards."""

    __slots__ = ("index", "time_s", "_frame", "_rotation", "_image", "_resized")

    def __init__(self, index: int, time_s: float, frame, rotation: int):
        self.index = index          # position on the output grid: time = index / fps
        self.time_s = time_s
        self._frame = frame
        self._rotation = rotation
        self._image: Optional[np.ndarray] = None
        self._resized: dict = {}

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in display orientation."""
        w, h = self._frame.width, self._frame.height
        return (h, w) if self._rotation % 180 else (w, h)

    @property
    def image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB, display orientation (rotation applied)."""
        if self._image is None:
            self._image = _rotate(self._frame.to_ndarray(format="rgb24"), self._rotation)
        return self._image

    def resized(self, width: int, height: int) -> np.ndarray:
        """RGB at (width, height) in display orientation, scaled by FFmpeg (area averaging)."""
        key = (width, height)
        if key not in self._resized:
            w, h = (height, width) if self._rotation % 180 else (width, height)
            small = self._frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
            self._resized[key] = _rotate(small, self._rotation)
        return self._resized[key]


def _open(path: str):
    import av

    try:
        if "://" in path:
            import fsspec

            return av.open(fsspec.open(path, "rb").open())
        return av.open(path)
    except FileNotFoundError as exc:
        raise StageError("missing_file", f"{path}: file not found") from exc
    except av.error.FFmpegError as exc:
        raise StageError("unreadable", f"{path}: not a readable media file ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - anything else PyAV raises on a broken file
        raise StageError("unreadable", f"{path}: {type(exc).__name__}: {exc}") from exc


def _stream_start(stream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def select_audio_stream(container, source: Source):
    """The stream that holds the voice: ``source.audio_stream`` (an index among the file's audio
    streams) when the manifest names one, else the stream flagged *default* (players pick that
    one: with a silent or music stream first and the speech second, the speech is the default),
    else the first. None when the file has no audio stream."""
    import av

    streams = list(container.streams.audio)
    if not streams:
        return None
    if source.audio_stream is not None:
        if not 0 <= source.audio_stream < len(streams):
            raise StageError("no_audio_stream", f"{source.path}: the manifest asks for audio_stream "
                             f"{source.audio_stream}, the file has {len(streams)} audio stream(s) (0-based)")
        return streams[source.audio_stream]
    for stream in streams:
        if stream.disposition & av.stream.Disposition.default:
            return stream
    return streams[0]


class ProbeStage(Stage[Source, ProbeInfo]):
    """Source -> stream facts. Raises StageError for files that cannot become training data."""

    name = "probe"

    def process(self, source: Source) -> ProbeInfo:
        import os

        if "://" not in source.path:
            if not os.path.exists(source.path):
                raise StageError("missing_file", f"{source.path}: file not found")
            if os.path.getsize(source.path) == 0:
                raise StageError("empty_file", f"{source.path}: zero bytes")
        with _open(source.path) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = select_audio_stream(container, source)
            duration = float(container.duration / 1_000_000) if container.duration else 0.0
            info = ProbeInfo(path=source.path, duration_s=duration, has_video=video is not None, has_audio=audio is not None)
            if video is not None:
                info.width = video.codec_context.width
                info.height = video.codec_context.height
                info.avg_fps = float(video.average_rate) if video.average_rate else 0.0
                info.video_start_s = _stream_start(video)
                info.video_codec = video.codec_context.name
                guessed = float(video.guessed_rate) if video.guessed_rate else info.avg_fps
                info.variable_frame_rate = bool(info.avg_fps and guessed and abs(guessed - info.avg_fps) > 0.01 * guessed)
            if audio is not None:
                info.audio_sample_rate = audio.codec_context.sample_rate
                info.audio_channels = audio.codec_context.channels
                info.audio_start_s = _stream_start(audio)
                info.audio_codec = audio.codec_context.name
        if not info.has_video:
            raise StageError("no_video_stream", f"{source.path}: no video stream")
        if not info.has_audio:
            raise StageError("no_audio_stream", f"{source.path}: no audio stream (EMO needs the voice track)")
        if info.width <= 0 or info.height <= 0:
            raise StageError("unreadable", f"{source.path}: video stream has no frame size")
        return info


class AudioDecodeStage(Stage[Source, AudioTrack]):
    """Source -> 16 kHz mono float32 track with its start time on the source timeline."""

    name = "audio_decode"

    def __init__(self, config: Optional[DecodeConfig] = None):
        super().__init__()
        self.config = config or DecodeConfig()

    def process(self, source: Source) -> AudioTrack:
        import av

        rate = self.config.audio_sample_rate
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        start_s: Optional[float] = None
        with _open(source.path) as container:
            stream = select_audio_stream(container, source)
            if stream is None:
                raise StageError("no_audio_stream", f"{source.path}: no audio stream")
            # One buffer sized from the header and grown if the header was short: the track is
            # held once (64 KB per second), not as chunks plus a concatenated copy.
            duration = float(container.duration or 0) / 1e6
            buffer = _GrowingBuffer(int(duration * rate) + rate)
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        if start_s is None:
                            start_s = float(frame.time) if frame.time is not None else _stream_start(stream)
                        for out in resampler.resample(frame):
                            buffer.append(out.to_ndarray().reshape(-1))
                for out in resampler.resample(None):
                    buffer.append(out.to_ndarray().reshape(-1))
            except av.error.FFmpegError as exc:
                raise StageError("corrupt_audio", f"{source.path}: audio decoding failed: {exc}") from exc
        samples = buffer.array()
        if samples.size == 0:
            raise StageError("no_audio_stream", f"{source.path}: audio stream holds no decodable samples")
        return AudioTrack(samples=samples, sample_rate=rate, start_s=start_s or 0.0)


class _GrowingBuffer:
    """A float32 array filled in place, doubled when full; ``array()`` returns the filled part."""

    def __init__(self, capacity: int):
        self._data = np.empty(max(int(capacity), 1024), np.float32)
        self._size = 0

    def append(self, chunk: np.ndarray) -> None:
        end = self._size + len(chunk)
        if end > len(self._data):
            grown = np.empty(max(end, 2 * len(self._data)), np.float32)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : end] = chunk
        self._size = end

    def array(self) -> np.ndarray:
        if self._size < len(self._data) // 2:  # header overestimated: do not keep the slack
            return self._data[: self._size].copy()
        return self._data[: self._size]


def _rotate(image: np.ndarray, rotation: int) -> np.ndarray:
    # PyAV's frame.rotation is the counter-clockwise angle the display applies; np.rot90 is CCW too.
    k = int(round(rotation / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(image, k)) if k else image


def iter_frames(path: str, fps: float = 25.0, threads: int = 0) -> Iterator[DecodedFrame]:
    """Stream a video resampled by timestamp to a constant ``fps`` grid (nearest source frame).

    Variable frame-rate sources come out at exactly ``fps``; frame ``index`` is shown at
    ``index / fps`` seconds on the source timeline. Only the frames that are emitted are
    converted to RGB. Decoding errors part-way raise StageError('corrupt_video').
    """
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise StageError("no_video_stream", f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.thread_count = threads
        fallback_duration = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps

        prev = None          # (time, av frame)
        prev_out: Optional[DecodedFrame] = None  # shares conversions when a frame is repeated
        next_index: Optional[int] = None
        emitted = 0

        def emit(index: int) -> DecodedFrame:
            nonlocal prev_out
            if prev_out is None or prev_out._frame is not prev[1]:
                prev_out = DecodedFrame(index, index / fps, prev[1], prev[1].rotation or 0)
                return prev_out
            repeat = DecodedFrame(index, index / fps, prev[1], prev_out._rotation)
            repeat._image, repeat._resized = prev_out._image, prev_out._resized
            return repeat

        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time)
                if prev is None:
                    prev = (t, frame)
                    next_index = int(round(t * fps))
                    continue
                if t <= prev[0]:
                    continue  # out-of-order or duplicate timestamp
                midpoint = 0.5 * (prev[0] + t)
                while next_index / fps < midpoint:
                    yield emit(next_index)
                    emitted += 1
                    next_index += 1
                prev = (t, frame)
        except av.error.FFmpegError as exc:
            raise StageError("corrupt_video", f"{path}: video decoding failed after {emitted} frames: {exc}") from exc
        if prev is None:
            raise StageError("corrupt_video", f"{path}: video stream holds no decodable frames")
        last_duration = float(prev[1].duration * prev[1].time_base) if prev[1].duration and prev[1].time_base else fallback_duration
        end = prev[0] + 0.5 * last_duration
        while next_index / fps < end - 1e-9:
            yield emit(next_index)
            next_index += 1


def expected_frame_count(duration_s: float, fps: float) -> int:
    return int(math.floor(duration_s * fps + 0.5))


def work_estimate(path: str, probe: bool = True) -> float:
    """Rough work estimate for longest-first scheduling: seconds x sqrt(pixels / 512^2) from the
    container header (decode cost grows with resolution), else the file size."""
    import os

    if probe and "://" not in path:
        try:
            import av

            with av.open(path) as c:
                v = c.streams.video[0]
                seconds = float(c.duration or 0) / 1e6
                return seconds * max(1.0, (v.codec_context.width * v.codec_context.height) / 512.0 ** 2) ** 0.5 * 1e9
        except Exception:  # noqa: BLE001 - ordering only; the probe stage reports bad files
            pass
    try:
        return float(os.path.getsize(path))
    except OSError:
        return 0.0
