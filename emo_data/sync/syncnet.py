"""SyncNet lip-sync backend: the network of joonson/syncnet_python, its MFCC / face-crop front
ends, and the standard offset / LSE-D / LSE-C computation.

Weights
-------
The published model is ``syncnet_v2.model`` from the SyncNet authors (VGG, Oxford:
``www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model``, fetched by
syncnet_python's ``download_model.sh``); LatentSync ships the same file as
``checkpoints/auxiliary/syncnet_v2.model`` and Wav2Lip's evaluation runs syncnet_python with it.
It is a plain state dict of tensors (LatentSync loads it with ``weights_only=True``), keys
``netcnnaud.0.weight`` ... ``netfclip.3.bias``; :func:`load_syncnet` reads it as-is (also a
``.pth`` / ``.pt`` re-save, a nested ``{"state_dict": ...}``, a ``__S__.`` / ``module.`` key
prefix, and ``.safetensors``). Nothing in a weights file is executed: a file that needs pickle
code is refused. Point the backend at a local copy (``SyncNetBackend(weights=PATH)``); each
result's ``extra`` names the file and the first 16 hex digits of its sha256, so outputs say which
weights scored them.

Conventions (as syncnet_python's ``run_pipeline.py`` + ``SyncNetInstance.evaluate``)
------------------------------------------------------------------------------------
* Video: 25 fps. Each frame is cut around the (13-frame median-filtered) face box as
  ``crop_video`` does -- half-size ``s = max(w, h) / 2``, a square of side ``2.8 s`` (crop_scale
  0.4) running from ``s`` above the box centre to ``1.8 s`` below it, grey (110) padding where it
  leaves the frame -- resized to 224x224 (``cv2.resize``, bilinear), **BGR** channel order,
  values 0..255 unnormalised (syncnet_python reads frames with ``cv2.imread``). Lip windows are
  5 frames: ``[N, 3, 5, 224, 224]``.
* Audio: 16 kHz mono quantised to int16 the way FFmpeg writes ``pcm_s16le`` (the original reads
  a wav with ``scipy.io.wavfile``; the int16 scale matters, it sets the log-energy coefficient),
  then python_speech_features' ``mfcc`` with its defaults (25 ms frames, 10 ms hop, 512-point
  FFT, 26 mel filters, 13 coefficients, pre-emphasis 0.97, lifter 22, c0 = log frame energy), so
  100 MFCC frames per second = 4 per video frame. Audio windows are 20 MFCC frames starting at
  ``4 * frame``: ``[N, 1, 13, 20]``. The MFCC is computed here in numpy/scipy (:func:`mfcc`); the
  tests check it equals python_speech_features (a ``dev`` extra), which stays out of the runtime
  dependencies (an unmaintained 2017 package, and we only need its one function, vectorised).
* Windows: ``min_length = min(frames, samples // 640)``; video windows ``i = 0 .. min_length-6``
  (the original's ``lastframe = min_length - 5``, one window fewer than would fit: kept, so the
  numbers are the standard ones). For each window the distance to the audio windows
  ``i - max_offset .. i + max_offset`` (``F.pairwise_distance``, eps 1e-6); audio windows
  outside the clip are the zero embedding, as ``calc_pdist`` pads them -- unless real audio is
  given past the clip edges (``audio_pad_frames``, the build's margin), which is then used.
* Scores: ``curve[k]`` = mean distance over windows at offset ``k``; LSE-D = ``min(curve)``;
  LSE-C = ``median(curve) - min(curve)``; per-window confidence ``median(curve) - d_i(best)``
  median-filtered over 9 windows.
* Offset sign: syncnet_python prints ``AV offset = max_offset - argmin``, which is positive when
  the audio is **early**. Here ``offset_frames = argmin - max_offset`` follows
  :mod:`emo_data.sync.base` (positive = audio late: the sound of frame ``t`` plays at ``t + k``);
  ``syncnet_offset`` (score dicts, ``extra``) keeps the original sign for comparison with papers.

Differences from syncnet_python (documented, deliberate)
-------------------------------------------------------
* Face boxes come from our face backend (dlib HOG by default, InsightFace / FAN optional), not
  S3FD. A dlib HOG box is a little tighter than S3FD's (less forehead), so the 2.8x crop is a
  little tighter around the mouth; with InsightFace's SCRFD boxes the crop is close to S3FD's.
* No XVID / JPEG round trip: the original writes the 224 crop to an XVID avi and re-reads it as
  JPEG frames; we crop the decoded clip directly (already one H.264 generation from the source).
* Our 512x512 clips are already face-centred crops of the source; ``crop_video``'s grey padding
  appears where the 2.8x square leaves the 512 crop (usually below the chin), where the original
  would still see source pixels.
* fps other than 25: frames are resampled to 25 fps by nearest timestamp (what syncnet_python's
  ``ffmpeg -r 25`` does), the search runs over ``ceil(max_offset * 25 / fps)`` 25-fps offsets,
  and the curve is interpolated onto the clip's frame offsets (LSE-D / LSE-C stay the 25-fps ones).
* Audio windows that lie in the given margin but past the end of the source track are silence
  (``SyncInput`` zero-fills), not the zero embedding.
* Level of stereo sources: FFmpeg's ``-ac 1`` to pcm_s16le mixes stereo as (L+R)/2, while the
  project's float decoder (swresample to float mono) mixes (L+R)/sqrt(2), 3 dB louder. Only the
  log-energy coefficient c0 moves (by ln 2 = 0.69; c0 is ~10-25 on speech); not compensated.

Cost (CPU, random weights, 2-core dev machine, torch 2.14): about 60 ms per lip window and
15 ms per audio window, i.e. 1.0-1.5 CPU-seconds per second of 25-fps clip (8 s clip with a
17-frame margin: 8-12 s CPU; wall 1.2-2.0 s per clip second with other jobs sharing the cores).
Decode + crops + MFCC are < 10 % of it; the lip tower (3D convs over 224x224x5) dominates.
A GPU (``device="cuda"``, larger ``batch_size``) is the intended place for it in a build.

Public names (kept stable for ``emo-eval``): :class:`SyncNet`, :func:`load_syncnet`,
:func:`mfcc`, :func:`syncnet_crops`, :func:`syncnet_distances`, :class:`SyncNetScores`,
:func:`score_video`, :class:`SyncNetBackend`, :class:`SyncNetWeightsError`.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from emo_data.shards.contract import SAMPLE_RATE
from emo_data.stage import StageError
from emo_data.sync.base import SyncBackend, SyncInput, SyncResult

SYNCNET_FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // SYNCNET_FPS      # 640
MFCC_HOP = 160                                      # 10 ms
MFCC_WIN = 400                                      # 25 ms
MFCC_NFFT = 512
MFCC_PER_FRAME = SAMPLES_PER_FRAME // MFCC_HOP      # 4
VIDEO_WINDOW = 5                                    # frames per lip window
AUDIO_WINDOW = VIDEO_WINDOW * MFCC_PER_FRAME        # 20 MFCC frames
CROP_SIZE = 224
CROP_SCALE = 0.4                                    # run_pipeline.py --crop_scale
BOX_SMOOTH = 13                                     # medfilt kernel on box size / centre
PAD_VALUE = 110                                     # crop_video's padding grey
FRAME_CONF_SMOOTH = 9


class SyncNetWeightsError(ValueError):
    """A SyncNet weights file that cannot be used: unsafe to load, or not this architecture."""


# ----------------------------------------------------------------------------------- network

class SyncNet(nn.Module):
    """syncnet_python's ``SyncNetModel.S``: same module tree, parameter names and shapes.

    ``forward_aud``: MFCC windows ``[N, 1, 13, 20]`` -> ``[N, embed_dim]``;
    ``forward_lip``: BGR 0..255 windows ``[N, 3, 5, 224, 224]`` -> ``[N, embed_dim]``.
    """

    def __init__(self, embed_dim: int = 1024):
        super().__init__()

        def conv2(cin, cout, k, s=(1, 1), p=(1, 1)):
            return [nn.Conv2d(cin, cout, kernel_size=k, stride=s, padding=p), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def conv3(cin, cout, k, s=(1, 1, 1), p=(0, 1, 1)):
            return [nn.Conv3d(cin, cout, kernel_size=k, stride=s, padding=p), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

        # Indices (and so state-dict names) follow the reference Sequential exactly.
        self.netcnnaud = nn.Sequential(
            *conv2(1, 64, (3, 3)), nn.MaxPool2d(kernel_size=(1, 1), stride=(1, 1)),          # 0-3
            *conv2(64, 192, (3, 3)), nn.MaxPool2d(kernel_size=(3, 3), stride=(1, 2)),        # 4-7
            *conv2(192, 384, (3, 3)),                                                        # 8-10
            *conv2(384, 256, (3, 3)),                                                        # 11-13
            *conv2(256, 256, (3, 3)), nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2)),       # 14-17
            *conv2(256, 512, (5, 4), p=(0, 0)),                                              # 18-20
        )
        self.netfcaud = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim),
        )
        self.netfclip = nn.Sequential(
            nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim),
        )
        self.netcnnlip = nn.Sequential(
            *conv3(3, 96, (5, 7, 7), s=(1, 2, 2), p=(0, 0, 0)),                                  # 0-2
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),                               # 3
            *conv3(96, 256, (1, 5, 5), s=(1, 2, 2), p=(0, 1, 1)),                                # 4-6
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),            # 7
            *conv3(256, 256, (1, 3, 3)),                                                         # 8-10
            *conv3(256, 256, (1, 3, 3)),                                                         # 11-13
            *conv3(256, 256, (1, 3, 3)),                                                         # 14-16
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2)),                               # 17
            *conv3(256, 512, (1, 6, 6), p=(0, 0, 0)),                                            # 18-20
        )
        self.embed_dim = int(embed_dim)

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.netcnnaud(x)
        return self.netfcaud(mid.reshape(mid.shape[0], -1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.netcnnlip(x)
        return self.netfclip(mid.reshape(mid.shape[0], -1))

    def forward_lipfeat(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.netcnnlip(x)
        return mid.reshape(mid.shape[0], -1)

    def forward(self, lip: torch.Tensor, aud: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_lip(lip), self.forward_aud(aud)


# ----------------------------------------------------------------------------------- weights

_PREFIXES = ("__S__.", "module.")
_NESTED = ("state_dict", "model_state_dict", "model")


def _read_weights(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SyncNet weights not found: {path} (download syncnet_v2.model and pass its local path)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SyncNetWeightsError(
            f"{path}: refused to load: the file needs pickle code execution, which is never done for "
            f"weights (torch.load weights_only=True rejected it: {str(e).splitlines()[0]}). A SyncNet "
            "weights file must be a plain state dict of tensors (re-save with "
            "torch.save(model.state_dict(), path)) or .safetensors."
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt / not a torch file
        raise SyncNetWeightsError(f"{path}: not a readable torch state dict: {type(e).__name__}: {e}") from None
    for _ in range(2):
        if isinstance(obj, Mapping):
            nested = next((k for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
            if nested is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise SyncNetWeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _normalise_keys(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = str(key)
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise SyncNetWeightsError(f"weights entry {key!r} is a {type(value).__name__}, not a tensor")
        out[name] = value
    return out


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_syncnet(path: str, device: str = "cpu") -> SyncNet:
    """Load SyncNet weights from a local ``.model`` / ``.pth`` / ``.pt`` state dict (read with
    ``torch.load(weights_only=True)``: no code in the file runs) or ``.safetensors``; returns the
    model in eval mode on ``device``. Raises :class:`SyncNetWeightsError` naming missing /
    unexpected keys and wrong shapes. BatchNorm ``num_batches_tracked`` counters (absent from
    files saved by old torch, unused in eval) may be missing."""
    state = _normalise_keys(_read_weights(str(path)))
    fc = state.get("netfcaud.3.weight")
    embed_dim = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.ndim == 2 else 1024
    model = SyncNet(embed_dim=embed_dim)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_names(wrong)}")
        raise SyncNetWeightsError(f"{path}: not SyncNet (syncnet_python SyncNetModel.S) weights: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in expected.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))      # state_dict() tensors share the model's storage
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        # Same numbers (to ~1e-6), about 1.4x faster 3D convolutions on CPU.
        model.netcnnlip.to(memory_format=torch.channels_last_3d)
    return model


def weights_fingerprint(path: str) -> dict[str, str]:
    """``{"weights": file name, "sha256": first 16 hex digits}`` for a result's ``extra``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"weights": os.path.basename(path), "sha256": h.hexdigest()[:16]}


# ------------------------------------------------------------------------------- audio front

def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 as FFmpeg writes pcm_s16le (round to nearest, clip)."""
    a = np.asarray(audio)
    if a.dtype == np.int16:
        return a
    return np.clip(np.rint(a.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _hz2mel(hz):
    return 2595 * np.log10(1 + hz / 700.0)


def _mel2hz(mel):
    return 700 * (10 ** (mel / 2595.0) - 1)


@lru_cache(maxsize=4)
def _mel_filterbank(nfilt: int = 26, nfft: int = MFCC_NFFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """python_speech_features' triangular filters on integer FFT bins, [nfilt, nfft // 2 + 1]."""
    mels = np.linspace(_hz2mel(0.0), _hz2mel(sample_rate / 2), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel2hz(mels) / sample_rate)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        for i in range(lo, mid):
            fb[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(mid, hi):
            fb[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    fb.setflags(write=False)
    return fb


def mfcc(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """SyncNet's audio features: ``python_speech_features.mfcc(pcm16, 16000)`` with its defaults,
    on ``audio`` (float in [-1, 1], quantised to int16 first as the original's wav is; int16 taken
    as is). Returns float64 ``[M, 13]``, M = 1 + ceil((len - 400) / 160) (100 Hz)."""
    from scipy.fft import dct

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"SyncNet's MFCC is defined at {SAMPLE_RATE} Hz, got {sample_rate}")
    x = to_pcm16(audio).astype(np.float64)
    if x.size == 0:
        raise ValueError("mfcc: empty audio")
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    n = len(x)
    frames_n = 1 if n <= MFCC_WIN else 1 + int(math.ceil((1.0 * n - MFCC_WIN) / MFCC_HOP))
    padded = np.concatenate([x, np.zeros((frames_n - 1) * MFCC_HOP + MFCC_WIN - n)])
    frames = np.lib.stride_tricks.sliding_window_view(padded, MFCC_WIN)[::MFCC_HOP][:frames_n]
    pspec = np.square(np.abs(np.fft.rfft(frames, MFCC_NFFT))) / MFCC_NFFT
    energy = pspec.sum(axis=1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    feat = pspec @ _mel_filterbank().T
    feat = np.where(feat == 0, np.finfo(float).eps, feat)
    feat = dct(np.log(feat), type=2, axis=1, norm="ortho")[:, :13]
    feat = feat * (1 + (22 / 2.0) * np.sin(np.pi * np.arange(13) / 22))
    feat[:, 0] = np.log(energy)
    return feat


# ------------------------------------------------------------------------------- video front

def _medfilt_kernel(n: int, kernel: int) -> int:
    k = min(kernel, n if n % 2 else n - 1)
    return max(1, k)


def syncnet_crops(frames_rgb: np.ndarray, face_boxes: Optional[np.ndarray] = None,
                  crop_scale: float = CROP_SCALE, smooth: int = BOX_SMOOTH) -> np.ndarray:
    """RGB frames ``[T, H, W, 3]`` uint8 -> SyncNet input crops ``[T, 224, 224, 3]`` uint8 **BGR**.

    With ``face_boxes`` ``[T, 4]`` (x0, y0, x1, y1 in frame pixels): syncnet_python's
    ``crop_video`` -- box half-size and centre median-filtered over ``smooth`` frames (scipy
    ``medfilt``, zero-padded at the ends like the original; the kernel shrinks for clips shorter
    than it), a square of side ``2 * s * (1 + crop_scale)`` from ``s`` above the centre, grey 110
    outside the frame, resized to 224. ``face_boxes=None``: the frames already are face crops
    (e.g. a generated video), only resized to 224 (as LatentSync's evaluation does)."""
    import cv2
    from scipy.signal import medfilt

    frames_rgb = np.asarray(frames_rgb)
    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames_rgb.shape}")
    T = len(frames_rgb)
    out = np.empty((T, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    if face_boxes is None:
        for t in range(T):
            out[t] = cv2.resize(frames_rgb[t], (CROP_SIZE, CROP_SIZE))[:, :, ::-1]
        return out
    boxes = np.asarray(face_boxes, np.float64)
    if boxes.shape != (T, 4):
        raise ValueError(f"face_boxes must be [{T}, 4], got {boxes.shape}")
    k = _medfilt_kernel(T, smooth)
    s = medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, kernel_size=k)
    cy = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel_size=k)
    cx = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel_size=k)
    cs = float(crop_scale)
    for t in range(T):
        bs = float(s[t])
        bsi = int(bs * (1 + 2 * cs))
        if bs < 1:
            raise ValueError(f"frame {t}: face box of size {2 * bs:.1f} px cannot be cropped")
        img = cv2.copyMakeBorder(np.ascontiguousarray(frames_rgb[t]), bsi, bsi, bsi, bsi,
                                 cv2.BORDER_CONSTANT, value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
        my, mx = cy[t] + bsi, cx[t] + bsi
        face = img[int(my - bs):int(my + bs * (1 + 2 * cs)), int(mx - bs * (1 + cs)):int(mx + bs * (1 + cs))]
        if face.size == 0:
            raise ValueError(f"frame {t}: face box {boxes[t].tolist()} lies outside the frame")
        out[t] = cv2.resize(face, (CROP_SIZE, CROP_SIZE))[:, :, ::-1]
    return out


def resample_to_25fps(n_frames: int, fps: float) -> np.ndarray:
    """Source frame index for each 25-fps output frame (nearest timestamp, as ``ffmpeg -r 25``)."""
    if abs(fps - SYNCNET_FPS) < 1e-6:
        return np.arange(n_frames)
    n_out = int(math.floor(n_frames * SYNCNET_FPS / fps + 1e-6))
    return np.minimum(np.floor(np.arange(n_out) * fps / SYNCNET_FPS + 0.5).astype(int), n_frames - 1)


# ---------------------------------------------------------------------------------- scoring

@dataclass
class SyncNetScores:
    """The standard SyncNet numbers for one clip (offsets in the base.py sign convention)."""

    offsets: list[int]                 # ascending, -max_offset .. +max_offset
    curve: list[float]                 # mean embedding distance at each offset
    offset_frames: int                 # argmin, > 0 = audio late
    min_distance: float                # LSE-D
    confidence: float                  # LSE-C = median(curve) - min(curve)
    syncnet_offset: int                # syncnet_python's sign: -offset_frames
    frame_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # per window, medfilt 9
    num_windows: int = 0


def _embed_batches(fn, make_batch, n: int, batch_size: int, device) -> torch.Tensor:
    outs = []
    for i0 in range(0, n, batch_size):
        x = make_batch(i0, min(n, i0 + batch_size))
        outs.append(fn(x.to(device)).float().cpu())
    return torch.cat(outs, 0) if outs else torch.zeros(0)


def pdist_curve(lip: torch.Tensor, aud_padded: torch.Tensor, vshift: int) -> torch.Tensor:
    """``dists[i, j]`` = distance of lip window ``i`` to padded audio row ``i + j`` (``calc_pdist``
    vectorised: row ``r`` of ``aud_padded`` is the audio window of frame ``r - vshift``)."""
    w = 2 * vshift + 1
    idx = torch.arange(len(lip))[:, None] + torch.arange(w)[None, :]
    return F.pairwise_distance(lip[:, None, :].expand(-1, w, -1), aud_padded[idx])


def syncnet_distances(model: SyncNet, crops: np.ndarray, audio: np.ndarray, fps: float = 25,
                      max_offset: int = 15, audio_pad_frames: int = 0, batch_size: int = 20) -> SyncNetScores:
    """The standard SyncNet offset search on prepared input.

    ``crops``: ``[T, 224, 224, 3]`` uint8 BGR at 25 fps (:func:`syncnet_crops`); ``audio``: 16 kHz
    mono covering frames ``[-audio_pad_frames, T + audio_pad_frames)``. With no margin this is
    syncnet_python's ``evaluate`` + ``calc_pdist`` (zero embeddings past the clip edges); with one,
    audio windows inside the margin are real audio."""
    if abs(float(fps) - SYNCNET_FPS) > 1e-6:
        raise ValueError(f"syncnet_distances works at {SYNCNET_FPS} fps (4 MFCC frames per video frame); "
                         f"resample first (score_video / SyncNetBackend do), got {fps}")
    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"crops must be [T, {CROP_SIZE}, {CROP_SIZE}, 3], got {crops.shape}")
    vshift, pad = int(max_offset), max(0, int(audio_pad_frames))
    audio = np.asarray(audio)
    clip_samples = len(audio) - 2 * pad * SAMPLES_PER_FRAME
    min_length = min(len(crops), max(0, clip_samples) // SAMPLES_PER_FRAME)
    n = min_length - VIDEO_WINDOW
    if n < 1:
        raise ValueError(f"too short for SyncNet: {len(crops)} frames / {max(0, clip_samples)} audio samples "
                         f"(needs at least {VIDEO_WINDOW + 1} frames of each)")
    device = next(model.parameters()).device
    mf = torch.from_numpy(mfcc(audio).T.astype(np.float32))            # [13, M]

    # Audio windows of frames j = -vshift .. n - 1 + vshift; real where the audio has them.
    js = np.arange(-vshift, n + vshift)
    starts = MFCC_PER_FRAME * (pad + js)                               # first MFCC frame of each window
    last_end = (starts + AUDIO_WINDOW - 1) * MFCC_HOP + MFCC_WIN         # sample after the last frame
    real = (js >= 0) & (js < n)
    if pad > 0:
        real |= (starts >= 0) & (last_end <= len(audio))
    real_idx = np.flatnonzero(real)

    model.eval()
    with torch.inference_mode():
        def lip_batch(i0, i1):
            x = torch.from_numpy(np.ascontiguousarray(crops[i0:i1 + VIDEO_WINDOW - 1])).float()  # [t, H, W, 3]
            x = x.permute(3, 0, 1, 2)                                                             # [3, t, H, W]
            return torch.stack([x[:, i:i + VIDEO_WINDOW] for i in range(i1 - i0)], 0)

        def aud_batch(i0, i1):
            return torch.stack([mf[:, s:s + AUDIO_WINDOW] for s in starts[real_idx[i0:i1]]], 0)[:, None]

        lip = _embed_batches(model.forward_lip, lip_batch, n, batch_size, device)
        aud_real = _embed_batches(model.forward_aud, aud_batch, len(real_idx), batch_size, device)
        aud = torch.zeros(len(js), lip.shape[1])
        aud[torch.from_numpy(real_idx)] = aud_real
        dists = pdist_curve(lip, aud, vshift)                          # [n, 2 vshift + 1]
    mdist = dists.mean(0)
    minval, minidx = torch.min(mdist, 0)
    med = torch.median(mdist)
    fconf = (med - dists[:, int(minidx)]).numpy()
    from scipy.signal import medfilt

    fconfm = medfilt(fconf.astype(np.float64), kernel_size=_medfilt_kernel(len(fconf), FRAME_CONF_SMOOTH))
    best = int(minidx) - vshift
    return SyncNetScores(
        offsets=list(range(-vshift, vshift + 1)), curve=[float(v) for v in mdist],
        offset_frames=best, min_distance=float(minval), confidence=float(med - minval),
        syncnet_offset=-best, frame_confidence=np.asarray(fconfm, np.float32), num_windows=int(n),
    )


def _score_any_fps(model: SyncNet, frames_rgb: np.ndarray, face_boxes: Optional[np.ndarray], audio: np.ndarray,
                   fps: float, max_offset: int, audio_pad_frames: int, batch_size: int,
                   crop_scale: float = CROP_SCALE) -> SyncNetScores:
    """Crops + distances at any clip fps; offsets in the clip's frames (see module doc)."""
    fps = float(fps)
    pick = resample_to_25fps(len(frames_rgb), fps)
    native = abs(fps - SYNCNET_FPS) < 1e-6
    # Crop on the clip's own frames (the box smoothing runs at the clip's rate), then pick.
    crops = syncnet_crops(frames_rgb, face_boxes, crop_scale=crop_scale)[pick]
    if native:
        return syncnet_distances(model, crops, audio, SYNCNET_FPS, max_offset, audio_pad_frames, batch_size)
    audio = np.asarray(audio)
    lead = int(round(audio_pad_frames * SAMPLE_RATE / fps))             # samples before the clip start
    tail = len(audio) - lead - len(crops) * SAMPLES_PER_FRAME
    pad25 = max(0, min(lead, tail) // SAMPLES_PER_FRAME)
    a25 = audio[lead - pad25 * SAMPLES_PER_FRAME: lead + (len(crops) + pad25) * SAMPLES_PER_FRAME]
    m25 = int(math.ceil(max_offset * SYNCNET_FPS / fps))
    s = syncnet_distances(model, crops, a25, SYNCNET_FPS, m25, pad25, batch_size)
    ratio = fps / SYNCNET_FPS
    offsets = list(range(-int(max_offset), int(max_offset) + 1))
    curve = np.interp(np.asarray(offsets) / ratio, np.asarray(s.offsets, float), np.asarray(s.curve, float))
    best = int(np.clip(round(s.offset_frames * ratio), -max_offset, max_offset))
    return SyncNetScores(offsets=offsets, curve=[float(c) for c in curve], offset_frames=best,
                         min_distance=s.min_distance, confidence=s.confidence, syncnet_offset=s.syncnet_offset,
                         frame_confidence=s.frame_confidence, num_windows=s.num_windows)


def score_video(model: SyncNet, frames_rgb: np.ndarray, face_boxes: Optional[np.ndarray], audio16k: np.ndarray,
                fps: float = 25, max_offset: int = 15, batch_size: int = 20) -> dict[str, Any]:
    """Score a (generated) talking-head video with SyncNet -- the entry point for ``emo-eval``.

    ``frames_rgb`` ``[T, H, W, 3]`` uint8; ``face_boxes`` ``[T, 4]`` (x0, y0, x1, y1, frame
    pixels), or ``None`` when the frames already are face crops; ``audio16k`` the video's own
    16 kHz mono audio from frame 0 (float in [-1, 1] or int16), zero-padded past the edges as in
    syncnet_python. Returns ``{"offset_frames", "lse_d", "lse_c", "curve", "offsets",
    "syncnet_offset", "frame_confidence", "num_windows"}``: ``offset_frames`` > 0 means the audio
    is late (:mod:`emo_data.sync.base`); ``syncnet_offset`` is the same in syncnet_python's sign;
    ``lse_d`` / ``lse_c`` are the LSE-D / LSE-C that LatentSync / Wav2Lip report."""
    s = _score_any_fps(model, np.asarray(frames_rgb), face_boxes, np.asarray(audio16k), fps, max_offset, 0, batch_size)
    return {
        "offset_frames": s.offset_frames, "lse_d": s.min_distance, "lse_c": s.confidence,
        "curve": s.curve, "offsets": s.offsets, "syncnet_offset": s.syncnet_offset,
        "frame_confidence": s.frame_confidence.tolist(), "num_windows": s.num_windows,
    }


# ---------------------------------------------------------------------------------- backend

class SyncNetBackend(SyncBackend):
    """SyncNet (syncnet_v2.model) behind :class:`SyncBackend`: decodes the clip, crops the face
    from ``face_boxes``, and returns the distance curve, LSE-D (``min_distance``) and LSE-C
    (``confidence``)."""

    name = "syncnet"
    needs_pixels = True
    uses_gpu = True

    def __init__(self, weights: str, max_offset: int = 15, device: str = "cpu", batch_size: int = 20,
                 crop_scale: float = CROP_SCALE):
        super().__init__(max_offset=max_offset, device=device)
        self.weights = str(weights)
        self.batch_size = int(batch_size)
        self.crop_scale = float(crop_scale)
        self.model: Optional[SyncNet] = None
        self._fingerprint: dict[str, str] = {}

    def setup(self) -> None:
        if self.model is None:
            self.model = load_syncnet(self.weights, device=self.device)
            self._fingerprint = weights_fingerprint(self.weights)

    def score(self, item: SyncInput) -> SyncResult:
        from emo_data.shards import decode_mp4

        self.setup()
        if item.mp4 is None:
            raise StageError("sync_no_pixels", f"{item.key}: the SyncNet backend needs the clip's mp4")
        try:
            frames = decode_mp4(item.mp4)
        except Exception as e:  # noqa: BLE001 - a clip we cannot decode is a per-clip failure
            raise StageError("sync_decode_failed", f"{item.key}: cannot decode the clip for SyncNet: {e}") from None
        boxes = np.asarray(item.face_boxes, np.float64)
        T = min(len(frames), int(item.num_frames), len(boxes))
        audio = np.asarray(item.audio, np.float32)
        if int(item.sample_rate) != SAMPLE_RATE:
            from math import gcd

            from scipy.signal import resample_poly

            g = gcd(int(item.sample_rate), SAMPLE_RATE)
            audio = resample_poly(audio, SAMPLE_RATE // g, int(item.sample_rate) // g).astype(np.float32)
        try:
            s = _score_any_fps(self.model, frames[:T], boxes[:T], audio, float(item.fps), self.max_offset,
                               int(item.audio_pad_frames), self.batch_size, self.crop_scale)
        except ValueError as e:
            raise StageError("sync_unscorable", f"{item.key}: SyncNet cannot score this clip: {e}") from None
        fc = s.frame_confidence
        extra = dict(self._fingerprint)
        extra.update({
            "syncnet_offset": int(s.syncnet_offset), "windows": int(s.num_windows),
            "frame_conf_mean": round(float(fc.mean()), 4) if len(fc) else None,
            "frame_conf_min": round(float(fc.min()), 4) if len(fc) else None,
        })
        return SyncResult(
            backend=self.name, offset_frames=int(s.offset_frames), confidence=float(s.confidence),
            offsets=s.offsets, curve=s.curve, curve_kind="distance", min_distance=float(s.min_distance),
            extra=extra,
        )
