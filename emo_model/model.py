"""``EMOModel``: backbone + ReferenceNet + audio projection + speed layers + face locator, one diffusers model."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from .conditioning import AudioProjection, FaceLocator, SpeedProjection
from .unet import Conditions, UNetCore, UNetSettings

logger = logging.getLogger(__name__)

# UNet2DConditionModel config keys we take over from an SD1.x ``unet/config.json``.
SD_UNET_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
    "up_block_types", "cross_attention_dim", "attention_head_dim", "norm_num_groups", "norm_eps",
    "flip_sin_to_cos", "freq_shift", "use_linear_projection", "upcast_attention", "sample_size",
)
SUPPORTED_DOWN = {"CrossAttnDownBlock2D", "DownBlock2D"}
SUPPORTED_UP = {"CrossAttnUpBlock2D", "UpBlock2D"}


@dataclass
class ReferenceFeatures:
    """One ReferenceNet pass: reused by every denoising step of a clip."""

    reference: dict  # transformer-block key -> [B, H*W, C] (self-attention inputs of the reference image)
    motion: Optional[dict]  # motion-module key -> [B * n, C, H, W] (None: first clip, zeros are used)
    num_motion_frames: int
    kv_cache: dict = field(default_factory=dict)  # backbone reference / text K,V per block, filled lazily (no-grad)


@dataclass
class EMOModelOutput(BaseOutput):
    sample: torch.Tensor  # [B, C, F, H, W]


class EMOModel(ModelMixin, ConfigMixin):
    """The EMO network (arXiv 2402.17485 §3.2).

    * ``backbone``: SD1.5 UNet layout over video latents ``[B, C, F, H, W]`` with
      reference-attention, audio-attention and temporal modules (see :mod:`emo_model.unet`).
    * ``reference_net``: the same 2-D UNet without temporal / audio layers; run once per clip
      on the reference latent (+ the n motion-frame latents) at timestep 0.
    * ``audio_proj``, ``speed_proj``, ``face_locator``: the weak conditions.
    * ``text_context``: buffer ``[1, S, cross_attention_dim]`` fed to SD's text cross-attention
      slot (``attn2``) in both UNets; :meth:`from_sd15` fills it with SD's empty-prompt encoding.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "TemporalModule"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim: int = 768,
        attention_head_dim=8,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        sample_size: int = 64,
        text_context_tokens: int = 77,
        # temporal modules (AnimateDiff v2 layout)
        temporal_heads: int = 8,
        temporal_max_len: int = 32,
        num_motion_frames: int = 4,
        num_frames: int = 12,
        # audio
        audio_layers: int = 13,
        audio_feature_dim: int = 768,
        audio_window: int = 2,
        audio_hidden_dim: int = 512,
        audio_tokens: int = 32,
        audio_token_dim: int = 768,
        # speed
        speed_buckets: int = 9,
        speed_window: int = 2,
        speed_hidden_dim: int = 256,
        speed_dim: int = 256,
        speed_centers: Optional[Sequence[float]] = None,
        speed_radii: Optional[Sequence[float]] = None,
        # face locator
        face_locator_channels: Sequence[int] = (16, 32, 64, 128),
    ):
        super().__init__()
        if set(down_block_types) - SUPPORTED_DOWN or set(up_block_types) - SUPPORTED_UP:
            raise ValueError(f"only SD1.x block types are supported: {SUPPORTED_DOWN | SUPPORTED_UP}")
        if num_motion_frames + num_frames > temporal_max_len:
            raise ValueError(f"n + f = {num_motion_frames + num_frames} frames > temporal_max_len {temporal_max_len}")
        common = dict(
            in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
            norm_eps=norm_eps, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
        )
        self.backbone = UNetCore(UNetSettings(
            **common, temporal=True, audio_dim=audio_token_dim, speed_dim=speed_dim,
            temporal_heads=temporal_heads, temporal_max_len=temporal_max_len,
        ))
        self.reference_net = UNetCore(UNetSettings(**common, reference_only=True))
        self.audio_proj = AudioProjection(audio_layers, audio_feature_dim, audio_window, audio_hidden_dim, audio_tokens, audio_token_dim)
        self.speed_proj = SpeedProjection(speed_buckets, speed_window, speed_hidden_dim, speed_dim)
        self.face_locator = FaceLocator(block_out_channels[0], face_locator_channels, downsample=8)
        self.register_buffer("text_context", torch.zeros(1, text_context_tokens, cross_attention_dim))
        self.reference_net_calls = 0  # counts ReferenceNet forward passes (bench / tests)

    # ------------------------------------------------------------------ conditions
    def _context(self, dtype) -> torch.Tensor:
        return self.text_context.to(dtype)  # [1, S, D], broadcast over frames inside the attention

    @apply_forward_hook
    def encode_face(self, face_mask: torch.Tensor) -> torch.Tensor:
        """Face locator: ``[B, 1, S, S]`` mask -> ``[B, C0, S/8, S/8]`` (computed once per clip)."""
        return self.face_locator(face_mask)

    @apply_forward_hook
    def encode_audio(self, audio_features: torch.Tensor) -> torch.Tensor:
        """Audio projection: ``[B, F, 2m+1, L, D]`` -> ``[B, F, tokens, dim]``."""
        return self.audio_proj(audio_features)

    @apply_forward_hook
    def encode_speed(self, speed_buckets: torch.Tensor) -> torch.Tensor:
        """Speed layers: ``[B, n+F, (2m+1,) d]`` -> ``[B, n+F, speed_dim]``."""
        return self.speed_proj(speed_buckets)

    @apply_forward_hook  # so that enable_model_cpu_offload moves the model before the ReferenceNet pass
    def encode_reference(self, reference_latents: torch.Tensor, motion_latents: Optional[torch.Tensor] = None) -> ReferenceFeatures:
        """One ReferenceNet pass over the reference latent and (optionally) the motion-frame latents.

        ``reference_latents``: ``[B, C, H, W]``; ``motion_latents``: ``[B, n, C, H, W]`` or None
        (first clip: the temporal modules then see zero motion features).
        """
        b = reference_latents.shape[0]
        n = self.config.num_motion_frames
        x = reference_latents
        if motion_latents is not None:
            if motion_latents.shape[1] != n:
                raise ValueError(f"{motion_latents.shape[1]} motion frames, the model takes n = {n}")
            x = torch.cat([reference_latents, motion_latents.flatten(0, 1).to(reference_latents.dtype)], dim=0)
        ref_cap, mot_cap = {}, {}
        cond = Conditions(context=self._context(x.dtype), num_frames=1,
                          capture_reference=ref_cap, capture_motion=mot_cap if motion_latents is not None else None)
        self.reference_net(x, 0, cond)
        self.reference_net_calls += 1
        reference = {k: v[:b] for k, v in ref_cap.items()}
        motion = {k: v[b:] for k, v in mot_cap.items()} if motion_latents is not None else None
        return ReferenceFeatures(reference=reference, motion=motion, num_motion_frames=n)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        reference: Optional[ReferenceFeatures] = None,
        audio_features: Optional[torch.Tensor] = None,
        speed_buckets: Optional[torch.Tensor] = None,
        face_mask: Optional[torch.Tensor] = None,
        use_reference: bool = True,
        use_motion: bool = True,
        use_temporal: bool = True,
        audio_tokens: Optional[torch.Tensor] = None,
        speed_embedding: Optional[torch.Tensor] = None,
        face_embedding: Optional[torch.Tensor] = None,
        cache: Optional[dict] = None,
        reference_latents: Optional[torch.Tensor] = None,
        motion_latents: Optional[torch.Tensor] = None,
        reference_keep: Optional[torch.Tensor] = None,
        motion_keep: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """Denoise video latents.

        Args:
            sample: ``[B, C, F, H, W]`` noisy latents.
            timestep: scalar or ``[B]``.
            reference: from :meth:`encode_reference` (reused across steps); None = no reference
                (the classifier-free-guidance "unconditional" branch) and zero motion features.
            audio_features: ``[B, F, 2m+1, L, D]`` windowed wav2vec features (or ``[B, F, L, D]``,
                windowed within the clip); None = no audio-attention at all.
            speed_buckets: ``[B, n+F, 2m+1, d]`` / ``[B, n+F, d]`` (or only F frames; the first is
                repeated for the motion frames); None = no speed attention.
            face_mask: ``[B, 1, S, S]`` in [0, 1]; None = face locator off.
            use_temporal: False skips the temporal modules (stage-1 image pre-training: the
                backbone then is a 2-D UNet with reference-attention and face locator).
            audio_tokens / speed_embedding / face_embedding: precomputed outputs of ``audio_proj`` /
                ``speed_proj`` / ``face_locator`` (the pipeline computes them once per clip).
            cache: optional dict for the audio / speed attention keys and values (inference only);
                pass the same dict only while audio tokens and speed stay the same (one per clip
                and guidance branch). Reference and text-context keys/values are cached
                automatically in ``reference`` (a :class:`ReferenceFeatures` lives for one clip).
            reference_latents / motion_latents: instead of ``reference``, run the ReferenceNet
                here (training: one forward call, so a DDP wrapper sees every parameter).
            reference_keep / motion_keep: ``[B]`` bool, per-sample condition dropout for training
                (classifier-free guidance). A dropped sample sees no reference tokens (masked out of
                the reference-attention: the same result as ``use_reference=False``) / zero motion
                features (the first-clip input). The ReferenceNet stays in the autograd graph.
        Returns ``EMOModelOutput(sample=[B, C_out, F, H, W])``.
        """
        b, c, f, h, w = sample.shape
        if reference is None and reference_latents is not None:
            reference = self.encode_reference(reference_latents, motion_latents)
        # one host sync here instead of one per transformer block: all kept = no mask at all
        if reference_keep is not None and bool(reference_keep.all()):
            reference_keep = None
        if motion_keep is not None and reference is not None and reference.motion is not None and not bool(motion_keep.all()):
            n_mot = reference.num_motion_frames
            keep = motion_keep.to(device=sample.device).repeat_interleave(n_mot)
            reference = ReferenceFeatures(
                reference=reference.reference,
                motion={k: v * keep.to(v.dtype).view(-1, *([1] * (v.ndim - 1))) for k, v in reference.motion.items()},
                num_motion_frames=n_mot,
            )
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        n = self.config.num_motion_frames
        if audio_tokens is None and audio_features is not None:
            audio_tokens = self.audio_proj(audio_features.to(x.dtype))
        if audio_tokens is not None:
            audio_tokens = audio_tokens.reshape(b * f, *audio_tokens.shape[-2:]).to(x.dtype)
        if speed_embedding is None and speed_buckets is not None:
            speed_embedding = self.speed_proj(speed_buckets.to(x.dtype))
        if speed_embedding is not None:
            if speed_embedding.shape[1] == f:
                speed_embedding = torch.cat([speed_embedding[:, :1].expand(-1, n, -1), speed_embedding], dim=1)
            if speed_embedding.shape[1] != n + f:
                raise ValueError(f"speed for {speed_embedding.shape[1]} frames, expected {f} or {n + f}")
            speed_embedding = speed_embedding.to(x.dtype)
        face = face_embedding
        if face is None and face_mask is not None:
            face = self.face_locator(face_mask)
        cond = Conditions(
            context=self._context(x.dtype),
            num_frames=f,
            reference=reference.reference if (reference is not None and use_reference) else None,
            reference_keep=reference_keep,
            clip_cache=reference.kv_cache if reference is not None else None,
            cache=cache,
            motion=reference.motion if (reference is not None and use_motion) else None,
            num_motion_frames=n,
            temporal=use_temporal,
            audio=audio_tokens,
            speed=speed_embedding,
        )
        out = self.backbone(x, timestep, cond, add_to_input=face)
        out = out.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (out,)
        return EMOModelOutput(sample=out)

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_sd15(cls, path: str, text_context: Optional[torch.Tensor] = None, **overrides) -> "EMOModel":
        """Initialise backbone and ReferenceNet from a local diffusers SD1.x directory.

        ``path`` is the pipeline directory (with ``unet/``) or the ``unet/`` directory itself.
        ``text_context``: the ``[1, 77, 768]`` encoding fed to SD's cross-attention slot; by
        default it is computed from ``text_encoder/`` + ``tokenizer/`` with the empty prompt when
        they exist (SD's unconditional context), else zeros (logged).
        ``overrides``: EMO config fields (audio sizes, frames, ...).
        """
        from .weights import load_sd_unet_state_dict

        unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        with open(os.path.join(unet_dir, "config.json")) as fh:
            ucfg = json.load(fh)
        cfg = {k: ucfg[k] for k in SD_UNET_KEYS if k in ucfg}
        if ucfg.get("num_attention_heads") is not None:
            cfg["attention_head_dim"] = ucfg["num_attention_heads"]
        for key in ("transformer_layers_per_block",):
            v = ucfg.get(key, 1)
            if v not in (1, None) and not (isinstance(v, list) and set(v) == {1}):
                raise ValueError(f"{key}={v} is not an SD1.x UNet")
        if text_context is None:
            text_context = _empty_prompt_context(path)
            if text_context is None:
                logger.warning("no text_encoder/ + tokenizer/ next to %s: text context left at zeros", unet_dir)
        if text_context is not None:
            text_context = text_context.reshape(1, -1, text_context.shape[-1])
            cfg["text_context_tokens"] = text_context.shape[1]
        cfg.update(overrides)
        model = cls(**cfg)
        model.load_sd_unet(load_sd_unet_state_dict(unet_dir))
        if text_context is not None:
            with torch.no_grad():
                model.text_context.copy_(text_context)
        return model

    def load_sd_unet(self, state: dict) -> dict:
        """Copy an SD UNet2DConditionModel state dict into backbone and ReferenceNet. Returns a report."""
        report = {}
        for name, net in (("backbone", self.backbone), ("reference_net", self.reference_net)):
            own = net.state_dict()
            missing_sd = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            bad_shape = [k for k in own if k in state and own[k].shape != state[k].shape]
            if bad_shape:
                raise ValueError(f"{name}: shape mismatch for {bad_shape[:5]}")
            new_layers = [k for k in missing_sd if not _is_emo_layer(k)]
            if new_layers:
                raise ValueError(f"{name}: SD UNet lacks {new_layers[:5]} ({len(new_layers)} keys)")
            if name == "backbone" and unexpected:
                raise ValueError(f"SD UNet has keys the backbone lacks: {unexpected[:5]}")
            net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
            report[name] = {"loaded": len(own) - len(missing_sd), "new": len(missing_sd), "ignored": unexpected}
        return report

    def load_motion_module(self, path: str, strict: bool = True) -> dict:
        """Load an AnimateDiff motion-module checkpoint into the backbone's temporal modules.

        Accepts the original format (``...motion_modules.0.temporal_transformer.transformer_blocks.0
        .attention_blocks.0.to_q.weight``) as ``.ckpt``/``.pt``/``.pth`` (``torch.load(weights_only=True)``)
        or ``.safetensors``, and diffusers' ``MotionAdapter`` format (file or directory).
        Returns ``{"loaded": n, "skipped_pe": n, "untouched": [...]}``.
        """
        from .weights import load_motion_module_into

        return load_motion_module_into(self.backbone, path, strict=strict)

    def set_attention_backend_sdpa(self):
        """All attention already runs through ``F.scaled_dot_product_attention`` (diffusers
        ``AttnProcessor2_0`` for SD layers, our own modules for the rest)."""
        return self


def _is_emo_layer(key: str) -> bool:
    return ".motion_modules." in key or ".audio_attn." in key or ".audio_norm." in key


def _empty_prompt_context(path: str) -> Optional[torch.Tensor]:
    te, tok = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if not (os.path.isdir(te) and os.path.isdir(tok)):
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tok)
    encoder = CLIPTextModel.from_pretrained(te)
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()
