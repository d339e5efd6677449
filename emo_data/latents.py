"""Pre-encoded VAE latents as a shard member (``latents.npy``), so training can skip video decoding and the VAE.

``emo-data add-latents SHARDS --vae DIR [--resolution 512]`` rewrites each shard in place (like
``add-features``: a temporary file renamed over the old one): every sample's mp4 is decoded once,
its frames resized to ``resolution`` (OpenCV ``INTER_AREA``, the same resize the trainer applies to
decoded frames) and encoded by the ``AutoencoderKL`` in ``DIR``. The member holds the posterior
**mean**, unscaled, float16 ``[T, C, resolution/8, resolution/8]``; the json gets::

    "latents": {"vae": DIR, "vae_fingerprint": "<sha256 of the VAE config + weights, 16 hex>",
                "resolution": R, "channels": C, "latent_size": R/8, "scaling_factor": 0.18215,
                "dtype": "float16", "kind": "posterior mean, unscaled"}

Training (``emo_model.train_data.check_contract``) uses them when every usable sample has them at the
training resolution and the fingerprint matches the training VAE. Differences from decoding +
encoding at every step: the posterior mean instead of a posterior sample, and float16 storage.
Size: ``T * C * (R/8)^2 * 2`` bytes per clip (250 frames at 512: 8 MB, more than the mp4).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

MEMBER = "latents.npy"


def vae_fingerprint(vae_dir: str) -> str:
    """sha256 (16 hex digits) of a VAE directory's ``config.json`` and weight files."""
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(vae_dir, "config.json")) + glob.glob(os.path.join(vae_dir, "*.safetensors"))
                   + glob.glob(os.path.join(vae_dir, "*.bin")))
    if not files:
        raise FileNotFoundError(f"{vae_dir}: no config.json / weights (not an AutoencoderKL directory)")
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> ``[T, size, size, 3]`` with OpenCV ``INTER_AREA`` (the trainer's resize
    of decoded frames too, so latents and pixels see the same image)."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    import cv2

    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


class LatentEncoder:
    """An ``AutoencoderKL`` loaded once; ``encode(frames)`` -> float16 posterior means."""

    def __init__(self, vae_dir: str, device: Optional[str] = None, batch_size: int = 8):
        import torch
        from diffusers import AutoencoderKL

        self.vae_dir = os.path.abspath(vae_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = AutoencoderKL.from_pretrained(self.vae_dir).eval().to(self.device)
        self.batch_size = int(batch_size)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.fingerprint = vae_fingerprint(self.vae_dir)

    def encode(self, frames: np.ndarray, resolution: int) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` -> float16 ``[T, C, resolution/8, resolution/8]`` (unscaled means)."""
        import torch

        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's {self.downsample}x downsampling")
        pix = resize_frames(frames, resolution)
        out = []
        with torch.inference_mode():
            for i in range(0, len(pix), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(pix[i : i + self.batch_size])).permute(0, 3, 1, 2)
                x = x.to(self.device, torch.float32).div(127.5).sub(1.0)
                out.append(self.vae.encode(x).latent_dist.mean.float().cpu().numpy())
        return np.concatenate(out).astype(np.float16)

    def metadata(self, resolution: int) -> dict:
        return {
            "vae": self.vae_dir, "vae_fingerprint": self.fingerprint, "resolution": int(resolution),
            "channels": int(self.vae.config.latent_channels), "latent_size": int(resolution) // self.downsample,
            "scaling_factor": float(self.vae.config.scaling_factor), "dtype": "float16", "kind": "posterior mean, unscaled",
        }


def add_latents(shards: Sequence[str], vae_dir: str, resolution: Optional[int] = None, device: Optional[str] = None,
                batch_size: int = 8, progress: bool = True) -> int:
    """Add / replace ``latents.npy`` in every sample of ``shards`` (local files). Returns the sample count.

    ``resolution`` defaults to each clip's crop size (no resize)."""
    from tqdm import tqdm

    from .shards import SampleMeta, decode_mp4, npy_bytes, rewrite_shard

    encoder = LatentEncoder(vae_dir, device=device, batch_size=batch_size)
    total = 0
    for shard in tqdm(list(shards), unit="shard", disable=not progress):
        def transform(raw):
            meta = SampleMeta.from_json(raw["json"])
            size = int(resolution or meta.crop_size)
            frames = decode_mp4(raw["mp4"])
            if len(frames) != int(meta.num_frames):
                raise ValueError(f"{shard}:{raw['__key__']}: mp4 has {len(frames)} frames, json says {meta.num_frames}")
            raw[MEMBER] = npy_bytes(encoder.encode(frames, size))
            meta.latents = encoder.metadata(size)
            raw["json"] = meta.to_json()
            return raw

        total += rewrite_shard(shard, transform)
    return total
