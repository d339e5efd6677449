"""Reading SD1.5 UNet and AnimateDiff motion-module weights (no pickle: safetensors, or
``torch.load(weights_only=True)`` for ``.ckpt``/``.pt``/``.pth`` state dicts)."""
from __future__ import annotations

import glob
import json
import logging
import os
import re

import torch

from .unet import sinusoidal_table

logger = logging.getLogger(__name__)

TORCH_EXTS = (".ckpt", ".pt", ".pth", ".bin")


def load_state_dict_file(path: str) -> dict:
    """A tensor state dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith(TORCH_EXTS):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: not a state dict ({type(obj).__name__})")
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}
    raise ValueError(f"{path}: unsupported weights file (use .safetensors, .ckpt, .pt, .pth)")


def _model_files(directory: str, stem: str = "diffusion_pytorch_model") -> list[str]:
    for pattern in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.json",
                    f"{stem}.fp16.safetensors.index.json", f"{stem}.bin", f"{stem}.fp16.bin"):
        path = os.path.join(directory, pattern)
        if os.path.isfile(path):
            if path.endswith(".index.json"):
                with open(path) as fh:
                    shards = sorted(set(json.load(fh)["weight_map"].values()))
                return [os.path.join(directory, s) for s in shards]
            return [path]
    found = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if len(found) == 1:
        return found
    raise FileNotFoundError(f"no {stem}.safetensors in {directory}")


def load_sd_unet_state_dict(unet_dir: str) -> dict:
    state = {}
    for f in _model_files(unet_dir):
        state.update(load_state_dict_file(f))
    return state


# ---------------------------------------------------------------------------- motion modules
_DIFFUSERS_MM = re.compile(r"^(.*\.motion_modules\.\d+)\.(.*)$")


def motion_module_to_original(state: dict) -> dict:
    """diffusers ``MotionAdapter`` keys -> original AnimateDiff keys (inverse of diffusers'
    ``convert_animatediff_checkpoint_to_diffusers``); original keys pass through."""
    out = {}
    for key, value in state.items():
        if ".temporal_transformer." in key:
            out[key] = value
            continue
        m = _DIFFUSERS_MM.match(key)
        if not m:
            out[key] = value
            continue
        head, tail = m.groups()
        tail = (
            tail.replace(".attn1.", ".attention_blocks.0.")
            .replace(".attn2.", ".attention_blocks.1.")
            .replace(".norm1.", ".norms.0.")
            .replace(".norm2.", ".norms.1.")
            .replace(".norm3.", ".ff_norm.")
        )
        out[f"{head}.temporal_transformer.{tail}"] = value
    return out


def read_motion_module(path: str) -> dict:
    if os.path.isdir(path):
        state = {}
        for f in _model_files(path):
            state.update(load_state_dict_file(f))
    else:
        state = load_state_dict_file(path)
    # some exports prefix keys (e.g. "module." or "unet.")
    for prefix in ("module.", "unet.", "model.diffusion_model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return motion_module_to_original(state)


def load_motion_module_into(backbone: torch.nn.Module, path: str, strict: bool = True) -> dict:
    """Copy AnimateDiff motion-module weights into ``backbone``'s temporal modules by name.

    Positional-encoding tables (``pos_encoder.pe``, ``pos_embed``) are not copied: ours are the
    same sinusoid (checked on the overlapping frames, a mismatch is logged) computed for
    ``temporal_max_len``. EMO's speed attention has no AnimateDiff counterpart and stays
    zero-initialised. With ``strict``, keys the backbone lacks and shape mismatches raise.
    """
    state = read_motion_module(path)
    own = {k: v for k, v in backbone.state_dict().items() if ".motion_modules." in k}
    if not any(".motion_modules." in k for k in state):
        raise ValueError(f"{path}: no motion_modules keys; not an AnimateDiff motion module")
    load, skipped_pe, unexpected, bad_shape = {}, 0, [], []
    for key, value in state.items():
        if "pos_encoder" in key or "pos_embed" in key:
            skipped_pe += 1
            if key.endswith("pos_encoder.pe") and value.ndim == 3:
                ref = sinusoidal_table(value.shape[1], value.shape[2])
                if not torch.allclose(value.float(), ref, atol=1e-4):
                    logger.warning("%s: positional table differs from the sinusoid; ours is used", key)
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if own[key].shape != value.shape:
            bad_shape.append((key, tuple(value.shape), tuple(own[key].shape)))
            continue
        load[key] = value
    if strict and (unexpected or bad_shape):
        raise ValueError(
            f"{path}: {len(unexpected)} keys without a place in the backbone (e.g. {unexpected[:3]}), "
            f"{len(bad_shape)} shape mismatches (e.g. {bad_shape[:3]}); is this a motion module for this UNet size?"
        )
    missing = [k for k in own if k not in load and ".speed_" not in k]
    if missing:
        modules = sorted({k.split(".temporal_transformer.")[0] for k in missing})
        logger.warning("motion module %s leaves %d keys at init (modules %s)", path, len(missing), modules[:8])
    backbone.load_state_dict(load, strict=False)
    return {"loaded": len(load), "skipped_pe": skipped_pe, "untouched": missing, "unexpected": unexpected}
