"""The weight-free sync scorer (default when no SyncNet weights are given).

Mouth cues (the inner-lip opening from landmarks, and the darkness of the inner mouth from the
clip's pixels) are compared with the speech envelope of the clip's audio at every offset in
``[-max_offset, +max_offset]`` frames. Each cue and the envelope are low-passed (8 Hz) and
differentiated, so what is matched is *when the mouth opens or closes* against *when the sound
rises or falls*; the curve is the mean of the cues' correlation curves.

``confidence`` is calibrated on the clip itself: the curve's peak in standard deviations above
the correlations of the same mouth signal with the clip's own audio rotated by 1 s or more
(audio that surely does not belong to those frames). About 2-2.5 is what the best of 31
offsets reaches by chance.

Measured limits (docs/sync.md has the table and the command): on 2-10 s clips this cue is
weak. It finds plausible offsets on most real talking heads, but a voice from another speaker
reaches the same confidence as the true voice, so this backend does not reject ``out_of_sync``
by default and corrects an offset only at a high confidence. Use the SyncNet backend for
dubbing and offset decisions; frozen faces are caught by the static-face check either way.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..stage import StageError
from .base import SyncBackend, SyncInput, SyncResult
from .signals import mouth_opening, speech_envelope, supports

_MIN_NULL_SHIFT_S = 1.0


def _lowpass_derivative(x: np.ndarray, fps: float) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    x = np.asarray(x, np.float64)
    if len(x) > 15:
        sos = butter(2, min(8.0, 0.4 * fps), btype="low", fs=fps, output="sos")
        x = sosfiltfilt(sos, x)
    return np.gradient(x) if len(x) > 1 else np.zeros_like(x)


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    s = x.std()
    return x / s if s > 1e-12 else np.zeros_like(x)


class EnvelopeSyncBackend(SyncBackend):
    name = "envelope"
    needs_pixels = False
    uses_gpu = False

    def score(self, item: SyncInput) -> SyncResult:
        T = int(item.num_frames)
        pad = int(item.audio_pad_frames)
        if T < 8:
            raise StageError("sync_unscorable", f"{item.key}: {T} frames are too few to score lip sync")
        envelope = speech_envelope(item.audio, item.sample_rate, item.fps)
        if len(envelope) < T + 2 * pad:
            envelope = np.pad(envelope, (0, T + 2 * pad - len(envelope)), mode="edge")
        env = _lowpass_derivative(envelope, item.fps)
        cues: dict[str, np.ndarray] = {}
        if supports(item.landmark_format):
            cues["lip_opening"] = mouth_opening(item.landmarks, item.landmark_format)
        if item.mouth_darkness is not None:
            cues["mouth_darkness"] = np.asarray(item.mouth_darkness, np.float64)
        if not cues:
            raise StageError("sync_unscorable", f"{item.key}: no mouth cue for landmark format {item.landmark_format!r}")
        max_offset = min(self.max_offset, pad)
        offsets = list(range(-max_offset, max_offset + 1))
        curves = []
        nulls = []
        own = env[pad:pad + T]
        shifts = [s for s in range(int(_MIN_NULL_SHIFT_S * item.fps), T - int(_MIN_NULL_SHIFT_S * item.fps) + 1)]
        for cue in cues.values():
            v = _zscore(_lowpass_derivative(cue[:T], item.fps))
            curves.append([float(np.mean(v * _zscore(env[pad + k:pad + k + T]))) for k in offsets])
            nulls.append([float(np.mean(v * _zscore(np.roll(own, s)))) for s in shifts])
        curve = np.mean(curves, axis=0)
        best = int(np.argmax(curve))
        if len(shifts) >= 10:
            null = np.mean(nulls, axis=0)
        else:  # a clip under ~3 s: the far ends of the curve are the best stand-in for chance
            null = np.concatenate([curve[:5], curve[-5:]])
        confidence = float((curve[best] - null.mean()) / max(float(null.std()), 1e-6))
        per_cue = {name: int(offsets[int(np.argmax(c))]) for name, c in zip(cues, curves)}
        return SyncResult(
            backend=self.name, offset_frames=int(offsets[best]), confidence=round(confidence, 4),
            offsets=offsets, curve=[float(c) for c in curve], curve_kind="correlation",
            extra={"peak_correlation": round(float(curve[best]), 4), "cue_offsets": per_cue,
                   "null_shifts": len(shifts) if len(shifts) >= 10 else 0},
        )


def make_sync_backend(name: str, syncnet_weights: Optional[str] = None, max_offset: int = 15,
                      device: str = "cpu") -> SyncBackend:
    """``auto``: SyncNet when weights are given, else the weight-free envelope scorer."""
    if name == "auto":
        name = "syncnet" if syncnet_weights else "envelope"
    if name == "envelope":
        return EnvelopeSyncBackend(max_offset=max_offset, device=device)
    if name == "syncnet":
        if not syncnet_weights:
            raise ValueError("the syncnet sync backend needs --syncnet-weights PATH (syncnet_v2.model or a "
                             ".safetensors conversion); see docs/sync.md")
        from .syncnet import SyncNetBackend

        return SyncNetBackend(weights=syncnet_weights, max_offset=max_offset, device=device)
    raise ValueError(f"unknown sync backend {name!r}: choose auto, envelope or syncnet")
