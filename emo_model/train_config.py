"""``TrainConfig``: everything one training stage needs, as a self-validating dataclass.

Loadable from YAML / JSON (``TrainConfig.from_file``), overridable by ``emo-train`` flags (one
flag per field, generated from the dataclass), and saved as ``train_config.json`` beside the
checkpoints of a run and inside every checkpoint. Example files: ``configs/train/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

STAGES = {"1": "image", "2": "video", "3": "speed", "image": "image", "video": "video", "speed": "speed"}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
USE_LATENTS = ("auto", "yes", "no")


@dataclass
class TrainConfig:
    # ---- what to train
    stage: str = field(default="video", metadata={"help": "image | video | speed (or 1 | 2 | 3)"})
    model: str = field(default="", metadata={"help": "initial weights: an EMOPipeline directory (vae/, emo/, ...: a "
                                                      "previous stage's checkpoint is one) or an EMOModel directory (+ --vae)"})
    vae: Optional[str] = field(default=None, metadata={"help": "AutoencoderKL directory (default: <model>/vae)"})
    audio_encoder: Optional[str] = field(default=None, metadata={
        "help": "wav2vec2 directory (default: <model>/audio_encoder); needed for validation and samplable checkpoints"})
    motion_module: Optional[str] = field(default=None, metadata={
        "help": "AnimateDiff motion-module weights loaded into the temporal modules before training (stage 2 start)"})
    freeze_spatial: bool = field(default=False, metadata={"help": "stage video: train only temporal + audio layers"})
    # ---- data
    shards: list = field(default_factory=list, metadata={"help": "training shards: files, directories, globs, brace patterns"})
    val_shards: list = field(default_factory=list, metadata={"help": "held-out (test split) shards for validation videos"})
    resolution: Optional[int] = field(default=None, metadata={"help": "pixels (default: the model's sample_size x 8)"})
    use_latents: str = field(default="auto", metadata={
        "help": "auto | yes | no: read pre-encoded latents.npy (emo-data add-latents) instead of decoding video + VAE"})
    shuffle_buffer: int = field(default=256, metadata={"help": "samples in the shuffle buffer (0: shard order)"})
    shard_shuffle: bool = field(default=True, metadata={"help": "shuffle the shard order every epoch"})
    resampled: bool = field(default=False, metadata={
        "help": "every rank/worker draws shards with replacement, independently (no epochs; multi-node)"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process"})
    # ---- run
    out: str = field(default="runs/emo", metadata={"help": "run directory (checkpoints, logs, validation)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "samples per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seed: int = field(default=0, metadata={"help": "seeds data order, windows, noise, timesteps and dropout"})
    # ---- optimisation
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (paper: 1e-5)"})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "|".join(LR_SCHEDULERS)})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    lr_num_cycles: int = field(default=1, metadata={"help": "cosine_with_restarts cycles"})
    lr_power: float = field(default=1.0, metadata={"help": "polynomial decay power"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (CUDA)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: no clipping, norm still logged)"})
    use_ema: bool = field(default=False, metadata={"help": "keep an EMA of the trained weights (saved as emo_ema/)"})
    ema_decay: float = 0.9999
    ema_warmup: bool = field(default=False, metadata={"help": "EMA decay warm-up (diffusers EMAModel use_ema_warmup)"})
    snr_gamma: Optional[float] = field(default=None, metadata={"help": "min-SNR loss weighting gamma (5.0 is common); off by default"})
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset (e.g. 0.05); 0 = off"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    gradient_checkpointing: bool = False
    allow_tf32: bool = field(default=False, metadata={"help": "TF32 matmuls on Ampere+ GPUs"})
    find_unused_parameters: bool = field(default=False, metadata={
        "help": "DDP find_unused_parameters (not needed: parameters that get no gradient are not trained)"})
    # ---- classifier-free-guidance dropout, per sample
    drop_reference: float = field(default=0.05, metadata={"help": "reference image dropped (no reference tokens)"})
    drop_audio: float = field(default=0.05, metadata={"help": "audio features zeroed"})
    drop_motion: float = field(default=0.1, metadata={"help": "motion-frame features zeroed (the first clip's input)"})
    drop_speed: float = field(default=0.0, metadata={"help": "speed buckets zeroed (stage speed)"})
    # ---- checkpoints
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (the last step is always saved)"})
    keep_checkpoints: Optional[int] = field(default=None, metadata={"help": "keep only the N most recent checkpoints"})
    resume: Optional[str] = field(default=None, metadata={"help": "latest (newest checkpoint in --out) or a checkpoint directory"})
    # ---- validation and logging
    val_every: int = field(default=0, metadata={"help": "validation videos every N steps (0: never)"})
    val_samples: int = field(default=2, metadata={"help": "held-out samples per validation"})
    val_frames: int = field(default=12, metadata={"help": "frames generated per validation sample"})
    val_inference_steps: int = field(default=20, metadata={"help": "DDIM steps of the validation samples"})
    val_guidance: float = field(default=3.5, metadata={"help": "guidance scale of the validation samples"})
    log_every: int = field(default=10, metadata={"help": "log line every N steps (trackers get every step)"})
    log_with: list = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "accelerate trackers (tensorboard, wandb, ...); 'none' for none"})
    progress: bool = field(default=True, metadata={"help": "progress bar on the main process"})

    def __post_init__(self):
        if str(self.stage) not in STAGES:
            raise ValueError(f"stage {self.stage!r}: choose image/video/speed (1/2/3)")
        self.stage = STAGES[str(self.stage)]
        for name in ("shards", "val_shards", "log_with"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is None:
                setattr(self, name, [])
            else:
                setattr(self, name, list(value))
        self.log_with = [t for t in self.log_with if t and t.lower() != "none"]
        problems = []
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler {self.lr_scheduler!r} not in {LR_SCHEDULERS}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision {self.mixed_precision!r} not in {MIXED_PRECISION}")
        if self.use_latents not in USE_LATENTS:
            problems.append(f"use_latents {self.use_latents!r} not in {USE_LATENTS}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_samples", "val_frames", "val_inference_steps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("num_workers", "shuffle_buffer", "lr_warmup_steps", "save_every", "val_every"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("drop_reference", "drop_audio", "drop_motion", "drop_speed"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1 or unset (got {self.keep_checkpoints})")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"snr_gamma must be > 0 or unset (got {self.snr_gamma})")
        if not 0.0 <= self.ema_decay <= 1.0:
            problems.append(f"ema_decay must be in [0, 1] (got {self.ema_decay})")
        if self.noise_offset < 0 or self.max_grad_norm < 0:
            problems.append("noise_offset and max_grad_norm must be >= 0")
        if self.resolution is not None and self.resolution % 8:
            problems.append(f"resolution {self.resolution} is not a multiple of 8 (the VAE downsamples 8x)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        """A YAML (``.yaml``/``.yml``) or JSON file holding (part of) a TrainConfig; ``overrides`` win."""
        with open(path) as fh:
            text = fh.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        data.update(overrides)
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)


# ---------------------------------------------------------------------- command line
def _field_kind(f: dataclasses.Field) -> str:
    t = str(f.type).replace("typing.", "")
    for kind in ("bool", "int", "float", "list", "str"):
        if t == kind or t == f"Optional[{kind}]":
            return kind
    raise TypeError(f"TrainConfig.{f.name}: unsupported type {f.type}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--use-ema/--no-use-ema``, ...), default None
    so that only flags given on the command line override a ``--config`` file."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_kind(f)
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f"{helptext} (default: {default})" if helptext else f"default: {default}"
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif kind == "list":
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float, "str": str}[kind], default=None, help=helptext)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """``--config FILE`` (YAML/JSON) first, then every flag that was given."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        return TrainConfig.from_file(args.config, **overrides)
    return TrainConfig(**overrides)
