"""Configurations of ``emo-eval generate`` and ``emo-eval score``: validated on construction,
stored with every output (``generate.json`` / each sample's json, the score JSON)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

METRICS = ("fid", "fvd", "syncnet", "sync_offline", "fsim", "efid")


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class GenerateConfig(_Config):
    model: str                          # EMOPipeline directory (save_pretrained layout)
    shards: list[str]                   # shard files / globs / directories
    out: str                            # output directory
    split: Optional[str] = "test"       # only samples whose json ``split`` is this (None: every sample)
    reference_frame: int = 0            # the ground-truth frame used as the reference portrait
    seed: int = 0                       # per-sample seed = hash(seed, key): order-independent, resumable
    steps: int = 40                     # DDIM steps (paper: 40)
    guidance_scale: float = 3.5
    audio_guidance_scale: Optional[float] = None
    speed: Union[float, str] = 0.5      # constant head speed, or "sample": the clip's measured mean speed
    face_region: str = "reference-box"  # "reference-box" | "clip-mask" (the shard's union mask) | "none"
    max_frames: Optional[int] = None    # cap per sample (quick runs); None = the whole clip
    limit: Optional[int] = None         # at most this many samples
    device: Optional[str] = None        # default: cuda if available
    dtype: Optional[str] = None         # fp32 | fp16 | bf16 (default fp16 on GPU, fp32 on CPU)

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError("no shards given")
        if self.reference_frame < 0:
            raise ValueError("reference_frame must be >= 0")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if isinstance(self.speed, str):
            if self.speed != "sample":
                try:
                    self.speed = float(self.speed)
                except ValueError:
                    raise ValueError(f"speed is a number or 'sample', not {self.speed!r}") from None
        if not isinstance(self.speed, str) and not self.speed >= 0:
            raise ValueError("speed must be >= 0")
        if self.face_region not in ("reference-box", "clip-mask", "none"):
            raise ValueError(f"face_region must be reference-box | clip-mask | none, not {self.face_region!r}")
        for name in ("max_frames", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.dtype not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"dtype must be fp32 | fp16 | bf16, not {self.dtype!r}")

    def generation_digest(self) -> str:
        """What changes the generated frames (not where they go, nor the device)."""
        keys = ("split", "reference_frame", "seed", "steps", "guidance_scale", "audio_guidance_scale", "speed",
                "face_region", "max_frames")
        payload = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ScoreConfig(_Config):
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    weights_dir: Optional[str] = None      # looked up for files with the conventional names
    inception_weights: Optional[str] = None
    i3d_weights: Optional[str] = None
    syncnet_weights: Optional[str] = None
    expression: str = "landmarks"          # E-FID extractor: "landmarks" (offline default) | "deep3d"
    deep3d_weights: Optional[str] = None
    deep3d_lm3d: Optional[str] = None      # Deep3DFaceRecon's BFM/similarity_Lm3D_all.mat
    identity: str = "dlib"                 # F-SIM embedding: "dlib" | "insightface" (ArcFace)
    face_model_root: Optional[str] = None  # InsightFace pack directory
    resolution: Optional[int] = None       # FID/FVD compare frames at this size (default: the generated size)
    fid_frame_stride: int = 1              # every k-th frame into FID
    fvd_clip_frames: int = 16
    fvd_stride: int = 16                   # non-overlapping 16-frame clips
    fvd_resolution: int = 224
    face_frame_stride: int = 1             # every k-th frame into F-SIM and E-FID
    sync_max_offset: int = 15
    device: str = "cpu"
    batch_size: int = 16

    def __post_init__(self):
        if isinstance(self.metrics, str):
            self.metrics = [m.strip() for m in self.metrics.split(",") if m.strip()]
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
        if self.expression not in ("landmarks", "deep3d"):
            raise ValueError(f"expression must be landmarks | deep3d, not {self.expression!r}")
        if self.identity not in ("dlib", "insightface"):
            raise ValueError(f"identity must be dlib | insightface, not {self.identity!r}")
        for name in ("fid_frame_stride", "fvd_clip_frames", "fvd_stride", "fvd_resolution", "face_frame_stride",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.resolution is not None and self.resolution < 16:
            raise ValueError("resolution must be >= 16")
        if self.sync_max_offset < 1:
            raise ValueError("sync_max_offset must be >= 1")
