"""SpeechActivityStage: span logic, silero VAD on real audio, pyannote plumbing.

pyannote tests skip when pyannote.audio is not importable, except with EMO_REQUIRE_PYANNOTE=1
(CI), where they fail instead.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from emo_data.config import SpeechConfig
from emo_data.speech import (
    Span,
    SpeechActivityStage,
    SpeechBackendUnavailable,
    annotation_to_turns,
    postprocess_spans,
    single_speaker_spans,
)
from emo_data.types import AudioTrack

from audio_helpers import decode_audio_16k, make_tiny_pyannote_pipeline, sample_path, set_hf_offline


def _pp(spans, duration=100.0, min_speech=0.25, min_silence=0.6, pad=0.1, blockers=()):
    out = postprocess_spans(
        spans, duration_s=duration, min_speech_s=min_speech, min_silence_s=min_silence, pad_s=pad, blockers=blockers
    )
    return [(round(s.start, 6), round(s.end, 6), s.speaker) for s in out]


# ----------------------------------------------------------------------------- span logic


def test_short_pause_is_bridged_long_pause_is_not():
    spans = [Span(1.0, 2.0), Span(2.5, 3.0), Span(4.0, 5.0)]
    assert _pp(spans, pad=0.0) == [(1.0, 3.0, None), (4.0, 5.0, None)]


def test_short_spans_dropped_after_bridging():
    # 0.1 s blips alone are dropped, but bridged into a neighbour they survive
    spans = [Span(1.0, 1.1), Span(5.0, 5.1), Span(5.3, 6.0)]
    assert _pp(spans, pad=0.0) == [(5.0, 6.0, None)]


def test_padding_clipped_to_track_and_merges():
    spans = [Span(0.05, 1.0), Span(1.65, 2.9)]  # gap 0.65 > min_silence: not bridged
    assert _pp(spans, duration=3.0, pad=0.1) == [(0.0, 1.1, None), (1.55, 3.0, None)]
    # padding makes them touch -> merged
    assert _pp(spans, duration=3.0, pad=0.4) == [(0.0, 3.0, None)]


def test_bridging_and_padding_never_cross_another_speaker():
    turns = [Span(0.0, 2.0, "A"), Span(2.2, 2.4, "B"), Span(2.6, 4.0, "A")]
    singles = single_speaker_spans(turns)
    # without blockers A's 0.6 s pause (< min_silence 0.8) would be bridged
    assert _pp([s for s in singles if s.speaker == "A"], min_silence=0.8, pad=0.0) == [(0.0, 4.0, "A")]
    out = _pp(singles, min_speech=0.1, min_silence=0.8, pad=0.1, blockers=turns)
    # ... but it holds B speaking: not bridged; A's padding stops at B's turn
    assert out == [(0.0, 2.1, "A"), (2.1, 2.5, "B"), (2.5, 4.1, "A")]
    out = _pp(singles, min_speech=0.25, min_silence=0.8, pad=0.1, blockers=turns)
    assert out == [(0.0, 2.1, "A"), (2.5, 4.1, "A")]


def test_single_speaker_spans_removes_overlap():
    turns = [
        Span(0.0, 5.0, "A"),
        Span(4.0, 6.0, "B"),      # overlaps A on [4, 5]
        Span(7.0, 9.0, "A"),
        Span(7.5, 8.0, "C"),      # inside A's second turn
        Span(10.0, 11.0, "B"),
        Span(10.5, 12.0, "B"),    # same speaker overlapping itself: merged, not removed
    ]
    got = [(s.start, s.end, s.speaker) for s in single_speaker_spans(turns)]
    assert got == [
        (0.0, 4.0, "A"),
        (5.0, 6.0, "B"),
        (7.0, 7.5, "A"),
        (8.0, 9.0, "A"),
        (10.0, 12.0, "B"),
    ]
    # no output span overlaps a turn of another speaker
    for s in single_speaker_spans(turns):
        assert not any(t.speaker != s.speaker and t.start < s.end and t.end > s.start for t in turns)


def test_single_speaker_spans_fully_overlapped_turn_vanishes():
    turns = [Span(0.0, 3.0, "A"), Span(0.0, 3.0, "B")]
    assert single_speaker_spans(turns) == []


def test_none_backend_whole_track_in_source_time():
    stage = SpeechActivityStage(SpeechConfig(backend="none"))
    segs = stage(AudioTrack(np.zeros(16000 * 3, np.float32), 16000, 7.25))
    assert [(s.start_s, s.end_s) for s in segs] == [(7.25, 10.25)]


def test_unknown_backend_rejected():
    # the config refuses it when it is made, before any stage is built
    with pytest.raises(ValueError, match="speech.backend must be silero, pyannote or none"):
        SpeechActivityStage(SpeechConfig(backend="webrtc"))


def test_pyannote_without_pipeline_gives_clear_error():
    stage = SpeechActivityStage(SpeechConfig(backend="pyannote"))
    with pytest.raises(SpeechBackendUnavailable, match="pyannote_pipeline"):
        stage.ensure_setup()


def test_pyannote_unloadable_gives_clear_error(tmp_path, monkeypatch):
    """Without pyannote: says what to install; with it: says how to point at a local pipeline."""
    set_hf_offline(monkeypatch)
    stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline=str(tmp_path / "missing")))
    with pytest.raises(SpeechBackendUnavailable) as info:
        stage.ensure_setup()
    msg = str(info.value)
    assert ("pip install" in msg) or ("local" in msg and "config.yaml" in msg), msg


# ----------------------------------------------------------------------------- silero, real audio


@pytest.fixture(scope="module")
def silero():
    stage = SpeechActivityStage(SpeechConfig(backend="silero"))
    stage.ensure_setup()
    return stage


def _coverage(segs, duration):
    return sum(s.end_s - s.start_s for s in segs) / duration


@pytest.mark.parametrize("rel", ["audio/musetalk__eng.wav", "audio/sadtalker__RD_Radio31_000.wav"])
def test_silero_finds_speech(silero, rel):
    x = decode_audio_16k(sample_path(rel))
    duration = len(x) / 16000
    segs = silero(AudioTrack(x, 16000, 0.0))
    assert segs, rel
    assert _coverage(segs, duration) > 0.8, (rel, segs)
    for s in segs:
        assert 0.0 <= s.start_s < s.end_s <= duration + 1e-6
        assert s.end_s - s.start_s >= silero.config.min_speech_s
    gaps = [b.start_s - a.end_s for a, b in zip(segs, segs[1:])]
    assert all(g >= silero.config.min_silence_s - 2 * silero.config.pad_s for g in gaps), gaps


def test_silero_bird_call_is_not_speech(silero):
    x = decode_audio_16k(sample_path("audio/librosa__robin-single-13.hq.ogg"))
    segs = silero(AudioTrack(x, 16000, 0.0))
    assert sum(s.end_s - s.start_s for s in segs) < 0.3, segs


def test_silero_silent_video_audio_has_no_speech(silero):
    x = decode_audio_16k(sample_path("video/imageio__cockatoo.mp4"))
    assert len(x) > 16000 * 10
    assert silero(AudioTrack(x, 16000, 0.0)) == []


def test_silero_start_offset_is_honoured(silero):
    x = decode_audio_16k(sample_path("audio/librosa__198-209-0000.hq.ogg"))
    base = silero(AudioTrack(x, 16000, 0.0))
    shifted = silero(AudioTrack(x, 16000, 12.5))
    assert base
    assert len(base) == len(shifted)
    for a, b in zip(base, shifted):
        assert b.start_s == pytest.approx(a.start_s + 12.5, abs=1e-6)
        assert b.end_s == pytest.approx(a.end_s + 12.5, abs=1e-6)


def test_silero_resamples_other_rates(silero):
    x = decode_audio_16k(sample_path("audio/sadtalker__RD_Radio31_000.wav"))
    x48 = np.repeat(x, 3)  # crude 48 kHz version: same content
    segs = silero(AudioTrack(x48, 48000, 0.0))
    assert _coverage(segs, len(x) / 16000) > 0.8


def test_silero_tiny_input_gives_no_segments(silero):
    assert silero(AudioTrack(np.zeros(100, np.float32), 16000, 3.0)) == []


# ----------------------------------------------------------------------------- pyannote


def _require_pyannote():
    try:
        import pyannote.audio  # noqa: F401
    except Exception as exc:  # ImportError, or OSError from mismatched torchaudio builds
        reason = (
            f"pyannote.audio not importable ({type(exc).__name__}: {exc}); "
            "see docs/diarization.md for an environment that has it"
        )
        if os.environ.get("EMO_REQUIRE_PYANNOTE") == "1":
            pytest.fail("EMO_REQUIRE_PYANNOTE=1 but " + reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def tiny_pyannote_dir(tmp_path_factory):
    _require_pyannote()
    # Seed 1: on the sample below these random weights give one speaker throughout and a second
    # one in 13 pieces, so there are single-speaker stretches to check (seed 0 gave two speakers
    # overlapping everywhere: no single-speaker segment, and the checks below would not run).
    return make_tiny_pyannote_pipeline(tmp_path_factory.mktemp("pyannote_pipeline"), seed=1)


@pytest.mark.pyannote
def test_pyannote_annotation_conversion_and_filtering():
    _require_pyannote()
    from pyannote.core import Annotation, Segment

    ann = Annotation()
    ann[Segment(0.0, 5.0)] = "SPEAKER_00"
    ann[Segment(4.0, 6.0)] = "SPEAKER_01"
    ann[Segment(7.0, 9.0)] = "SPEAKER_00"
    turns = annotation_to_turns(ann)
    assert sorted((t.start, t.end, t.speaker) for t in turns) == [
        (0.0, 5.0, "SPEAKER_00"),
        (4.0, 6.0, "SPEAKER_01"),
        (7.0, 9.0, "SPEAKER_00"),
    ]

    class FakePipeline:  # stands in for a trained pipeline: exercises process() end to end
        def __call__(self, file):
            assert set(file) == {"waveform", "sample_rate"}
            assert tuple(file["waveform"].shape) == (1, 16000 * 10) and file["sample_rate"] == 16000
            return ann

    stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline="unused", pad_s=0.0))
    stage._model = FakePipeline()
    stage._is_setup = True
    segs = stage(AudioTrack(np.zeros(16000 * 10, np.float32), 16000, 100.0))
    assert [(s.start_s, s.end_s, s.speaker) for s in segs] == [
        (100.0, 104.0, "SPEAKER_00"),
        (105.0, 106.0, "SPEAKER_01"),
        (107.0, 109.0, "SPEAKER_00"),
    ]


@pytest.mark.pyannote
def test_pyannote_bogus_hub_id_offline_gives_clear_error(monkeypatch):
    _require_pyannote()
    set_hf_offline(monkeypatch)
    stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline="no-such-org/no-such-pipeline"))
    with pytest.raises(SpeechBackendUnavailable, match="local"):
        stage.ensure_setup()


@pytest.mark.pyannote
def test_pyannote_real_pipeline_random_weights(tiny_pyannote_dir, monkeypatch):
    """Real pyannote classes (PyanNet, WeSpeakerResNet34, VBx) loaded with Pipeline.from_pretrained.

    Random weights give arbitrary speaker turns, so this checks the plumbing: in-memory
    waveform in, labelled single-speaker segments out, in source time, consistent with the raw
    diarization.
    """
    set_hf_offline(monkeypatch)
    from pyannote.audio.pipelines import SpeakerDiarization

    stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline=tiny_pyannote_dir))
    stage.ensure_setup()
    assert isinstance(stage._model, SpeakerDiarization)
    x = decode_audio_16k(sample_path("audio/sadtalker__RD_Radio31_000.wav"))
    duration = len(x) / 16000

    singles, turns = stage.detect(x)
    assert len({t.speaker for t in turns}) >= 2 and singles, (turns, singles)  # something to check below
    for t in turns:
        assert t.speaker and t.speaker.startswith("SPEAKER_")
        assert -1e-3 <= t.start <= t.end <= duration + 1e-3
    assert singles == single_speaker_spans(turns)

    segs = stage(AudioTrack(x, 16000, 30.0))
    expected = postprocess_spans(
        singles,
        duration_s=duration,
        min_speech_s=stage.config.min_speech_s,
        min_silence_s=stage.config.min_silence_s,
        pad_s=stage.config.pad_s,
        blockers=turns,
    )
    assert [(s.start_s, s.end_s, s.speaker) for s in segs] == [(30.0 + e.start, 30.0 + e.end, e.speaker) for e in expected]
    assert segs, "no single-speaker segment came out: the per-segment checks would not run"
    for s in segs:
        assert s.speaker is not None
        a, b = s.start_s - 30.0, s.end_s - 30.0
        assert not any(t.speaker != s.speaker and t.start < b - 1e-9 and t.end > a + 1e-9 for t in turns)


@pytest.mark.pyannote
def test_pyannote_real_pipeline_one_speaker_throughout(tmp_path, monkeypatch):
    """Segmentation head biased to 'speaker#1 alone': the whole track comes out as one speaker."""
    _require_pyannote()
    set_hf_offline(monkeypatch)
    path = make_tiny_pyannote_pipeline(tmp_path / "one_speaker", single_speaker=True)
    stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline=path))
    x = decode_audio_16k(sample_path("audio/sadtalker__RD_Radio31_000.wav"))
    segs = stage(AudioTrack(x, 16000, 5.0))
    assert len({s.speaker for s in segs}) == 1 and segs[0].speaker.startswith("SPEAKER_")
    assert segs[0].start_s >= 5.0 and segs[-1].end_s <= 5.0 + len(x) / 16000 + 1e-6
    assert sum(s.end_s - s.start_s for s in segs) > 0.9 * len(x) / 16000, segs
