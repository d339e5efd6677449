"""EMOPipeline and emo-sample with a tiny random model saved and loaded the real way."""
import os
import wave

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from emo_model.media import load_audio, write_mp4
from emo_model.pipeline import EMOPipeline, num_video_frames, resample_to_frames

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync cost on a busy 2-core box

from conftest import SAMPLES  # noqa: E402 - ../shared/samples or $EMO_SAMPLES_DIR

SPEECH = str(SAMPLES / "audio" / "librosa__198-209-0000.hq.ogg")  # 13.9 s of speech
PORTRAIT = str(SAMPLES / "images" / "face_recognition__obama.jpg")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from emo_model.cli import main

    d = tmp_path_factory.mktemp("tiny") / "emo-tiny"
    assert main(["--make-tiny-model", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def pipe(model_dir):
    p = EMOPipeline.from_pretrained(str(model_dir))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def speech():
    """Real speech if the shared samples exist, else a synthetic voiced signal (13.9 s)."""
    if os.path.exists(SPEECH):
        return load_audio(SPEECH)
    t = np.arange(int(13.9 * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)


@pytest.fixture(scope="module")
def portrait():
    if os.path.exists(PORTRAIT):
        return PORTRAIT
    rng = np.random.default_rng(0)
    return (rng.random((96, 80, 3)) * 255).astype(np.uint8)


def test_saved_layout(model_dir):
    names = sorted(os.listdir(model_dir))
    assert names == ["audio_encoder", "emo", "feature_extractor", "model_index.json", "scheduler", "vae"]
    for sub in ("emo", "vae", "audio_encoder"):
        files = os.listdir(model_dir / sub)
        assert any(f.endswith(".safetensors") for f in files), sub
        assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pkl")) for f in files), sub


def test_frame_alignment_matches_data_side():
    h = torch.randn(100, 3, 8)
    ours = resample_to_frames(h, 40, 25.0).numpy()
    data_side = pytest.importorskip("emo_data.audio_features", reason="data side not importable")
    np.testing.assert_allclose(ours, data_side.resample_frames(h.numpy(), 40, 25.0), rtol=1e-6, atol=1e-6)
    assert num_video_frames(16000 * 13) == 325 and num_video_frames(int(16000 * 1.3)) == 33  # 20800 / 640 = 32.5


@pytest.mark.parametrize("seconds", [1.3, 5.0, 13.0])
def test_any_audio_length(pipe, portrait, speech, seconds):
    audio = speech[: int(round(seconds * 16000))]
    expected = num_video_frames(len(audio))
    calls0 = pipe.emo.reference_net_calls
    out = pipe(portrait, audio, num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    size = pipe.resolution
    assert out.frames.shape == (expected, size, size, 3) and out.frames.dtype == np.uint8
    assert expected == int(np.ceil(seconds * 25 - 1e-9))
    clips = -(-expected // pipe.emo.config.num_frames)
    assert pipe.emo.reference_net_calls - calls0 == clips  # one ReferenceNet pass per clip, not per step
    assert len(out.audio) == len(audio)


def test_reference_net_once_per_clip_with_guidance(pipe, portrait, speech):
    calls0 = pipe.emo.reference_net_calls
    steps = []
    out = pipe(portrait, speech[: 16000], num_inference_steps=3, guidance_scale=3.5, audio_guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), callback=lambda c, i: steps.append((c, i)))
    assert len(out.frames) == 25
    assert len(steps) == 3 * 3  # 3 clips x 3 steps
    assert pipe.emo.reference_net_calls - calls0 == 3


def test_seed_determinism(pipe, portrait, speech):
    kw = dict(num_inference_steps=2, guidance_scale=2.0, max_frames=12)
    a = pipe(portrait, speech[:8000], generator=torch.Generator().manual_seed(7), **kw).frames
    b = pipe(portrait, speech[:8000], generator=torch.Generator().manual_seed(7), **kw).frames
    c = pipe(portrait, speech[:8000], generator=torch.Generator().manual_seed(8), **kw).frames
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_conditions_change_the_video(pipe, portrait, speech):
    """Each weak condition reaches every frame: the same inputs give the same frames, and other
    speech, silence or another speed change every frame of the clip. The face locator is
    zero-initialised (a weak condition that training switches on), so an untrained model's
    frames hardly depend on the mask; once its output layer has weights, the mask changes every
    frame too."""
    kw = dict(num_inference_steps=2, guidance_scale=1.0, max_frames=12)

    def frames(audio=None, **extra):
        audio = speech[:8000] if audio is None else audio
        return pipe(portrait, audio, generator=torch.Generator().manual_seed(1), **kw, **extra).frames.astype(int)

    def per_frame_change(other, base):
        return np.abs(other - base).mean(axis=(1, 2, 3))

    base = frames()
    assert np.array_equal(frames(), base)  # differences below come from the condition, not from noise
    changes = {
        "other speech": per_frame_change(frames(speech[16000:24000]), base),
        "silence": per_frame_change(frames(np.zeros(8000, np.float32)), base),
        "speed": per_frame_change(frames(speed=1.3), base),
    }
    for name, change in changes.items():
        assert len(change) == 12 and change.min() > 0.05, (name, change)  # measured: >= 0.11 in every frame
    full_mask = np.full((64, 64), 255, np.uint8)
    untrained = per_frame_change(frames(face_mask=full_mask), base)
    assert untrained.mean() < 0.1 * changes["other speech"].mean(), untrained
    conv_out = pipe.emo.face_locator.conv_out
    saved = conv_out.weight.detach().clone()
    try:
        with torch.no_grad():
            conv_out.weight.copy_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))
        trained = per_frame_change(frames(face_mask=full_mask), frames())
    finally:
        with torch.no_grad():
            conv_out.weight.copy_(saved)
    assert trained.min() > 0.003 and trained.mean() > 3 * untrained.mean(), (trained, untrained)


def test_face_region_source(pipe, portrait, speech):
    blank = np.zeros((80, 80, 3), np.uint8)
    out = pipe(blank, speech[:4000], num_inference_steps=1, guidance_scale=1.0, face_box=(20, 10, 60, 50))
    assert out.face_box_source == "given box" and out.face_mask.shape == (64, 64)
    ys, xs = np.nonzero(out.face_mask)  # box scaled 64/80 and enlarged 1.2x around its centre
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (13, 51, 5, 43)
    out = pipe(blank, speech[:4000], num_inference_steps=1, guidance_scale=1.0, face_box=(200, 200, 300, 300))
    assert "outside the square crop" in out.face_box_source
    out = pipe(blank, speech[:4000], num_inference_steps=1, guidance_scale=1.0)
    assert out.face_box_source.startswith("default centred box")
    if isinstance(portrait, str):
        pytest.importorskip("emo_data.faces", reason="data-side face backend not importable")
        out = pipe(portrait, speech[:4000], num_inference_steps=1, guidance_scale=1.0, crop="face")
        if not out.face_box_source.startswith("detected"):
            pytest.skip(f"face backend did not detect the portrait: {out.face_box_source}")
        ys, xs = np.nonzero(out.face_mask)
        assert 0 < len(ys) < 64 * 64  # a box, not the whole frame


def _probe(path):
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    with av.open(str(path)) as c:
        audio_samples = sum(f.samples for f in c.decode(audio=0)) if a else 0
    return frames, (a[0].codec_context.name if a else None), audio_samples, v.codec_context.name


def test_cli_end_to_end(tmp_path, model_dir, speech):
    from emo_model.cli import main

    # real portrait + real audio when the shared samples exist, else files written here
    image = PORTRAIT if os.path.exists(PORTRAIT) else str(tmp_path / "face.png")
    if not os.path.exists(image):
        from PIL import Image

        Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)).save(image)
    wav = tmp_path / "speech.wav"
    clip = np.clip(speech[: int(1.3 * 16000)], -1, 1)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((clip * 32767).astype("<i2").tobytes())
    outs = []
    for name in ("a.mp4", "b.mp4"):
        out = tmp_path / name
        rc = main(["--model", str(model_dir), "--image", image, "--audio", str(wav), "--out", str(out),
                   "--seed", "3", "--steps", "2", "--quiet", "--threads", "1"])
        assert rc == 0 and out.exists()
        outs.append(_probe(out))
    (frames, acodec, asamples, vcodec), (frames_b, *_rest) = outs
    assert vcodec == "h264" and acodec == "aac"
    assert len(frames) == 33 and frames[0].shape == (64, 64, 3)
    assert abs(asamples - len(clip)) <= 2048  # AAC priming / padding
    assert all(np.array_equal(x, y) for x, y in zip(frames, frames_b))  # --seed: identical video
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()  # ... and identical file


def test_cli_errors(model_dir, tmp_path):
    from emo_model.cli import main

    with pytest.raises(SystemExit):
        main(["--model", str(model_dir)])
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--image", "nope.png", "--audio", "nope.wav", "--out", str(tmp_path / "x.mp4")])


def test_write_mp4_roundtrip(tmp_path):
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(10)])
    audio = (0.2 * np.sin(np.arange(6400) * 0.1)).astype(np.float32)
    write_mp4(str(tmp_path / "x.mp4"), frames, fps=25, audio=audio)
    got, acodec, samples, _ = _probe(tmp_path / "x.mp4")
    assert len(got) == 10 and acodec == "aac" and abs(samples - 6400) <= 2048
