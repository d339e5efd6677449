"""Tiny random EMO models for tests and demos.

``python -m emo_model.tiny DIR`` (or ``emo-sample --make-tiny-model DIR``) writes a complete
tiny ``EMOPipeline`` directory (random weights, 64x64 pixels, runs on CPU in seconds).
"""
from __future__ import annotations

import argparse
import sys

# SD1.5 block layout (3 cross-attention levels + 1 plain), narrow channels, one layer per block.
TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    # 8 groups: with 32 the 1x1 bottleneck normalises 2 values per group and amplifies float32
    # rounding ~100x (batch-of-12 vs per-frame outputs of diffusers' own UNet differ by 1e-4)
    norm_num_groups=8,
    sample_size=8,
)

TINY_WAV2VEC2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16, 16, 16, 16, 16),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    vocab_size=32,
)


def tiny_emo_config(**overrides) -> dict:
    cfg = dict(
        TINY_UNET,
        text_context_tokens=7,
        temporal_heads=8,
        audio_layers=TINY_WAV2VEC2["num_hidden_layers"] + 1,
        audio_feature_dim=TINY_WAV2VEC2["hidden_size"],
        audio_hidden_dim=32,
        audio_tokens=4,
        audio_token_dim=32,
        speed_hidden_dim=32,
        speed_dim=32,
        face_locator_channels=(8, 8, 16, 16),
    )
    cfg.update(overrides)
    return cfg


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def make_tiny_pipeline(seed: int = 0, randomize_new_layers: bool = True):
    """A tiny random :class:`~emo_model.pipeline.EMOPipeline` (not saved).

    ``randomize_new_layers``: give the zero-initialised EMO layers small random weights so that
    audio, speed, face mask and motion frames visibly affect the output (a demo of the plumbing).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from .model import EMOModel
    from .pipeline import EMOPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config())
    emo = EMOModel(**tiny_emo_config())
    if randomize_new_layers:
        with torch.no_grad():
            for p in emo.parameters():
                if p.abs().sum() == 0 and p.ndim > 0:
                    p.normal_(0.0, 0.02)
            emo.text_context.normal_()
    audio_encoder = Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2))
    feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return EMOPipeline(vae=vae, emo=emo, audio_encoder=audio_encoder, feature_extractor=feature_extractor, scheduler=scheduler)


def make_tiny_model(path: str, seed: int = 0) -> str:
    pipe = make_tiny_pipeline(seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emo_model.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_tiny_model(args.dir, args.seed)
    print(f"tiny EMO pipeline written to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
