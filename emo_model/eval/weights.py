"""Local weight files for the evaluation networks: provenance (path + SHA-256) and safe loading.

Nothing is downloaded. A weights file is read as ``.safetensors`` or as a torch file with
``torch.load(weights_only=True)`` (tensors and plain containers only: no code from the file runs).
A metric whose file is missing raises :class:`WeightsMissing`, which the scorer turns into
``skipped: <reason>`` instead of a number.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Optional

TORCH_EXTS = (".pth", ".pt", ".ckpt", ".bin", ".model", ".tar")
_SHA_CACHE: dict[tuple[str, int, float], str] = {}

# Conventional file names looked up under ``--weights-dir`` (first match wins), per network.
KNOWN_FILES: dict[str, tuple[str, ...]] = {
    # torch-fidelity's and pytorch-fid's converted TF Inception (same keys, same 6726825d file)
    "inception": ("inception.safetensors", "pt_inception-2015-12-05-6726825d.pth",
                  "weights-inception-2015-12-05-6726825d.pth"),
    # InceptionI3d (Kinetics-400 RGB) state dict: ours converted, or piergiaj's rgb_imagenet.pt
    "i3d": ("i3d.safetensors", "i3d_rgb_imagenet.safetensors", "rgb_imagenet.pt"),
    # syncnet_python's weights, loaded by emo_data.sync.syncnet.load_syncnet
    "syncnet": ("syncnet_v2.model", "syncnet.safetensors"),
    # Deep3DFaceRecon_pytorch: checkpoint and the standard 3-D landmarks from its BFM folder
    "deep3d": ("deep3d.safetensors", "epoch_20.pth"),
    "deep3d_lm3d": ("similarity_Lm3D_all.mat",),
}


class WeightsMissing(RuntimeError):
    """The metric cannot run: its weights were not given or are not on disk."""


@dataclass(frozen=True)
class WeightsInfo:
    path: str
    sha256: str          # full hex digest of the file

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256[:16]}


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weights_info(path: Optional[str], what: str) -> WeightsInfo:
    """Provenance of ``path``; :class:`WeightsMissing` naming ``what`` when there is no file."""
    if not path:
        raise WeightsMissing(f"no {what} weights given (see docs/eval.md, 'Weights')")
    if not os.path.isfile(path):
        raise WeightsMissing(f"{what} weights not found at {path}")
    return WeightsInfo(os.path.abspath(path), file_sha256(path))


def find_known(weights_dir: Optional[str], network: str) -> Optional[str]:
    """The first conventional file for ``network`` under ``weights_dir`` (None if absent)."""
    if not weights_dir:
        return None
    for name in KNOWN_FILES[network]:
        path = os.path.join(weights_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_tensors(path: str, subkey: Optional[str] = None) -> dict[str, Any]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or a torch file (``weights_only=True``).

    ``subkey``: the entry holding the state dict in a checkpoint dict (e.g. ``"net_recon"``);
    ``"state_dict"`` is unwrapped automatically. ``module.`` prefixes (DataParallel) are dropped.
    """
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a pickle with code is refused, not executed
            raise ValueError(
                f"{path}: cannot be read as plain tensors with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); convert it to "
                "safetensors on a machine you trust (docs/eval.md)") from exc
    if subkey is not None and isinstance(obj, dict) and subkey in obj:
        obj = obj[subkey]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict ({type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if torch.is_tensor(value):
            out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        raise ValueError(f"{path}: holds no tensors" + (f" under {subkey!r}" if subkey else ""))
    return out


def load_into(module, state: dict[str, Any], path: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the first mismatches."""
    own = module.state_dict()
    # checkpoints saved before PyTorch 0.4.1 have no batch-norm step counters (unused in eval)
    state = dict(state, **{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
        raise ValueError(
            f"{path} does not fit {type(module).__name__}: "
            + "; ".join(p for p in (f"missing {few(missing)}" if missing else "",
                                     f"unexpected {few(unexpected)}" if unexpected else "",
                                     f"shape differs for {few(bad_shape)}" if bad_shape else "") if p))
    module.load_state_dict(state, strict=True)
