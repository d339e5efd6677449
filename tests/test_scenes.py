"""Scene cuts on the real samples: the Hamilton clip's three cuts, none in single-shot footage."""
from __future__ import annotations

import pytest

from emo_data.decode import iter_frames
from emo_data.scenes import SceneCutDetector

from conftest import sample


def _cuts(path: str) -> list[float]:
    detector = SceneCutDetector()
    return [f.time_s for f in iter_frames(path) if detector.update(f.resized(64, 64))]


def test_cuts_found_in_multi_shot_clip():
    cuts = _cuts(sample("video/face_recognition__short_hamilton_clip.mp4"))
    assert len(cuts) == 3
    for found, expected in zip(cuts, [1.5, 3.6, 7.9]):
        assert found == pytest.approx(expected, abs=0.15)


@pytest.mark.parametrize("rel", ["video/sadtalker__WDA_KatieHill_000.mp4", "video/imageio__cockatoo.mp4", "video/video-retalking__face_1.mp4"])
def test_no_cuts_in_single_shot_footage(rel):
    # the cockatoo clip is handheld: steady camera motion must not read as cuts
    assert _cuts(sample(rel)) == []
