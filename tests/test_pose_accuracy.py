"""Issue 10's accuracy targets on synthetic motion with exact ground truth, through the build's
own code path (VideoPassStage's tracker and crop, then HeadPoseStage; default config, dlib).

A real photo is rendered as 25 fps H.264 video with known in-plane rotation, pans and zooms.
Rotations run with ~285-px faces (they fill a 512 crop at the default crop scale: smaller than
the issue's 512 px, so stricter and cheaper); pans, zooms and stills with the issue's 512-px
faces, as in the bench's table (with 285-px faces or a zoom as fast as 1.3x in 3 s the p90
comes within 10 % of the 0.1 target: too close for a test). Full table:
``python bench/pose_accuracy.py`` (docs/pose.md).
"""
from __future__ import annotations

import numpy as np
import pytest

from emo_data import pose_synthetic as synth

pytestmark = pytest.mark.skipif(not synth.DEFAULT_PHOTO.is_file(),
                                reason=f"sample photo not found at {synth.DEFAULT_PHOTO}")

FACE_PX = 285.0
FRAME = (640, 640)


@pytest.fixture(scope="module")
def measure(tmp_path_factory):
    portrait = synth.load_portrait()
    workdir = str(tmp_path_factory.mktemp("pose_videos"))
    from emo_data.config import BuildConfig
    from emo_data.faces import make_face_backend

    config = BuildConfig()
    backend = make_face_backend(config.face)
    backend.setup()

    def run(case, face_px=FACE_PX, frame=FRAME):
        return synth.measure_case(portrait, case, workdir, config=config, face_backend=backend,
                                  face_px=face_px, frame_size=frame).summary()
    return run


@pytest.mark.parametrize("rate", [0.1, 1.5])
def test_constant_roll_speed_and_range(measure, rate):
    s = measure(synth.constant_roll(rate, 3.0))
    assert s["frames_lost"] == 0 and s["clips"] == 1
    assert s["err_median"] <= 0.05 and s["err_mean"] <= 0.1        # measured: <= 0.011 / 0.015
    assert abs(s["roll_span"] - s["roll_span_true"]) <= 0.1 * s["roll_span_true"]
    assert s["pose_err_median"] < 5.0  # yaw / pitch stay put while the head only rolls


def test_sweep_to_45_degrees_keeps_the_face(measure):
    """Upright -> +45 -> -45 -> upright at 1.5 deg/frame: the HOG detector alone loses the face
    beyond ~25 degrees (the old tracker lost it); detection and landmarks on an upright crop keep it."""
    s = measure(synth.sweep_roll(45.0, 1.5))
    assert s["frames_lost"] == 0
    assert abs(s["roll_span"] - 90.0) <= 9.0                       # measured: 85.2
    assert s["err_median"] <= 0.05 and s["err_mean"] <= 0.1        # away from the turnarounds


@pytest.mark.parametrize("case", [synth.still(4.0), synth.pan(2.0, 4.0), synth.zoom(1.3, 4.0)],
                         ids=lambda c: c.kind)
def test_no_rotation_reads_as_still(measure, case):
    s = measure(case, 512.0, (1024, 1024))
    assert s["frames_lost"] == 0
    assert s["err_p90"] <= 0.1                                      # measured: <= 0.077 (bench table)
    # the per-frame pose is noisier, the stored smoothed speed is what meets the target
    assert s["raw_err_median"] > s["err_median"]


def test_truth_of_the_cases():
    c = synth.sweep_roll(45.0, 1.5)
    assert c.roll_deg.max() == pytest.approx(45.0, abs=1.5) and c.roll_deg.min() == pytest.approx(-45.0, abs=1e-9)
    np.testing.assert_allclose(c.true_speed, 1.5)
    assert c.steady(7).sum() == c.frames - 2 * 15
    assert synth.pan(2.0, 1.0).true_speed.max() == 0.0
