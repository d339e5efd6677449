"""The pure frame-run segmenter of the video pass (emo_data/segmenter.py)."""
import pytest

from emo_data.segmenter import ClipClosed, ClipOpened, ClipSegmenter, FramesRejected


def run(seg: ClipSegmenter, verdicts, cuts=()):
    """verdicts: list of (reason, fits, usable) per frame index; returns events and joined frames."""
    events, joined = [], []
    for i, (reason, fits, usable) in enumerate(verdicts):
        if i in cuts:
            events += seg.cut()
        ev, joins = seg.frame(i, reason, fits=fits, usable=usable)
        events += ev
        if joins:
            joined.append(i)
    events += seg.finish()
    return events, joined


def good(n):
    return [(None, True, True)] * n


def bad(reason, n, usable=False):
    return [(reason, True, usable)] * n


def spans(events):
    return [(type(e).__name__, getattr(e, "reason", getattr(e, "ended_by", None)), getattr(e, "first", getattr(e, "index", None)),
             getattr(e, "last", None)) for e in events]


def test_good_run_becomes_one_clip_and_bad_runs_spans():
    seg = ClipSegmenter(min_frames=5, max_frames=100)
    events, _ = run(seg, bad("no_face", 3) + good(10) + bad("no_speech", 4))
    assert spans(events) == [
        ("FramesRejected", "no_face", 0, 2),   # flushed when the clip opens
        ("ClipOpened", None, 3, None),
        ("ClipClosed", "no_speech", 3, 12),
        ("FramesRejected", "no_speech", 13, 16),
    ]


def test_short_run_is_too_short_with_what_ended_it():
    seg = ClipSegmenter(min_frames=5, max_frames=100)
    events, _ = run(seg, good(3) + bad("multi_face", 2))
    rejected = [e for e in events if isinstance(e, FramesRejected)]
    assert rejected[0].reason == "too_short" and (rejected[0].first, rejected[0].last) == (0, 2)
    assert "ended by multi_face" in rejected[0].detail
    assert not any(isinstance(e, ClipClosed) for e in events)


def test_max_length_splits_and_next_clip_starts_on_the_same_frame():
    seg = ClipSegmenter(min_frames=3, max_frames=10)
    events, joined = run(seg, good(25))
    closed = [e for e in events if isinstance(e, ClipClosed)]
    assert [(e.first, e.last, e.ended_by) for e in closed] == [(0, 9, "max_length"), (10, 19, "max_length"), (20, 24, "end_of_video")]
    assert joined == list(range(25))


def test_face_leaving_the_crop_region_starts_a_new_clip_not_one_frame_spans():
    # A face drifting across the frame: every 30 frames it leaves the open clip's region.
    seg = ClipSegmenter(min_frames=10, max_frames=250)
    verdicts = [(None, i % 30 != 0 or i == 0, True) for i in range(120)]
    events, _ = run(seg, verdicts)
    closed = [e for e in events if isinstance(e, ClipClosed)]
    assert [(e.first, e.last) for e in closed] == [(0, 29), (30, 59), (60, 89), (90, 119)]
    assert all(e.ended_by in ("face_left_crop", "end_of_video") for e in closed)
    assert not [e for e in events if isinstance(e, FramesRejected)]


def test_short_bridgeable_gap_stays_in_the_clip():
    seg = ClipSegmenter(min_frames=5, max_frames=100, max_gap=3, bridgeable=("face_too_small", "no_speech"))
    events, joined = run(seg, good(10) + bad("face_too_small", 2, usable=True) + good(10))
    closed = [e for e in events if isinstance(e, ClipClosed)]
    assert [(e.first, e.last) for e in closed] == [(0, 21)]
    assert joined == list(range(22))


def test_gap_longer_than_allowed_or_unbridgeable_cuts_the_clip():
    seg = ClipSegmenter(min_frames=5, max_frames=100, max_gap=3, bridgeable=("face_too_small",))
    events, _ = run(seg, good(10) + bad("face_too_small", 4, usable=True) + good(10))
    closed = [(e.first, e.last, e.ended_by) for e in events if isinstance(e, ClipClosed)]
    assert closed == [(0, 9, "face_too_small"), (14, 23, "end_of_video")]
    assert ("FramesRejected", "face_too_small", 10, 13) in spans(events)

    seg = ClipSegmenter(min_frames=5, max_frames=100, max_gap=3, bridgeable=("face_too_small",))
    events, _ = run(seg, good(10) + bad("no_face", 1) + good(10))
    assert [(e.first, e.last) for e in events if isinstance(e, ClipClosed)] == [(0, 9), (11, 20)]


def test_gap_at_the_end_is_not_kept():
    seg = ClipSegmenter(min_frames=5, max_frames=100, max_gap=3, bridgeable=("no_speech",))
    events, _ = run(seg, good(10) + bad("no_speech", 2, usable=True))
    assert [(e.first, e.last) for e in events if isinstance(e, ClipClosed)] == [(0, 9)]
    assert ("FramesRejected", "no_speech", 10, 11) in spans(events)


def test_scene_cut_closes_the_clip():
    seg = ClipSegmenter(min_frames=5, max_frames=100)
    events, _ = run(seg, good(20), cuts=(12,))
    assert [(e.first, e.last, e.ended_by) for e in events if isinstance(e, ClipClosed)] == [
        (0, 11, "scene_cut"), (12, 19, "end_of_video")]
    assert sum(isinstance(e, ClipOpened) for e in events) == 2


def test_every_frame_is_accounted_for_once():
    import random

    rng = random.Random(7)
    reasons = [None, None, None, "no_face", "no_speech", "face_too_small", "multi_face"]
    verdicts = []
    for _ in range(400):
        r = rng.choice(reasons)
        verdicts.append((r, rng.random() > 0.02, r in (None, "no_speech", "face_too_small")))
    seg = ClipSegmenter(min_frames=8, max_frames=60, max_gap=2, bridgeable=("no_speech", "face_too_small"))
    events, _ = run(seg, verdicts)
    covered = []
    for e in events:
        if isinstance(e, (ClipClosed, FramesRejected)):
            covered += list(range(e.first, e.last + 1))
    assert sorted(covered) == list(range(400))


def test_bad_arguments():
    with pytest.raises(ValueError):
        ClipSegmenter(min_frames=0, max_frames=10)
    with pytest.raises(ValueError):
        ClipSegmenter(min_frames=11, max_frames=10)
