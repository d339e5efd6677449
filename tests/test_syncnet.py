"""SyncNet backend (emo_data/sync/syncnet.py) through the real classes, on random weights saved
and loaded the real way, and on real sample footage.

What pins what:
* the state-dict table below is syncnet_python's ``SyncNetModel.S`` (so ``syncnet_v2.model``
  loads as-is);
* MFCC == python_speech_features (the original's front end), int16 quantisation == FFmpeg's;
* the crop == ``crop_video``'s arithmetic, re-done here with ``np.pad`` as the original does;
* offset / LSE-D / LSE-C == ``SyncNetInstance.evaluate`` + ``calc_pdist`` re-implemented here
  loop for loop;
* the sign: audio delayed by k frames moves the whole distance curve by +k.
"""
from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emo_data.stage import StageError
from emo_data.sync.base import SyncInput
from emo_data.sync.syncnet import (
    SyncNet,
    SyncNetBackend,
    SyncNetWeightsError,
    load_syncnet,
    mfcc,
    score_video,
    syncnet_crops,
    syncnet_distances,
    to_pcm16,
)

from audio_helpers import decode_audio_16k, sample_path

VIDEO = "video/sadtalker__WDA_KatieHill_000.mp4"
AUDIO = "audio/sadtalker__RD_Radio31_000.wav"

# syncnet_python SyncNetModel.S(num_layers_in_fc_layers=1024).state_dict(): name -> shape.
_BN = ("weight", "bias", "running_mean", "running_var")


def _conv_bn(prefix: str, conv: int, shape: tuple) -> dict:
    out = {f"{prefix}.{conv}.weight": shape, f"{prefix}.{conv}.bias": (shape[0],)}
    out.update({f"{prefix}.{conv + 1}.{k}": (shape[0],) for k in _BN})
    out[f"{prefix}.{conv + 1}.num_batches_tracked"] = ()
    return out


def _fc(prefix: str) -> dict:
    out = {f"{prefix}.0.weight": (512, 512), f"{prefix}.0.bias": (512,)}
    out.update({f"{prefix}.1.{k}": (512,) for k in _BN})
    out[f"{prefix}.1.num_batches_tracked"] = ()
    out.update({f"{prefix}.3.weight": (1024, 512), f"{prefix}.3.bias": (1024,)})
    return out


REFERENCE_SHAPES = {
    **_conv_bn("netcnnaud", 0, (64, 1, 3, 3)),
    **_conv_bn("netcnnaud", 4, (192, 64, 3, 3)),
    **_conv_bn("netcnnaud", 8, (384, 192, 3, 3)),
    **_conv_bn("netcnnaud", 11, (256, 384, 3, 3)),
    **_conv_bn("netcnnaud", 14, (256, 256, 3, 3)),
    **_conv_bn("netcnnaud", 18, (512, 256, 5, 4)),
    **_fc("netfcaud"),
    **_fc("netfclip"),
    **_conv_bn("netcnnlip", 0, (96, 3, 5, 7, 7)),
    **_conv_bn("netcnnlip", 4, (256, 96, 1, 5, 5)),
    **_conv_bn("netcnnlip", 8, (256, 256, 1, 3, 3)),
    **_conv_bn("netcnnlip", 11, (256, 256, 1, 3, 3)),
    **_conv_bn("netcnnlip", 14, (256, 256, 1, 3, 3)),
    **_conv_bn("netcnnlip", 18, (512, 256, 1, 6, 6)),
}


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial BatchNorm statistics (so eval-mode BN is exercised)."""
    torch.manual_seed(seed)
    model = SyncNet()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Random weights saved as syncnet_python's file is: ``torch.save(state_dict)``, ``.model``."""
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(_random_state(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def model(weights) -> SyncNet:
    return load_syncnet(weights)


# ------------------------------------------------------------------------------ architecture

def test_parameter_names_and_shapes_are_syncnet_python_s():
    state = SyncNet().state_dict()
    assert list(state) == list(REFERENCE_SHAPES)
    assert {k: tuple(v.shape) for k, v in state.items()} == REFERENCE_SHAPES
    assert sum(p.numel() for p in SyncNet().parameters()) == 13_631_616


def test_embedding_shapes(model):
    with torch.inference_mode():
        assert model.forward_lip(torch.zeros(2, 3, 5, 224, 224)).shape == (2, 1024)
        assert model.forward_aud(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert model.forward_lipfeat(torch.zeros(1, 3, 5, 224, 224)).shape == (1, 512)


# ------------------------------------------------------------------------------ weights

def test_model_pth_and_safetensors_load_to_identical_outputs(tmp_path, weights):
    from safetensors.torch import save_file

    state = torch.load(weights, weights_only=True)
    st = tmp_path / "syncnet_v2.safetensors"
    save_file(state, str(st))
    # A full SyncNetInstance saved whole-module style: nested "state_dict", "__S__." prefix, and
    # an old-torch file without the BatchNorm counters.
    nested = tmp_path / "instance.pth"
    torch.save({"state_dict": {f"__S__.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}},
               str(nested))

    torch.manual_seed(1)
    lip = torch.rand(1, 3, 5, 224, 224) * 255
    aud = torch.randn(3, 1, 13, 20) * 10
    outs = []
    for path in (weights, str(st), str(nested)):
        m = load_syncnet(path)
        assert not m.training
        with torch.inference_mode():
            outs.append((m.forward_lip(lip), m.forward_aud(aud)))
    for lip_out, aud_out in outs[1:]:
        assert torch.equal(lip_out, outs[0][0])
        assert torch.equal(aud_out, outs[0][1])
    # The loaded values are the saved ones.
    loaded = load_syncnet(str(st)).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


class _RunsCode:
    """Unpickling this runs ``os.mkdir(marker)``: arbitrary code from a weights file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_weights_that_need_pickle_code_are_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.model"
    state = _random_state()
    state["netcnnaud.0.weight"] = _RunsCode(str(marker))
    torch.save(state, str(path))
    with pytest.raises(SyncNetWeightsError, match="pickle code"):
        load_syncnet(str(path))
    assert not marker.exists()


def test_wrong_weights_are_named(tmp_path):
    state = _random_state()
    del state["netfclip.3.bias"]
    state["netcnnlip.0.weight"] = torch.zeros(96, 3, 5, 5, 5)
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "other.pth"
    torch.save(state, str(path))
    with pytest.raises(SyncNetWeightsError) as err:
        load_syncnet(str(path))
    msg = str(err.value)
    assert "missing keys: netfclip.3.bias" in msg
    assert "unexpected keys: head.weight" in msg
    assert "netcnnlip.0.weight (96, 3, 5, 5, 5) != (96, 3, 5, 7, 7)" in msg
    with pytest.raises(FileNotFoundError):
        load_syncnet(str(tmp_path / "absent.model"))


# ------------------------------------------------------------------------------ front ends

def test_mfcc_equals_python_speech_features_on_real_audio():
    psf = pytest.importorskip("python_speech_features", reason="dev extra: pip install -e .[dev]")
    import av

    audio = decode_audio_16k(sample_path(AUDIO))
    ours = mfcc(audio)
    ref = psf.mfcc(to_pcm16(audio), 16000)          # what syncnet_python computes from its int16 wav
    assert ours.shape == ref.shape == (1 + math.ceil((len(audio) - 400) / 160), 13)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-9)
    assert abs(len(ours) - len(audio) / 160) < 2     # 100 Hz: 4 MFCC frames per 25-fps video frame

    # Float -> int16 exactly as FFmpeg's pcm_s16le conversion (swresample) does it.
    probe = np.concatenate([audio[:16000], np.array([1.5, -1.5, 0.5 / 32768, 1.5 / 32768, -2.5 / 32768], np.float32)])
    frame = av.AudioFrame.from_ndarray(probe[None], format="flt", layout="mono")
    frame.sample_rate = 16000
    res = av.AudioResampler(format="s16", layout="mono", rate=16000)
    s16 = np.concatenate([o.to_ndarray().reshape(-1) for o in [*res.resample(frame), *res.resample(None)]])
    np.testing.assert_array_equal(s16, to_pcm16(probe))


def _crop_video_reference(frames_rgb, boxes, cs=0.4):
    """syncnet_python run_pipeline.crop_video's arithmetic (np.pad, medfilt 13, BGR frames)."""
    import cv2
    from scipy import signal

    s = signal.medfilt([max(b[3] - b[1], b[2] - b[0]) / 2 for b in boxes], kernel_size=13)
    y = signal.medfilt([(b[1] + b[3]) / 2 for b in boxes], kernel_size=13)
    x = signal.medfilt([(b[0] + b[2]) / 2 for b in boxes], kernel_size=13)
    out = []
    for i, img in enumerate(frames_rgb):
        bs = s[i]
        bsi = int(bs * (1 + 2 * cs))
        frame = np.pad(img[:, :, ::-1], ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=(110, 110))
        my, mx = y[i] + bsi, x[i] + bsi
        face = frame[int(my - bs):int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
        out.append(cv2.resize(face, (224, 224)))
    return np.stack(out)


def test_crops_follow_crop_video():
    rng = np.random.default_rng(0)
    T = 20
    frames = rng.integers(0, 256, (T, 256, 256, 3), dtype=np.uint8)
    centre = np.array([128.0, 150.0]) + rng.normal(0, 3, (T, 2))
    half = 60 + rng.normal(0, 2, T)
    boxes = np.stack([centre[:, 0] - half, centre[:, 1] - half * 1.1, centre[:, 0] + half, centre[:, 1] + half], 1)
    boxes[7] += 40                                   # a detection glitch the median filter removes
    crops = syncnet_crops(frames, boxes)
    assert crops.shape == (T, 224, 224, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops, _crop_video_reference(frames, boxes))
    # Pre-cropped frames: only resized, and BGR.
    flat = np.zeros((2, 100, 100, 3), np.uint8)
    flat[..., 0] = 200                               # red in RGB
    out = syncnet_crops(flat, None)
    assert out.shape == (2, 224, 224, 3) and (out[..., 2] == 200).all() and (out[..., 0] == 0).all()


# ------------------------------------------------------------------------------ distances

def _evaluate_reference(model, crops_bgr, pcm16, vshift):
    """SyncNetInstance.evaluate + calc_pdist, loop for loop (batch 20, on CPU)."""
    import python_speech_features as psf
    from scipy import signal

    im = np.transpose(np.expand_dims(np.stack(list(crops_bgr), axis=3), 0), (0, 3, 4, 1, 2))
    imtv = torch.from_numpy(im.astype(float)).float()
    mf = np.stack([np.array(i) for i in zip(*psf.mfcc(pcm16, 16000))])
    cct = torch.from_numpy(np.expand_dims(np.expand_dims(mf, 0), 0).astype(float)).float()
    min_length = min(len(crops_bgr), math.floor(len(pcm16) / 640))
    lastframe = min_length - 5
    im_feat, cc_feat = [], []
    with torch.no_grad():
        for i in range(0, lastframe, 20):
            im_feat.append(model.forward_lip(torch.cat([imtv[:, :, v:v + 5] for v in range(i, min(lastframe, i + 20))], 0)))
            cc_feat.append(model.forward_aud(torch.cat([cct[:, :, :, v * 4:v * 4 + 20] for v in range(i, min(lastframe, i + 20))], 0)))
    feat1, feat2 = torch.cat(im_feat, 0), torch.cat(cc_feat, 0)
    win_size = vshift * 2 + 1
    feat2p = F.pad(feat2, (0, 0, vshift, vshift))
    dists = [F.pairwise_distance(feat1[[i], :].repeat(win_size, 1), feat2p[i:i + win_size, :]) for i in range(len(feat1))]
    mdist = torch.mean(torch.stack(dists, 1), 1)
    minval, minidx = torch.min(mdist, 0)
    offset = vshift - minidx
    conf = torch.median(mdist) - minval
    fdist = np.stack([d[minidx].numpy() for d in dists])
    fconfm = signal.medfilt(torch.median(mdist).numpy() - fdist, kernel_size=9)
    return int(offset), float(minval), float(conf), mdist.numpy(), fconfm


def test_distances_equal_syncnet_python_evaluate(model):
    pytest.importorskip("python_speech_features", reason="dev extra: pip install -e .[dev]")
    rng = np.random.default_rng(3)
    T, vshift = 18, 4
    # Smooth random "faces" (so the lip tower sees structure) and real speech.
    crops = np.clip(rng.normal(120, 40, (T, 28, 28, 3)), 0, 255).astype(np.uint8).repeat(8, 1).repeat(8, 2)
    audio = decode_audio_16k(sample_path(AUDIO))[16000:16000 + T * 640]
    off, minval, conf, mdist, fconf = _evaluate_reference(model, crops, to_pcm16(audio), vshift)
    s = syncnet_distances(model, crops, audio, fps=25, max_offset=vshift)
    np.testing.assert_allclose(s.curve, mdist, rtol=1e-5, atol=1e-5)
    assert s.syncnet_offset == off and s.offset_frames == -off
    assert s.offsets == list(range(-vshift, vshift + 1))
    assert s.min_distance == pytest.approx(minval, rel=1e-5)
    assert s.confidence == pytest.approx(conf, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(s.frame_confidence, fconf, rtol=1e-4, atol=1e-4)
    assert s.num_windows == T - 5


# ------------------------------------------------------------------------------ backend, real clip

MAX_OFFSET = 15
PAD = MAX_OFFSET + 2         # audio margin (frames) on each side, as the build provides
T_CLIP = 40
START = 25                   # clip start frame in the source (so the margin is real audio)


@pytest.fixture(scope="module")
def real_clip():
    """40 frames of a real talking head (already a 512x512 face-centred crop at 25 fps),
    per-frame dlib boxes (every 8th frame, interpolated), re-encoded with the project's encoder,
    and the source audio with a real margin."""
    from emo_data.config import FaceConfig
    from emo_data.decode import iter_frames
    from emo_data.faces import make_face_backend
    from emo_data.shards import encode_mp4

    path = sample_path(VIDEO)
    frames = []
    for i, f in enumerate(iter_frames(str(path), fps=25.0)):
        if i >= START:
            frames.append(f.image)
        if len(frames) == T_CLIP:
            break
    frames = np.stack(frames)
    assert frames.shape[1:] == (512, 512, 3)
    det = make_face_backend(FaceConfig(backend="dlib"))
    det.setup()
    keys = list(range(0, T_CLIP, 8)) + [T_CLIP - 1]
    kb = np.stack([max(det.detect(frames[i]), key=lambda f: f.box[2] - f.box[0]).box for i in keys]).astype(np.float64)
    boxes = np.stack([np.interp(np.arange(T_CLIP), keys, kb[:, c]) for c in range(4)], 1).astype(np.float32)
    audio = decode_audio_16k(path)
    return {"frames": frames, "boxes": boxes, "mp4": encode_mp4(list(frames), 25.0), "audio": audio}


def _item(clip, shift_frames: int = 0, key: str = "clip") -> SyncInput:
    """The clip's SyncInput; ``shift_frames = k > 0`` delays the audio by k frames (audio late)."""
    lo = (START - shift_frames - PAD) * 640
    audio = clip["audio"][lo:lo + (T_CLIP + 2 * PAD) * 640]
    assert lo >= 0 and len(audio) == (T_CLIP + 2 * PAD) * 640
    return SyncInput(
        key=key, fps=25.0, sample_rate=16000, num_frames=T_CLIP,
        landmarks=np.zeros((T_CLIP, 68, 2), np.float32), landmark_format="ibug68",
        face_boxes=clip["boxes"], crop_size=512, audio=audio, audio_pad_frames=PAD, mp4=clip["mp4"],
    )


@pytest.fixture(scope="module")
def backend(weights):
    b = SyncNetBackend(weights=weights, max_offset=MAX_OFFSET, device="cpu", batch_size=32)
    b.setup()
    return b


@pytest.fixture(scope="module")
def unshifted(backend, real_clip):
    return backend.score(_item(real_clip))


def test_backend_scores_a_real_clip(backend, unshifted, weights):
    r = unshifted
    assert (backend.name, backend.needs_pixels, backend.uses_gpu) == ("syncnet", True, True)
    assert r.backend == "syncnet" and r.curve_kind == "distance"
    assert r.offsets == list(range(-MAX_OFFSET, MAX_OFFSET + 1))
    assert len(r.curve) == 2 * MAX_OFFSET + 1 and np.isfinite(r.curve).all()
    assert r.min_distance == pytest.approx(min(r.curve))
    assert r.confidence == pytest.approx(float(np.median(r.curve)) - min(r.curve), abs=1e-5)
    assert r.offset_frames == r.offsets[int(np.argmin(r.curve))]
    assert r.extra["syncnet_offset"] == -r.offset_frames
    assert r.extra["windows"] == T_CLIP - 5
    with open(weights, "rb") as f:
        assert r.extra["sha256"] == hashlib.sha256(f.read()).hexdigest()[:16]
    assert r.extra["weights"] == "syncnet_v2.model"
    d = r.to_dict()                                   # JSON-able as the manifest stores it
    assert d["min_distance"] == pytest.approx(r.min_distance, abs=1e-5)


def test_delayed_audio_moves_the_curve_by_the_delay(backend, real_clip, unshifted):
    """Holds for any weights: the network sees the same windows, k frames apart. Pins the sign:
    audio late by k (base.py's positive offset) -> curve(o) of the shifted copy = curve(o - k)."""
    k = 3
    shifted = backend.score(_item(real_clip, shift_frames=k, key="late"))
    a, b = np.asarray(unshifted.curve), np.asarray(shifted.curve)
    np.testing.assert_allclose(b[k:], a[:-k], rtol=1e-4, atol=1e-4)
    assert not np.allclose(b, a, rtol=1e-4, atol=1e-4)   # it did move
    best = unshifted.offset_frames
    if -MAX_OFFSET <= best + k <= MAX_OFFSET and shifted.offsets[int(np.argmin(b))] - k >= -MAX_OFFSET:
        assert shifted.offset_frames == best + k


def test_score_video_on_face_crops_and_at_30fps(model, real_clip):
    n = 16
    frames, boxes = real_clip["frames"][:n], real_clip["boxes"][:n]
    audio = real_clip["audio"][START * 640:(START + n) * 640]
    out = score_video(model, frames, boxes, audio, fps=25, max_offset=3)
    assert set(out) >= {"offset_frames", "lse_d", "lse_c", "curve", "offsets", "syncnet_offset"}
    assert len(out["curve"]) == 7 and np.isfinite(out["curve"]).all()
    assert out["lse_d"] == pytest.approx(min(out["curve"]))
    assert len(out["frame_confidence"]) == out["num_windows"] == n - 5
    crops = score_video(model, frames[:, 100:400, 100:400], None, audio, max_offset=3)  # already face crops
    assert len(crops["curve"]) == 7 and np.isfinite(crops["curve"]).all()
    # A 30-fps clip: resampled to SyncNet's 25 fps, curve reported on the clip's frame offsets.
    idx = np.minimum(np.round(np.arange(n) * 25 / 30).astype(int), n - 1)
    out30 = score_video(model, frames[idx], boxes[idx], audio[: int(n / 30 * 16000)], fps=30, max_offset=3)
    assert out30["offsets"] == [-3, -2, -1, 0, 1, 2, 3] and np.isfinite(out30["curve"]).all()
    assert -3 <= out30["offset_frames"] <= 3


def test_unscorable_clips_are_stage_errors(backend, real_clip):
    item = _item(real_clip)
    item.mp4 = None
    with pytest.raises(StageError) as err:
        backend.score(item)
    assert err.value.reason == "sync_no_pixels"
    item = _item(real_clip)
    item.num_frames = 5                               # fewer than the 6 frames SyncNet needs
    with pytest.raises(StageError) as err:
        backend.score(item)
    assert err.value.reason == "sync_unscorable"
    item = _item(real_clip)
    item.mp4 = b"not an mp4"
    with pytest.raises(StageError) as err:
        backend.score(item)
    assert err.value.reason == "sync_decode_failed"
