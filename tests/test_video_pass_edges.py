"""The video pass on faces at the frame edge, faces carried across the frame, spurious and real
second faces (issue 11, items 1 and 12), on variants of the real sample footage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from emo_data.config import BuildConfig

import sync_media as media
from conftest import sample as _sample


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pipelines.local import build_corpus

    root = tmp_path_factory.mktemp("edges")
    talk = Path(_sample("video/sadtalker__WDA_KatieHill_000.mp4"))      # face box ~95..405 of 512
    speech = Path(_sample("audio/sadtalker__RD_Radio31_000.wav"))
    import cv2

    big = root / "astronaut_1024.png"   # the portrait at 2x: the face is above the size limit
    cv2.imwrite(str(big), cv2.resize(cv2.imread(_sample("images/imageio__astronaut.png")), (1024, 1024)))
    files = {
        # a 9:16 portrait window whose left border cuts the face
        "edge": media.cropped(talk, root / "edge.mp4", 150, 0, 288, 512),
        # the talking head at half size sliding 1.5 px per frame across a 960 x 540 frame
        "pan": media.panned(talk, root / "pan.mp4", (960, 540), 1.5, scale=0.5),
        # one person, plus a weak detection on the suit (dlib score ~0.03 vs ~1.5)
        "astronaut": media.still_photo_over(big, speech, root / "astronaut.mp4", 5.0),
        # two real people
        "two": media.still_photo_over(Path(_sample("images/face_recognition__two_people.jpg")), speech, root / "two.mp4", 3.0),
    }
    manifest = root / "sources.csv"
    manifest.write_text("path,kind\n" + "".join(f"{p},talk\n" for p in files.values()))
    cfg = BuildConfig()
    cfg.audio_features.enabled = False
    build_corpus(str(manifest), str(root / "out"), cfg, progress=False)
    return pd.read_parquet(root / "out" / "manifest.parquet")


def _rows(rows, source_id):
    return rows[rows.source_id == source_id].sort_values("start_s")


def test_face_cut_by_the_frame_border_gives_clips_not_one_frame_spans(corpus):
    rows = _rows(corpus, "edge")
    clips = rows[rows.status == "clip"]
    assert clips.duration_s.sum() >= 7.0, rows[["status", "start_s", "end_s", "reason", "detail"]]
    assert not (rows.reason == "too_short").any()


def test_face_carried_across_the_frame_starts_new_clips(corpus):
    rows = _rows(corpus, "pan")
    clips = rows[rows.status == "clip"]
    assert len(clips) >= 2 and clips.duration_s.sum() >= 7.5, rows[["status", "start_s", "end_s", "reason"]]
    assert not (rows.reason == "too_short").any()
    # consecutive clips: the next starts where the previous ended (a new crop, no lost frames)
    assert np.allclose(clips.start_s.to_numpy()[1:], clips.end_s.to_numpy()[:-1])


def test_weak_spurious_second_detection_is_not_a_second_person(corpus):
    rows = _rows(corpus, "astronaut")
    assert not (rows.reason == "multi_face").any(), rows[["status", "reason", "detail"]]
    # a still photo over speech: the frozen-face check is what rejects it
    assert (rows.reason == "static_face").any()


def test_two_real_people_stay_multi_face(corpus):
    rows = _rows(corpus, "two")
    assert (rows.reason == "multi_face").sum() >= 1
    assert not (rows.status == "clip").any()
