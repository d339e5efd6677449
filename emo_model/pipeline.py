"""``EMOPipeline``: portrait + voice -> talking-head video of the audio's length.

Clips of ``f`` frames (12) are generated one after another; the last ``n`` (4) latents of a clip
are the next clip's motion frames (the first clip has zero motion features). Per clip the
ReferenceNet runs **once** (reference + motion frames); audio tokens, speed embedding and face
embedding are also computed once per clip; only the backbone runs at every DDIM step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .conditioning import constant_speed_buckets, mask_from_box, window_frames
from .media import CROP_SCALE, SAMPLE_RATE, crop_resize, detect_face_box, load_audio, load_image, square_crop_box

logger = logging.getLogger(__name__)

W2V_STRIDE, W2V_FIELD = 320, 400  # wav2vec 2.0 total stride / receptive field (samples)


def num_video_frames(num_samples: int, fps: float = 25.0, sample_rate: int = SAMPLE_RATE) -> int:
    """Frames needed to cover the audio: ``ceil(samples / (sample_rate / fps))`` (640 samples at 25 fps)."""
    per_frame = sample_rate / fps
    return max(1, int(math.ceil(num_samples / per_frame - 1e-9)))


def resample_to_frames(hidden: torch.Tensor, num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """``[N, ...]`` wav2vec frames (50 Hz) -> ``[num_frames, ...]``, linear interpolation at each video
    frame's centre; the same alignment as the data side (``emo_data.audio_features.resample_frames``):
    wav2vec frame i is centred at ``320 i + 200`` samples, video frame t at ``(t + 0.5) / fps`` s."""
    n = hidden.shape[0]
    t = (torch.arange(num_frames, dtype=torch.float64) + 0.5) / float(fps)
    pos = ((t * sample_rate - W2V_FIELD / 2) / W2V_STRIDE).clamp(0, max(n - 1, 0))
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(torch.float32).reshape(-1, *([1] * (hidden.ndim - 1))).to(hidden.device)
    h = hidden.float()
    return h[lo] * (1.0 - w) + h[hi] * w


@dataclass
class EMOPipelineOutput(BaseOutput):
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # float32 mono samples at 16 kHz
    fps: float
    face_mask: np.ndarray  # uint8 [S, S] 0/255 used by the face locator
    face_box_source: str
    reference: np.ndarray  # the cropped portrait [S, S, 3] uint8


class EMOPipeline(DiffusionPipeline):
    """VAE + EMOModel (backbone, ReferenceNet, audio/speed/face layers) + wav2vec2 + DDIM."""

    model_cpu_offload_seq = "audio_encoder->emo->vae"

    def __init__(self, vae, emo, audio_encoder, feature_extractor, scheduler):
        super().__init__()
        self.register_modules(vae=vae, emo=emo, audio_encoder=audio_encoder, feature_extractor=feature_extractor, scheduler=scheduler)

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.emo.config.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode_audio(self, samples: np.ndarray, num_frames: int, fps: float = 25.0) -> torch.Tensor:
        """16 kHz mono float32 -> ``[num_frames, L, D]`` wav2vec hidden states per video frame."""
        device = self._execution_device
        fe = self.feature_extractor
        x = np.asarray(samples, dtype=np.float32)
        if len(x) < W2V_FIELD:
            x = np.pad(x, (0, W2V_FIELD - len(x)))
        if fe is not None and getattr(fe, "do_normalize", True):
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        wav = torch.from_numpy(x)[None].to(device=device, dtype=self.audio_encoder.dtype)
        out = self.audio_encoder(wav, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=0)[:, 0]  # [L, N, D]
        layers = self.emo.config.audio_layers
        if hidden.shape[0] != layers:
            raise ValueError(f"audio encoder gives {hidden.shape[0]} hidden states, the EMO model expects {layers}")
        return resample_to_frames(hidden.permute(1, 0, 2), num_frames, fps)  # [T, L, D] float32

    def prepare_reference(self, image, size: int, crop: str = "center", face_box=None):
        """Portrait -> (cropped uint8 [S, S, 3], face box in crop pixels or None, how the box was found)."""
        img = load_image(image)
        how = "given box"
        if face_box is None:
            face_box, how = detect_face_box(img)
        crop_box = square_crop_box(img.shape, face_box if crop == "face" else None)
        ref = crop_resize(img, crop_box, size)
        box = None
        if face_box is not None:
            x0, y0, side = crop_box
            s = size / side
            box = (np.asarray(face_box, dtype=np.float32) - np.array([x0, y0, x0, y0], dtype=np.float32)) * s
        return ref, box, how

    @staticmethod
    def face_mask_for(box, size: int, scale: float = 1.2) -> np.ndarray:
        """uint8 [S, S] mask: the face box enlarged ``scale`` x around its centre (at inference there
        is one box; in training the mask is the union of the clip's boxes, which is wider)."""
        x0, y0, x1, y1 = [float(v) for v in box]
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
        return mask_from_box((cx - hw, cy - hh, cx + hw, cy + hh), size)

    @staticmethod
    def default_face_box(size: int, crop_scale: float = CROP_SCALE) -> tuple:
        """Centred box of side S / crop_scale (the data side's crops are CROP_SCALE x the face box)."""
        side = size / crop_scale
        lo = (size - side) / 2
        return (lo, lo, lo + side, lo + side)

    # ------------------------------------------------------------------ sampling
    def __call__(self, *args, **kwargs) -> EMOPipelineOutput:
        """See :meth:`generate`; runs every module in eval mode (wav2vec2's LayerDrop and dropout
        would otherwise change the features and break seeding) and restores the modes after."""
        modules = [m for m in (self.vae, self.emo, self.audio_encoder) if isinstance(m, torch.nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return self.generate(*args, **kwargs)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    @torch.no_grad()
    def generate(
        self,
        image,
        audio: Union[str, np.ndarray],
        num_inference_steps: int = 40,
        guidance_scale: float = 3.5,
        audio_guidance_scale: Optional[float] = None,
        speed: float = 0.5,
        face_mask: Optional[np.ndarray] = None,
        face_box=None,
        mask_scale: float = 1.2,
        crop: str = "center",
        fps: float = 25.0,
        height: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        max_frames: Optional[int] = None,
        decode_chunk: int = 4,
        progress: bool = True,
        callback: Optional[Callable[[int, int], None]] = None,
    ) -> EMOPipelineOutput:
        """Generate a video for the whole ``audio``.

        Args:
            image: portrait (path, PIL image or uint8 array).
            audio: path (anything PyAV decodes) or float32 mono samples at 16 kHz.
            guidance_scale: classifier-free guidance on reference + audio jointly (unconditional =
                no reference tokens and all-zero audio features). 1 disables guidance.
            audio_guidance_scale: if set, a third pass separates the two: ``eps = u +
                guidance_scale (r - u) + audio_guidance_scale (ra - r)``.
            speed: constant target head speed (deg/frame; paper: 0.1-1.0 speech, 1.0-1.3 singing).
            face_mask: uint8/float [S, S] mask (overrides detection); all ones = no face guidance.
            face_box: x0, y0, x1, y1 in the *input image's* pixels (else detected, else a centred default).
            crop: "center" (largest centred square) or "face" (square of CROP_SCALE x the face box, like the data side).
            max_frames: cap on generated frames (default: cover the audio).
        """
        device = self._execution_device
        emo = self.emo
        dtype = emo.dtype
        cfg = emo.config
        size = height or self.resolution
        f, n = int(cfg.num_frames), int(cfg.num_motion_frames)
        samples = load_audio(audio) if isinstance(audio, str) else np.asarray(audio, dtype=np.float32).reshape(-1)
        total = num_video_frames(len(samples), fps)
        if max_frames is not None:
            total = min(total, int(max_frames))
        clips = int(math.ceil(total / f))

        # --- reference image, face mask
        ref_img, box, how = self.prepare_reference(image, size, crop, face_box)
        if face_mask is not None:
            mask = np.asarray(face_mask)
            mask = (mask > (127 if mask.dtype == np.uint8 else 0.5)).astype(np.uint8) * 255
            if mask.shape != (size, size):
                from PIL import Image

                mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
            source = "given mask"
        elif box is not None and self.face_mask_for(box, size, mask_scale).any():
            mask, source = self.face_mask_for(box, size, mask_scale), how
        else:
            if box is not None:
                how = f"{how}, but the box lies outside the square crop"
            mask = self.face_mask_for(self.default_face_box(size), size, 1.0)
            source = f"default centred box ({how})"
            logger.warning("no face box (%s): using a centred default face region", how)

        ref = torch.from_numpy(np.array(ref_img)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        ref_latent = self.vae.encode(ref.to(device=device, dtype=self.vae.dtype)).latent_dist.mode()
        ref_latent = (ref_latent * self.vae.config.scaling_factor).to(dtype)
        mask_t = torch.from_numpy(mask).float().div(255.0)[None, None].to(device=device, dtype=dtype)
        face_emb = emo.encode_face(mask_t)

        # --- audio features for the whole track, padded to whole clips (edge frames repeated)
        feats = self.encode_audio(samples, total, fps)  # [T, L, D]
        pad = clips * f - total
        if pad:
            feats = torch.cat([feats, feats[-1:].expand(pad, -1, -1)], dim=0)
        feats = window_frames(feats[None], cfg.audio_window, dim=1).to(dtype)  # [1, T', 2m+1, L, D]
        speed_enc = constant_speed_buckets(
            speed, n + f, **({"centers": cfg.speed_centers, "radii": cfg.speed_radii} if cfg.speed_centers else {})
        )
        speed_emb = emo.encode_speed(torch.from_numpy(speed_enc)[None].to(device=device, dtype=dtype))

        use_cfg = guidance_scale != 1.0 or (audio_guidance_scale is not None and audio_guidance_scale != 0)
        lat_shape = (1, emo.config.in_channels, f, size // self.vae_scale_factor, size // self.vae_scale_factor)
        motion = None
        frames_out = []
        bar = self.progress_bar(total=clips * num_inference_steps) if progress else None
        for c in range(clips):
            audio_clip = feats[:, c * f : (c + 1) * f].to(device)
            tokens = emo.encode_audio(audio_clip)
            tokens_null = emo.encode_audio(torch.zeros_like(audio_clip)) if use_cfg else None
            reference = emo.encode_reference(ref_latent, motion)  # once per clip
            latents = torch.randn(lat_shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * self.scheduler.init_noise_sigma
            common = dict(reference=reference, speed_embedding=speed_emb, face_embedding=face_emb)
            caches = {"full": {}, "null_audio": {}}  # audio/speed K,V per clip and branch
            for i, t in enumerate(self.scheduler.timesteps):
                x = self.scheduler.scale_model_input(latents, t)
                eps = emo(x, t, audio_tokens=tokens, cache=caches["full"], **common).sample
                if use_cfg:
                    eps_u = emo(x, t, audio_tokens=tokens_null, use_reference=False, cache=caches["null_audio"], **common).sample
                    if audio_guidance_scale is None:
                        eps = eps_u + guidance_scale * (eps - eps_u)
                    else:
                        eps_r = emo(x, t, audio_tokens=tokens_null, cache=caches["null_audio"], **common).sample
                        eps = eps_u + guidance_scale * (eps_r - eps_u) + audio_guidance_scale * (eps - eps_r)
                latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(c, i)
            motion = latents[:, :, -n:].permute(0, 2, 1, 3, 4)  # [1, n, C, h, w] clean latents
            frames_out.append(self.decode_latents(latents, decode_chunk))
        if bar is not None:
            bar.close()
        frames = np.concatenate(frames_out, axis=0)[:total]
        self.maybe_free_model_hooks()
        return EMOPipelineOutput(frames=frames, audio=samples, fps=fps, face_mask=mask, face_box_source=source, reference=ref_img)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, chunk: int = 4) -> np.ndarray:
        """``[1, C, F, h, w]`` -> uint8 ``[F, H, W, 3]``."""
        x = latents[0].permute(1, 0, 2, 3) / self.vae.config.scaling_factor
        out = []
        for i in range(0, x.shape[0], chunk):
            img = self.vae.decode(x[i : i + chunk].to(self.vae.dtype)).sample
            img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out, axis=0)
