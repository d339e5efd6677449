"""The EMO "weak" conditions: audio projection, speed layers, face locator, and helpers.

Tensor conventions (batch first):

* audio features  ``[B, T, L, D]``  wav2vec hidden states per video frame (L layers, D dims);
  the data side stores them per clip as ``audio_emb.npy`` float16 ``[T, L, D]``.
* speed buckets   ``[B, T, d]``     ``s_i = tanh((w - c_i) / r_i * 3)``; ``speed_buckets.npy``.
* face mask       ``[B, 1, S, S]``  in ``[0, 1]`` (``face_mask.png`` is uint8 0/255).

Windowing (±m frames, paper: m = 2) is done by :func:`window_frames` on the *whole* sequence
before a clip is cut out, so a clip's first frames see the previous clip's audio.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The encoder and its defaults are the shard contract's (EMO publishes neither d nor c_i, r_i):
# s_i = tanh((w - c_i) / r_i * 3) of the head rotation speed w in degrees per frame; a scalar speed
# gives [d], [T] gives [T, d], float32.
from emo_data.shards.contract import (  # noqa: F401 - re-exported
    DEFAULT_SPEED_CENTERS,
    DEFAULT_SPEED_RADII,
    speed_bucket_encoding,
)


def constant_speed_buckets(speed: float, num_frames: int, **kwargs) -> np.ndarray:
    """``[num_frames, d]`` bucket encoding of a constant target speed (inference)."""
    return np.repeat(speed_bucket_encoding(float(speed), **kwargs)[None], num_frames, axis=0)


def window_frames(x: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """Stack each frame with its ±m neighbours: ``[..., T, ...] -> [..., T, 2m+1, ...]``.

    The sequence is edge-padded (first/last frame repeated), so output frame t holds
    ``x[t-m] ... x[t+m]`` in order.
    """
    if m == 0:
        return x.unsqueeze(dim + 1)
    t = x.shape[dim]
    idx = torch.arange(t, device=x.device)[:, None] + torch.arange(-m, m + 1, device=x.device)[None, :]
    idx = idx.clamp_(0, t - 1)  # [T, 2m+1]
    out = x.index_select(dim, idx.reshape(-1))
    shape = list(x.shape)
    shape[dim : dim + 1] = [t, 2 * m + 1]
    return out.reshape(shape)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class AudioProjection(nn.Module):
    """Windowed wav2vec features -> audio tokens per frame.

    ``[B, F, 2m+1, L, D]`` (or ``[B, F, L, D]``, windowed here without context) ->
    ``[B, F, num_tokens, token_dim]``. The paper states only "concatenate the neighbouring
    frames' features"; the MLP shape (flatten -> 512 -> 512 -> tokens, LayerNorm) follows the
    public EMO-style reimplementations (V-Express / Hallo audio projection).
    """

    def __init__(
        self,
        num_layers: int,
        feature_dim: int,
        window: int = 2,
        hidden_dim: int = 512,
        num_tokens: int = 32,
        token_dim: int = 768,
    ):
        super().__init__()
        self.window = window
        self.num_layers = num_layers
        self.feature_dim = feature_dim
        self.num_tokens = num_tokens
        self.token_dim = token_dim
        in_dim = (2 * window + 1) * num_layers * feature_dim
        self.proj1 = nn.Linear(in_dim, hidden_dim)
        self.proj2 = nn.Linear(hidden_dim, hidden_dim)
        self.proj3 = nn.Linear(hidden_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.ndim == 4:  # [B, F, L, D], not windowed yet
            audio = window_frames(audio, self.window, dim=1)
        b, f, w, n_layers, d = audio.shape
        if (w, n_layers, d) != (2 * self.window + 1, self.num_layers, self.feature_dim):
            raise ValueError(
                f"audio features {tuple(audio.shape)}: expected [B, F, {2 * self.window + 1}, "
                f"{self.num_layers}, {self.feature_dim}] (window, wav2vec layers, dims)"
            )
        x = audio.reshape(b * f, w * n_layers * d).to(self.proj1.weight.dtype)
        x = F.silu(self.proj1(x))
        x = F.silu(self.proj2(x))
        x = self.proj3(x).reshape(b, f, self.num_tokens, self.token_dim)
        return self.norm(x)


class SpeedProjection(nn.Module):
    """Windowed speed-bucket encodings ``[B, F, 2m+1, d]`` -> per-frame embedding ``[B, F, dim]``."""

    def __init__(self, num_buckets: int = 9, window: int = 2, hidden_dim: int = 256, out_dim: int = 256):
        super().__init__()
        self.window = window
        self.num_buckets = num_buckets
        in_dim = (2 * window + 1) * num_buckets
        self.proj1 = nn.Linear(in_dim, hidden_dim)
        self.proj2 = nn.Linear(hidden_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, speed: torch.Tensor) -> torch.Tensor:
        if speed.ndim == 3:  # [B, F, d]
            speed = window_frames(speed, self.window, dim=1)
        b, f, w, d = speed.shape
        if (w, d) != (2 * self.window + 1, self.num_buckets):
            raise ValueError(
                f"speed buckets {tuple(speed.shape)}: expected [B, F, {2 * self.window + 1}, {self.num_buckets}]"
            )
        x = speed.reshape(b, f, w * d).to(self.proj1.weight.dtype)
        x = self.proj2(F.silu(self.proj1(x)))
        return self.norm(x)


class FaceLocator(nn.Module):
    """Light conv encoder of the face-union mask, output at latent resolution, zero-initialised.

    ``[B, 1, S, S]`` -> ``[B, out_channels, S/8, S/8]`` (three stride-2 convs). The layout follows
    AnimateAnyone's pose guider (16-32-64-128 channels, SiLU); the paper only says "a few light
    convolution layers".
    """

    def __init__(self, out_channels: int = 320, channels: Sequence[int] = (16, 32, 64, 128), downsample: int = 8):
        super().__init__()
        n_down = int(round(np.log2(downsample)))
        if 2**n_down != downsample or len(channels) != n_down + 1:
            raise ValueError(f"face locator: {len(channels)} channel stages for a /{downsample} encoder, need {n_down + 1}")
        self.conv_in = nn.Conv2d(1, channels[0], 3, padding=1)
        blocks = []
        for i in range(n_down):
            blocks.append(nn.Conv2d(channels[i], channels[i], 3, padding=1))
            blocks.append(nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_module(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(mask.to(self.conv_in.weight.dtype)))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def mask_from_box(box, size: int, height: Optional[int] = None) -> np.ndarray:
    """uint8 ``[H, W]`` 0/255 mask with the box ``x0, y0, x1, y1`` (pixels) set."""
    h = height or size
    m = np.zeros((h, size), dtype=np.uint8)
    x0, y0, x1, y1 = [int(round(float(v))) for v in box]
    m[max(y0, 0) : max(min(y1, h), 0), max(x0, 0) : max(min(x1, size), 0)] = 255
    return m


def interpolate_features(hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[L, N, D]`` encoder frames (50 Hz for wav2vec2) -> ``[num_frames, L, D]`` by linear interpolation."""
    x = hidden.permute(0, 2, 1).float()  # [L, D, N]
    x = F.interpolate(x, size=num_frames, mode="linear", align_corners=True)
    return x.permute(2, 0, 1).contiguous()  # [T, L, D]
