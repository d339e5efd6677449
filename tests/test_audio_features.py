"""AudioFeatureStage: wav2vec2 hidden states per video frame, from a tiny local checkpoint."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from emo_data.audio_features import (
    AudioEncoderUnavailable,
    AudioFeatureInput,
    AudioFeatureStage,
    check_audio_encoder,
    resample_frames,
    wav2vec_frame_positions,
)
from emo_data.config import AudioFeatureConfig

from audio_helpers import decode_audio_16k, make_tiny_wav2vec2, sample_path, set_hf_offline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_wav2vec2(tmp_path_factory.mktemp("tiny_w2v"))


@pytest.fixture
def offline(monkeypatch):
    set_hf_offline(monkeypatch)


@pytest.fixture(scope="module")
def speech():
    return decode_audio_16k(sample_path("audio/musetalk__eng.wav"), max_seconds=12.0)


def _stage(encoder, **kw):
    stage = AudioFeatureStage(AudioFeatureConfig(encoder=encoder, **kw))
    stage.ensure_setup()
    return stage


@pytest.mark.parametrize("seconds,fps,frames", [(2.0, 25.0, 50), (2.04, 25.0, 51), (10.0, 25.0, 250), (2.0, 29.97, 60)])
def test_shape_dtype_and_exact_frame_count(tiny_dir, offline, speech, seconds, fps, frames):
    stage = _stage(tiny_dir)
    assert (stage.num_layers, stage.dim) == (3, 32)  # 2 transformer layers + CNN projection
    assert stage.model_id == tiny_dir
    x = speech[: int(round(frames * 16000 / fps))]
    out = stage(AudioFeatureInput(x, frames, fps))
    assert out.shape == (frames, 3, 32)
    assert out.dtype == np.float16
    assert np.all(np.isfinite(out))
    assert float(np.abs(out).max()) > 0


def test_matches_reference_computation(tiny_dir, offline, speech):
    """Same numbers as feature extractor -> model(output_hidden_states) -> interpolation."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    x = speech[:32640]  # 2.04 s
    fe = Wav2Vec2FeatureExtractor.from_pretrained(tiny_dir)
    model = Wav2Vec2Model.from_pretrained(tiny_dir).eval()
    inputs = fe(x, sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        hs = model(inputs.input_values, output_hidden_states=True).hidden_states
    ref = torch.stack([h[0] for h in hs], dim=1).numpy()  # [F, L, D]
    assert ref.shape[0] == 101  # (32640 - 400) // 320 + 1
    expected = resample_frames(ref, 51, 25.0)
    got = _stage(tiny_dir)(AudioFeatureInput(x, 51, 25.0))
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_interpolation_is_time_aligned():
    # a feature equal to its own wav2vec frame index: the result is the index at each frame centre
    num_src = 100
    feats = np.repeat(np.arange(num_src, dtype=np.float32)[:, None], 4, axis=1)
    out = resample_frames(feats, 50, 25.0)
    centres = (np.arange(50) + 0.5) / 25.0
    expected = np.clip((centres * 16000 - 200) / 320, 0, num_src - 1)
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-5)
    np.testing.assert_allclose(wav2vec_frame_positions(50, 25.0, num_src), expected, atol=1e-9)
    # monotone, clamped at both ends
    pos = wav2vec_frame_positions(300, 25.0, 100)
    assert pos[0] >= 0 and pos[-1] == 99 and np.all(np.diff(pos) >= 0)


def test_layer_selection(tiny_dir, offline, speech):
    x = speech[:32000]
    full = _stage(tiny_dir)(AudioFeatureInput(x, 50, 25.0))
    stage = _stage(tiny_dir, layers=[0, -1])
    assert stage.layers == [0, 2] and stage.num_layers == 2
    sel = stage(AudioFeatureInput(x, 50, 25.0))
    assert sel.shape == (50, 2, 32)
    np.testing.assert_array_equal(sel[:, 0], full[:, 0])
    np.testing.assert_array_equal(sel[:, 1], full[:, 2])
    with pytest.raises(ValueError, match="hidden states"):
        _stage(tiny_dir, layers=[3])


def test_float32_output(tiny_dir, offline, speech):
    out = _stage(tiny_dir, dtype="float32")(AudioFeatureInput(speech[:16000], 25, 25.0))
    assert out.dtype == np.float32 and out.shape == (25, 3, 32)


def test_normalisation_follows_preprocessor_config(tmp_path, offline, speech):
    x = speech[:32000]
    path = make_tiny_wav2vec2(tmp_path / "w2v")
    norm = _stage(path)
    assert norm.do_normalize
    a = norm(AudioFeatureInput(x, 50, 25.0)).astype(np.float32)
    b = norm(AudioFeatureInput(4.0 * x + 0.01, 50, 25.0)).astype(np.float32)
    np.testing.assert_allclose(a, b, atol=5e-3)  # zero-mean unit-var per clip: gain/offset invariant

    cfg_path = os.path.join(path, "preprocessor_config.json")
    cfg = json.load(open(cfg_path))
    cfg["do_normalize"] = False
    json.dump(cfg, open(cfg_path, "w"))
    raw = _stage(path)
    assert not raw.do_normalize
    c = raw(AudioFeatureInput(4.0 * x + 0.01, 50, 25.0)).astype(np.float32)
    assert np.abs(c - a).max() > 1e-2

    os.remove(cfg_path)  # no preprocessor config at all: normalise (the wav2vec2 default)
    assert _stage(path).do_normalize


def test_short_and_bad_input(tiny_dir, offline):
    stage = _stage(tiny_dir)
    out = stage(AudioFeatureInput(np.zeros(200, np.float32), 1, 25.0))  # < one wav2vec window
    assert out.shape == (1, 3, 32)
    from emo_data.stage import StageError

    with pytest.raises(StageError):
        stage(AudioFeatureInput(np.zeros(0, np.float32), 5, 25.0))
    with pytest.raises(StageError):
        stage(AudioFeatureInput(np.full(1600, np.nan, np.float32), 5, 25.0))
    with pytest.raises(StageError):
        stage(AudioFeatureInput(np.zeros(1600, np.float32), 5, 25.0, sample_rate=8000))


def test_check_audio_encoder(tiny_dir, offline):
    meta = check_audio_encoder(AudioFeatureConfig(encoder=tiny_dir))
    assert meta["num_layers"] == 3 and meta["dim"] == 32 and meta["model_id"] == tiny_dir
    assert check_audio_encoder(AudioFeatureConfig(encoder="/nonexistent", enabled=False)) is None


@pytest.mark.parametrize("encoder", ["/nonexistent/wav2vec2-dir", "no-such-org/no-such-wav2vec2"])
def test_unavailable_encoder_gives_clear_error(offline, encoder):
    t0 = time.perf_counter()
    with pytest.raises(AudioEncoderUnavailable) as info:
        check_audio_encoder(AudioFeatureConfig(encoder=encoder))
    msg = str(info.value)
    assert encoder in msg
    assert "offline" in msg
    assert "--audio-encoder /path/to/local/wav2vec2" in msg and "--no-audio-features" in msg
    assert time.perf_counter() - t0 < 20  # fails fast, no network retries
    with pytest.raises(AudioEncoderUnavailable):
        AudioFeatureStage(AudioFeatureConfig(encoder=encoder)).ensure_setup()
