"""The SD1.5 UNet layout, rebuilt so that it can serve as EMO's backbone and ReferenceNet.

Parameter names follow diffusers' ``UNet2DConditionModel`` exactly (``down_blocks.0.resnets.0``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn1``, ...), so an SD1.5 ``unet/`` state dict
loads by name; the temporal modules follow the *original* AnimateDiff naming
(``down_blocks.0.motion_modules.0.temporal_transformer...``), so an AnimateDiff motion-module
checkpoint loads by name too. Everything EMO adds starts at zero output:

* reference-attention = SD's spatial self-attention (``attn1``) whose keys/values are the frame's
  own tokens concatenated with the ReferenceNet tokens of the same layer (AnimateAnyone's
  "spatial attention"); it reuses SD's ``attn1`` weights and is exact SD self-attention when no
  reference is given;
* audio-attention (``audio_attn``, zero ``to_out``) follows it in every transformer block;
* temporal modules (AnimateDiff layout, zero ``proj_out``) after each (resnet, attention) pair at
  every resolution, with motion-frame features concatenated along the frame axis and a
  speed cross-attention (zero ``to_out``) inside.

SD's text cross-attention (``attn2``) is kept and fed a fixed context (the empty-prompt CLIP
encoding, stored by :class:`emo_model.EMOModel`), so the initialised network *is* SD's
unconditional UNet on a single frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .conditioning import zero_module


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """AnimateDiff's PositionalEncoding table ``[1, length, dim]`` (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term[: dim // 2])
    return pe


@dataclass
class Conditions:
    """Everything a UNet forward needs besides the sample; passed down to every block."""

    context: torch.Tensor  # [1 or N, S, cross_dim] fixed text-slot context (broadcast over N = batch * frames)
    num_frames: int = 1
    reference: Optional[dict] = None  # key -> [B, M, C] ReferenceNet self-attention inputs
    reference_keep: Optional[torch.Tensor] = None  # [B] bool: per-sample reference dropout (training; None = keep all)
    motion: Optional[dict] = None  # key -> [B * n, C, H, W] motion-frame features
    num_motion_frames: int = 0
    temporal: bool = True  # False: temporal modules are skipped (stage-1 image training)
    audio: Optional[torch.Tensor] = None  # [N, tokens, audio_dim]
    speed: Optional[torch.Tensor] = None  # [B, n + F, speed_dim]
    clip_cache: Optional[dict] = None  # reference / text-context keys+values, cached per clip (no-grad only)
    cache: Optional[dict] = None  # audio / speed keys+values; valid while audio tokens and speed are fixed
    capture_reference: Optional[dict] = None  # ReferenceNet: filled with self-attention inputs
    capture_motion: Optional[dict] = None  # ReferenceNet: filled with temporal-position features


class Attn(nn.Module):
    """Plain multi-head attention with diffusers/AnimateDiff parameter names, PyTorch SDPA."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.dim_head)).transpose(-3, -2)  # [..., h, L, d]

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-3, -2).flatten(-2)
        return self.to_out[0](out)  # to_out[1] is Dropout(0): kept for key names, skipped


class TemporalAttention(Attn):
    """AnimateDiff's temporal self-attention: sinusoidal positions added to the input, then attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, max_len: int):
        super().__init__(dim, None, heads, dim_head)
        self.pos_encoder = nn.Module()
        self.pos_encoder.register_buffer("pe", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor, keep_last: Optional[int] = None) -> torch.Tensor:
        """``x``: ``[(b h w), L, c]``. With ``keep_last`` only the last frames are queried (keys and
        values still cover all L frames): the same result as slicing the full output, cheaper."""
        if x.shape[1] > self.pos_encoder.pe.shape[1]:
            raise ValueError(f"{x.shape[1]} frames > temporal_max_len {self.pos_encoder.pe.shape[1]}")
        x = x + self.pos_encoder.pe[:, : x.shape[1]].to(x.dtype)
        if keep_last is None:  # one GEMM for q, k, v
            qkv = F.linear(x, torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
            q, k, v = (self._split(t) for t in qkv.chunk(3, dim=-1))
        else:
            kv = F.linear(x, torch.cat([self.to_k.weight, self.to_v.weight]))
            k, v = (self._split(t) for t in kv.chunk(2, dim=-1))
            q = self._split(self.to_q(x[:, -keep_last:]))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(-3, -2).flatten(-2))


class SpeedAttention(Attn):
    """Cross-attention along the frame axis from each (pixel, frame) query to the clip's speed embeddings.

    Keys/values are computed once per (batch, frame) and shared by all pixels (no copies).
    Both sides get sinusoidal frame positions so a frame can find its own speed.
    """

    def __init__(self, dim: int, speed_dim: int, heads: int, dim_head: int, max_len: int):
        super().__init__(dim, speed_dim, heads, dim_head)
        self.register_buffer("pe_query", sinusoidal_table(max_len, dim), persistent=False)
        self.register_buffer("pe_speed", sinusoidal_table(max_len, speed_dim), persistent=False)
        zero_module(self.to_out[0])

    def forward(self, x: torch.Tensor, speed: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        # x: [B * HW, Lq, C], the last Lq of the L frames; speed: [B, L, Ds]. Every (pixel, frame)
        # query of a batch element attends to the same L keys: one SDPA call over HW * Lq queries.
        b, length = speed.shape[0], speed.shape[1]
        bhw, lq = x.shape[0], x.shape[1]
        x = x + self.pe_query[:, length - lq : length].to(x.dtype)
        kv = cache.get(id(self)) if cache is not None else None
        if kv is None or kv[0].dtype != x.dtype:
            speed = speed + self.pe_speed[:, :length].to(speed.dtype)
            kv = (self._split(self.to_k(speed)), self._split(self.to_v(speed)))  # [B, h, L, d]
            if cache is not None:
                cache[id(self)] = kv
        k, v = kv
        q = self._split(self.to_q(x).reshape(b, (bhw // b) * lq, -1))  # [B, h, HW*Lq, d]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-3, -2).flatten(-2).reshape(bhw, lq, -1)
        return self.to_out[0](out)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, speed_dim: Optional[int]):
        super().__init__()
        dim_head = dim // heads
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, dim_head, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        if speed_dim:
            self.speed_norm = nn.LayerNorm(dim)
            self.speed_attn = SpeedAttention(dim, speed_dim, heads, dim_head, max_len)
        else:
            self.speed_norm = self.speed_attn = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, speed: Optional[torch.Tensor], keep_last: Optional[int] = None,
                cache: Optional[dict] = None) -> torch.Tensor:
        last = len(self.attention_blocks) - 1
        for i, (attn, norm) in enumerate(zip(self.attention_blocks, self.norms)):
            if i == last and keep_last is not None:  # later layers only need the generated frames
                x = attn(norm(x), keep_last) + x[:, -keep_last:]
            else:
                x = attn(norm(x)) + x
        if self.speed_attn is not None and speed is not None:
            x = self.speed_attn(self.speed_norm(x), speed, cache) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, speed_dim: Optional[int], norm_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_len, speed_dim)])
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, num_frames: int, speed: Optional[torch.Tensor], keep_last: Optional[int] = None,
                cache: Optional[dict] = None) -> torch.Tensor:
        """``x``: ``[B * L, C, H, W]`` (frames of a batch element contiguous); GroupNorm per frame
        as in the original AnimateDiff. Returns all L frames, or only the last ``keep_last``."""
        bl, c, h, w = x.shape
        b = bl // num_frames
        keep = num_frames if keep_last is None else keep_last
        residual = x if keep_last is None else x.unflatten(0, (b, num_frames))[:, -keep:].flatten(0, 1)
        x = self.norm(x)
        x = x.unflatten(0, (b, num_frames)).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, speed, keep_last if i == len(self.transformer_blocks) - 1 else None, cache)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, keep, c).permute(0, 3, 4, 1, 2).reshape(b * keep, c, h, w)
        return x + residual


class TemporalModule(nn.Module):
    """AnimateDiff motion module + EMO's motion-frame concatenation and speed cross-attention."""

    def __init__(self, channels: int, heads: int = 8, max_len: int = 32, speed_dim: Optional[int] = None, norm_groups: int = 32):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, max_len, speed_dim, norm_groups)

    def forward(self, x: torch.Tensor, cond: Conditions, key: str) -> torch.Tensor:
        if not cond.temporal:
            return x
        f, n = cond.num_frames, cond.num_motion_frames
        cache = cond.cache if (cond.cache is not None and not torch.is_grad_enabled()) else None
        if n == 0:
            return self.temporal_transformer(x, f, cond.speed, cache=cache)
        bf, c, h, w = x.shape
        b = bf // f
        motion = None if cond.motion is None else cond.motion.get(key)
        if motion is None:  # first clip / dropped motion frames: zeros (paper)
            motion = x.new_zeros(b, n, c, h, w)
        else:
            motion = motion.to(x.dtype).reshape(-1, n, c, h, w)
            if motion.shape[0] != b:
                if b % motion.shape[0]:
                    raise ValueError(f"motion features for batch {motion.shape[0]}, sample batch {b}")
                motion = motion.repeat_interleave(b // motion.shape[0], dim=0)
        joint = torch.cat([motion, x.reshape(b, f, c, h, w)], dim=1).reshape(b * (n + f), c, h, w)
        return self.temporal_transformer(joint, n + f, cond.speed, keep_last=f, cache=cache)


class TransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (SD1.5 settings) with reference- and audio-attention."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, upcast_attention=False, audio_dim=None):
        super().__init__()
        self.key = ""
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=dim_head, bias=False, upcast_attention=upcast_attention, out_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn2 = Attention(
            query_dim=dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
            bias=False, upcast_attention=upcast_attention, out_bias=True,
        )
        if audio_dim:
            self.audio_norm = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
            self.audio_attn = Attn(dim, audio_dim, heads, dim_head)
            zero_module(self.audio_attn.to_out[0])
        else:
            self.audio_norm = self.audio_attn = None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        h = self.norm1(x)
        if cond.capture_reference is not None:
            cond.capture_reference[self.key] = h
        ref = None if cond.reference is None else cond.reference.get(self.key)
        if ref is not None:  # reference-attention: SD self-attention over [own tokens, reference tokens]
            x = self._reference_attention(h, ref.to(h.dtype), cond) + x
        else:
            x = self.attn1(h) + x
        x = self._cross(self.attn2, self.norm2(x), cond.context, cond.clip_cache, "context") + x
        if self.audio_attn is not None and cond.audio is not None:
            x = self._cross(self.audio_attn, self.audio_norm(x), cond.audio, cond.cache, "audio") + x
        return self.ff(self.norm3(x)) + x

    def _cross(self, attn, h: torch.Tensor, context: torch.Tensor, cache: Optional[dict], name: str) -> torch.Tensor:
        """Cross-attention whose keys/values depend only on ``context``: computed once per context
        row (a ``[1, S, D]`` context is shared by every frame without copies) and, without autograd,
        cached in ``cache`` for the next denoising steps. Same numbers as diffusers' ``AttnProcessor2_0``."""
        use = cache is not None and not torch.is_grad_enabled()
        kv = cache.get((name, self.key)) if use else None
        if kv is None or kv[0].dtype != h.dtype:
            c = context.to(h.dtype)
            kv = tuple(t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (attn.to_k(c), attn.to_v(c)))
            if use:
                cache[(name, self.key)] = kv
        k, v = kv
        q = attn.to_q(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype))


    def _reference_attention(self, h: torch.Tensor, ref: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """``attn1`` with keys/values = [own tokens; reference tokens] (AnimateAnyone spatial attention).

        The reference tokens' key/value projections do not change across denoising steps, so
        without autograd they are computed once per clip and cached in ``cond.clip_cache``.
        Numerically the same as ``attn1(h, encoder_hidden_states=cat([h, ref]))``.
        """
        a = self.attn1
        n, frames_per_ref = h.shape[0], h.shape[0] // ref.shape[0]
        cache = cond.clip_cache if (cond.clip_cache is not None and not torch.is_grad_enabled()) else None
        kv = cache.get(("reference", self.key)) if cache is not None else None
        if kv is None or kv[0].dtype != h.dtype:
            kv = (a.to_k(ref), a.to_v(ref))
            if cache is not None:
                cache[("reference", self.key)] = kv
        k_ref, v_ref = (t.repeat_interleave(frames_per_ref, dim=0) if frames_per_ref > 1 else t for t in kv)
        q = a.to_q(h)
        k = torch.cat([a.to_k(h), k_ref], dim=1)
        v = torch.cat([a.to_v(h), v_ref], dim=1)
        heads = a.heads
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        mask = None
        keep = cond.reference_keep
        if keep is not None:  # EMOModel.forward passes None when every sample keeps its reference
            # Per-sample reference dropout: a dropped sample's queries may not see the reference
            # keys, which is exactly SD self-attention (softmax over its own tokens only), while
            # the ReferenceNet stays in the graph of every step (DDP needs no unused parameters).
            own = torch.ones(n, h.shape[1], dtype=torch.bool, device=h.device)
            ref_ok = keep.to(device=h.device, dtype=torch.bool).repeat_interleave(frames_per_ref)[:, None]
            mask = torch.cat([own, ref_ok.expand(n, k_ref.shape[1])], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return a.to_out[0](out)


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input) with :class:`TransformerBlock` s."""

    def __init__(self, channels, heads, cross_attention_dim, norm_groups, use_linear_projection=False,
                 upcast_attention=False, num_layers=1, audio_dim=None):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        dim_head = channels // heads
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, dim_head, cross_attention_dim, upcast_attention, audio_dim) for _ in range(num_layers)]
        )

    def forward(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        b, _, height, width = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
            c = x.shape[1]
            x = x.permute(0, 2, 3, 1).reshape(b, height * width, c)
        else:
            c = x.shape[1]
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, height * width, c))
        for block in self.transformer_blocks:
            x = block(x, cond)
        if not self.use_linear_projection:
            x = self.proj_out(x.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous())
        else:
            x = self.proj_out(x).reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()
        return x + residual


@dataclass
class UNetSettings:
    """The subset of ``UNet2DConditionModel``'s config that SD1.x uses, plus EMO's additions."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    cross_attention_dim: int = 768
    attention_head_dim: object = 8  # SD1.x naming: this is the number of heads per block
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # EMO additions
    temporal: bool = False  # backbone: temporal modules (+ motion frames, speed attention)
    audio_dim: Optional[int] = None  # backbone: audio-attention key/value dims
    speed_dim: Optional[int] = None  # backbone: speed embedding dims (cross-attention in temporal modules)
    temporal_heads: int = 8
    temporal_max_len: int = 32
    reference_only: bool = False  # ReferenceNet: no conv_norm_out / conv_out (never used)
    extra: dict = field(default_factory=dict)


class UNetCore(nn.Module):
    """SD1.5 UNet over ``[B * F, C, H, W]``; backbone and ReferenceNet differ only in settings."""

    def __init__(self, s: UNetSettings):
        super().__init__()
        self.settings = s
        self.gradient_checkpointing = False
        boc = list(s.block_out_channels)
        nb = len(boc)
        heads = list(s.attention_head_dim) if isinstance(s.attention_head_dim, (list, tuple)) else [s.attention_head_dim] * nb
        temb = boc[0] * 4
        self.conv_in = nn.Conv2d(s.in_channels, boc[0], 3, padding=1)
        self.time_proj = Timesteps(boc[0], s.flip_sin_to_cos, s.freq_shift)
        self.time_embedding = TimestepEmbedding(boc[0], temb, act_fn="silu")

        def resnet(cin, cout):
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, eps=s.norm_eps,
                                 groups=s.norm_num_groups, dropout=0.0, time_embedding_norm="default",
                                 non_linearity="silu", output_scale_factor=1.0, pre_norm=True)

        def attn(c, h):
            return SpatialTransformer(c, h, s.cross_attention_dim, s.norm_num_groups, s.use_linear_projection,
                                      s.upcast_attention, 1, s.audio_dim)

        def motion(c):
            return TemporalModule(c, s.temporal_heads, s.temporal_max_len, s.speed_dim, s.norm_num_groups)

        self.down_blocks = nn.ModuleList()
        out_c = boc[0]
        for i, btype in enumerate(s.down_block_types):
            in_c, out_c = out_c, boc[i]
            blk = nn.Module()
            blk.resnets = nn.ModuleList([resnet(in_c if j == 0 else out_c, out_c) for j in range(s.layers_per_block)])
            blk.attentions = nn.ModuleList([attn(out_c, heads[i]) for _ in range(s.layers_per_block)]) if "CrossAttn" in btype else None
            blk.motion_modules = nn.ModuleList([motion(out_c) for _ in range(s.layers_per_block)]) if s.temporal else None
            blk.downsamplers = (
                nn.ModuleList([Downsample2D(out_c, use_conv=True, out_channels=out_c, padding=1, name="op")]) if i < nb - 1 else None
            )
            self.down_blocks.append(blk)

        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([resnet(boc[-1], boc[-1]) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([attn(boc[-1], heads[-1])])
        self.mid_block.motion_modules = nn.ModuleList([motion(boc[-1])]) if s.temporal else None

        self.up_blocks = nn.ModuleList()
        rev, rev_heads = boc[::-1], heads[::-1]
        out_c = rev[0]
        for i, btype in enumerate(s.up_block_types):
            prev_c, out_c = out_c, rev[i]
            in_c = rev[min(i + 1, nb - 1)]
            n = s.layers_per_block + 1
            blk = nn.Module()
            blk.resnets = nn.ModuleList(
                [resnet((prev_c if j == 0 else out_c) + (in_c if j == n - 1 else out_c), out_c) for j in range(n)]
            )
            blk.attentions = nn.ModuleList([attn(out_c, rev_heads[i]) for _ in range(n)]) if "CrossAttn" in btype else None
            blk.motion_modules = nn.ModuleList([motion(out_c) for _ in range(n)]) if s.temporal else None
            blk.upsamplers = nn.ModuleList([Upsample2D(out_c, use_conv=True, out_channels=out_c)]) if i < nb - 1 else None
            self.up_blocks.append(blk)

        if not s.reference_only:
            self.conv_norm_out = nn.GroupNorm(s.norm_num_groups, boc[0], eps=s.norm_eps)
            self.conv_act = nn.SiLU()
            self.conv_out = nn.Conv2d(boc[0], s.out_channels, 3, padding=1)
        self.num_upsamplers = nb - 1
        # keys under which reference / motion features are exchanged
        for name, module in self.named_modules():
            if isinstance(module, TransformerBlock):
                module.key = name

    # ------------------------------------------------------------------ helpers
    def _call(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _after_pair(self, block, j: int, x: torch.Tensor, cond: Conditions, prefix: str) -> torch.Tensor:
        key = f"{prefix}.motion_modules.{j}"
        if cond.capture_motion is not None:
            cond.capture_motion[key] = x
        if block.motion_modules is not None:
            x = self._call(block.motion_modules[j], x, cond, key)
        return x

    def time_embed(self, timestep, batch: int, dtype, device) -> torch.Tensor:
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=device)
        elif t.ndim == 0:
            t = t[None].to(device)
        t = t.to(device).expand(batch)
        return self.time_embedding(self.time_proj(t).to(dtype=dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep, cond: Conditions, add_to_input: Optional[torch.Tensor] = None):
        """``sample``: ``[B * F, C, H, W]`` (frames of a batch element contiguous); ``timestep``: scalar or ``[B]``.

        ``add_to_input``: ``[B, C0, H, W]`` added after ``conv_in`` to every frame (face locator).
        Returns ``[B * F, C_out, H, W]``; in ``reference_only`` mode returns ``None`` (the
        features are in ``cond.capture_*``).
        """
        f = cond.num_frames
        bf = sample.shape[0]
        b = bf // f
        temb = self.time_embed(timestep, b, sample.dtype, sample.device)
        if f > 1:
            temb = temb.repeat_interleave(f, dim=0)
        upsample_size, forward_upsample_size = None, any(d % (2**self.num_upsamplers) for d in sample.shape[-2:])

        x = self.conv_in(sample)
        if add_to_input is not None:
            add = add_to_input.to(x.dtype)
            x = x + (add.repeat_interleave(bf // add.shape[0], dim=0) if add.shape[0] != bf else add)
        res = [x]
        for i, blk in enumerate(self.down_blocks):
            prefix = f"down_blocks.{i}"
            for j, rn in enumerate(blk.resnets):
                x = self._call(rn, x, temb)
                if blk.attentions is not None:
                    x = self._call(blk.attentions[j], x, cond)
                x = self._after_pair(blk, j, x, cond, prefix)
                res.append(x)
            if blk.downsamplers is not None:
                x = blk.downsamplers[0](x)
                res.append(x)

        mid = self.mid_block
        x = self._call(mid.resnets[0], x, temb)
        x = self._call(mid.attentions[0], x, cond)
        x = self._after_pair(mid, 0, x, cond, "mid_block")
        x = self._call(mid.resnets[1], x, temb)

        for i, blk in enumerate(self.up_blocks):
            prefix = f"up_blocks.{i}"
            skips = res[-len(blk.resnets):]
            res = res[: -len(blk.resnets)]
            if blk.upsamplers is not None and forward_upsample_size:
                upsample_size = res[-1].shape[2:]
            for j, rn in enumerate(blk.resnets):
                x = torch.cat([x, skips[-1 - j]], dim=1)
                x = self._call(rn, x, temb)
                if blk.attentions is not None:
                    x = self._call(blk.attentions[j], x, cond)
                x = self._after_pair(blk, j, x, cond, prefix)
            if blk.upsamplers is not None:
                x = blk.upsamplers[0](x, upsample_size)

        if self.settings.reference_only:
            return None
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x
