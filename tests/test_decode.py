"""Probe + single streaming decode on the real samples: CFR resampling, A/V alignment, rotation, bad files."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from emo_data.decode import AudioDecodeStage, ProbeStage, iter_frames
from emo_data.stage import StageError
from emo_data.types import Source

from conftest import sample


def _src(path: str) -> Source:
    return Source(path=str(path), source_id="s")


def test_vfr_source_comes_out_at_constant_25_fps():
    path = sample("video/video-retalking__face_1.mp4")
    probe = ProbeStage()(_src(path))
    assert probe.variable_frame_rate
    frames = list(iter_frames(path, fps=25.0))
    indices = [f.index for f in frames]
    assert indices == list(range(indices[0], indices[0] + len(indices))), "grid has gaps or repeats"
    # 6.13 s of footage starting at 0.033 s -> about 152 frames on a 25 fps grid
    assert abs(len(frames) - 6.1 * 25) <= 2
    # the source has 135 frames: resampling to 25 fps must repeat some, by timestamp
    distinct = len({id(f._frame) for f in frames})
    assert 125 <= distinct <= 135


def test_video_starting_after_audio_keeps_its_timeline():
    path = sample("video/face_recognition__short_hamilton_clip.mp4")
    probe = ProbeStage()(_src(path))
    assert probe.video_start_s == pytest.approx(0.852, abs=0.01)
    audio = AudioDecodeStage()(_src(path))
    assert audio.sample_rate == 16000 and audio.samples.dtype == np.float32
    assert audio.start_s < 0.05
    first = next(iter_frames(path))
    assert first.time_s == pytest.approx(0.852, abs=0.5 / 25)
    # the clip's audio for a frame at time t is taken from the track at t, not at t - video start
    seg = audio.segment(first.time_s, 640)
    offset = int(round((first.time_s - audio.start_s) * 16000))
    assert np.array_equal(seg, audio.samples[offset : offset + 640])


def test_audio_is_16k_mono_and_as_long_as_the_video(samples_dir):
    path = sample("video/sadtalker__WDA_KatieHill_000.mp4")
    audio = AudioDecodeStage()(_src(path))
    assert audio.samples.ndim == 1
    assert audio.duration_s == pytest.approx(8.0, abs=0.05)
    assert np.abs(audio.samples).max() > 0.05  # real speech, not silence


def test_rotation_metadata_is_applied(tmp_path):
    """A landscape stream with a 90-degree display matrix decodes as portrait, turned CCW."""
    path = tmp_path / "rotated.mp4"
    pattern = np.zeros((64, 96, 3), np.uint8)
    pattern[:8, :8] = 255  # a white square in the top-left corner
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        s.set_display_rotation(90)
        for _ in range(5):
            for p in s.encode(av.VideoFrame.from_ndarray(pattern, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frame = next(iter_frames(str(path)))
    assert frame.size == (64, 96)
    assert frame.image.shape == (96, 64, 3)
    # counter-clockwise turn moves the top-left corner to the bottom-left
    assert frame.image[-8:, :8].mean() > 200 and frame.image[:8, :8].mean() < 50
    assert frame.resized(32, 48).shape == (48, 32, 3)


def test_zero_byte_file_is_a_failure_with_reason(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(StageError) as err:
        ProbeStage()(_src(path))
    assert err.value.reason == "empty_file" and str(path) in err.value.message


def test_corrupt_file_is_a_failure_with_reason(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(StageError) as err:
        ProbeStage()(_src(path))
    assert err.value.reason == "unreadable"


def test_truncated_file_fails_or_decodes_only_what_is_there(tmp_path):
    original = sample("video/sadtalker__WDA_KatieHill_000.mp4")
    data = open(original, "rb").read()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(StageError) as err:
        ProbeStage()(_src(path))
        list(iter_frames(str(path)))
        raise StageError("decoded", "truncated file decoded without complaint")
    assert err.value.reason in {"unreadable", "corrupt_video"}


def test_missing_audio_and_missing_video_streams(tmp_path):
    original = sample("video/sadtalker__WDA_KatieHill_000.mp4")
    video_only = tmp_path / "video_only.mp4"
    with av.open(original) as src, av.open(str(video_only), "w") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = out
            dst.mux(packet)
    with pytest.raises(StageError) as err:
        ProbeStage()(_src(video_only))
    assert err.value.reason == "no_audio_stream"
    audio_only = sample("audio/sadtalker__RD_Radio31_000.wav")
    with pytest.raises(StageError) as err:
        ProbeStage()(_src(audio_only))
    assert err.value.reason == "no_video_stream"
