"""Random-weight files with the real networks' keys, for tests and for trying ``emo-eval`` end to end.

``emo-eval make-test-weights DIR`` writes them under the conventional names that ``--weights-dir``
looks up. Numbers computed with them exercise the real loading and computing code but measure
nothing: never report them.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

RANDOM_FILES = {
    "inception": "inception.safetensors",
    "i3d": "i3d.safetensors",
    "syncnet": "syncnet.safetensors",
    "deep3d": "deep3d.safetensors",
    "deep3d_lm3d": "similarity_Lm3D_all.mat",
}


def random_syncnet_state(seed: int = 0) -> Optional[dict]:
    """Random SyncNet weights from the data side's network (None if that module is not there)."""
    try:
        from emo_data.sync.syncnet import SyncNet
    except ImportError:
        return None
    import torch

    torch.manual_seed(seed)
    net = SyncNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                module.running_var.fill_(1.0)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def standard_face_lm3d() -> np.ndarray:
    """A plausible 68 x 3 frontal landmark set (units ~ decimetres, y up) for a test ``.mat``: the
    iBUG layout of emo_data's fixtures lifted to 3-D. Not the BFM's file."""
    pts = []
    for i in range(17):
        th = np.pi * i / 16
        pts.append((-0.5 * np.cos(th), 0.2 - 0.67 * np.sin(th), -0.1 * np.sin(th)))
    for x0, x1 in ((-0.4, -0.08), (0.08, 0.4)):
        for j in range(5):
            pts.append((x0 + (x1 - x0) * j / 4, 0.28 + 0.05 * np.sin(np.pi * j / 4), 0.05))
    for j in range(4):
        pts.append((0.0, 0.18 - 0.08 * j, 0.1 + 0.04 * j))
    for j in range(5):
        pts.append((-0.1 + 0.05 * j, -0.1, 0.12))
    for cx in (-0.2, 0.2):
        for j in range(6):
            th = 2 * np.pi * j / 6
            pts.append((cx - 0.08 * np.cos(th), 0.12 + 0.03 * np.sin(th), 0.03))
    for j in range(12):
        th = 2 * np.pi * j / 12
        pts.append((-0.18 * np.cos(th), -0.28 + 0.06 * np.sin(th), 0.08))
    for j in range(8):
        th = 2 * np.pi * j / 8
        pts.append((-0.11 * np.cos(th), -0.28 + 0.025 * np.sin(th), 0.08))
    return np.array(pts, np.float64)


def write_test_weights(directory: str, seed: int = 0, networks: Optional[list[str]] = None) -> dict[str, str]:
    """Write random weights for ``networks`` (default all) under ``directory``; returns {network: path}."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    networks = list(networks or RANDOM_FILES)
    written = {}
    for name in networks:
        path = os.path.join(directory, RANDOM_FILES[name])
        if name == "inception":
            from .inception import random_inception_state

            save_file(random_inception_state(seed), path)
        elif name == "i3d":
            from .i3d import random_i3d_state

            save_file(random_i3d_state(seed), path)
        elif name == "syncnet":
            state = random_syncnet_state(seed)
            if state is None:
                continue
            save_file(state, path)
        elif name == "deep3d":
            from .expression import random_deep3d_state

            save_file(random_deep3d_state(seed), path)
        elif name == "deep3d_lm3d":
            from scipy.io import savemat

            savemat(path, {"lm": standard_face_lm3d()})
        else:
            raise ValueError(f"unknown network {name!r}")
        written[name] = path
    return written
