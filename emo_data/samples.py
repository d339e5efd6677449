"""Per-clip assembly: a selected clip plus its head motion and audio features -> shard sample.

The sample's json (:class:`emo_data.shards.SampleMeta`) references the build config by
``config_sha256``; the config itself is stored once, in the shard index and ``build.json``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import __version__
from .config import BuildConfig
from .shards import SPEED_BUCKET_FORMULA, SampleMeta, config_sha256, encode_sample, wav_bytes
from .stage import Stage
from .types import ClipCandidate, ClipSample


def face_union_mask(face_boxes: np.ndarray, size: int) -> np.ndarray:
    """EMO's face-locator mask M: the union of the per-frame face boxes (not their bounding box)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    for x0, y0, x1, y1 in np.asarray(face_boxes, dtype=np.float64):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), size), min(int(np.ceil(y1)), size)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = 255
    return mask


@dataclass
class SampleInput:
    clip: ClipCandidate
    head_pose: np.ndarray        # [T, 6]
    head_speed: np.ndarray       # [T]
    speed_buckets: np.ndarray    # [T, d]
    audio_emb: Optional[np.ndarray] = None  # [T, L, D] float16
    head_pose_raw: Optional[np.ndarray] = None  # [T, 6] per-frame pose before smoothing
    audio_emb_info: Optional[dict[str, Any]] = None  # encoder, layers, num_layers, dim
    face_backend: str = ""
    landmark_format: str = ""
    speech_backend: str = ""


class SampleAssemblyStage(Stage[SampleInput, ClipSample]):
    name = "assemble"

    def __init__(self, config: Optional[BuildConfig] = None):
        super().__init__()
        self.config = config or BuildConfig()
        self.config_sha256 = config_sha256(self.config.to_dict())

    def process(self, item: SampleInput) -> ClipSample:
        clip = item.clip
        cfg = self.config
        S = cfg.clip.crop_size
        T = clip.num_frames
        identity = clip.identity_embedding if clip.identity_embedding is not None else np.zeros(0, np.float32)
        meta = SampleMeta(
            key=clip.key,
            source_id=clip.source.source_id,
            source_path=clip.source.path,
            kind=clip.source.kind,
            language=clip.source.language,
            licence=clip.source.licence,
            clip_index=clip.clip_index,
            start_s=round(clip.start_s, 6),
            end_s=round(clip.start_s + T / clip.fps, 6),
            fps=clip.fps,
            num_frames=T,
            sample_rate=clip.sample_rate,
            num_audio_samples=int(len(clip.audio)),
            crop_size=S,
            crop_box=[float(v) for v in clip.crop_box],
            source_size=list(clip.source_size),
            landmark_count=int(clip.landmarks.shape[1]),
            landmark_format=item.landmark_format,
            identity_dim=int(identity.shape[0]),
            identity=clip.source.identity,   # the manifest's id, or filled by the split step
            split=None,
            speed_buckets={"centers": list(cfg.speed.centers), "radii": list(cfg.speed.radii), "formula": SPEED_BUCKET_FORMULA},
            head_speed_mean=float(np.mean(item.head_speed)) if T else 0.0,
            audio_emb=item.audio_emb_info if item.audio_emb is not None else None,
            face_backend=item.face_backend,
            speech_backend=item.speech_backend,
            scores=clip.scores,
            # the lip-sync / frozen-face gate: backend, measured offset (> 0 = audio late), confidence,
            # the score curve over offsets, the decision and the shift applied to wav / audio_emb
            sync=clip.sync,
            quality=clip.quality or None,
            audio_source=clip.audio_source,   # what the gates and audio features heard: mix | vocals
            vocals=clip.vocals_info,
            emo_version=__version__,
            config_sha256=self.config_sha256,
        )
        return ClipSample(
            key=clip.key,
            mp4=clip.mp4,
            wav=wav_bytes(clip.audio, clip.sample_rate),
            face_mask=face_union_mask(clip.face_boxes, S),
            face_boxes=clip.face_boxes.astype(np.float32),
            landmarks=clip.landmarks.astype(np.float32),
            head_pose=np.asarray(item.head_pose, np.float32),
            head_pose_raw=None if item.head_pose_raw is None else np.asarray(item.head_pose_raw, np.float32),
            head_speed=np.asarray(item.head_speed, np.float32),
            speed_buckets=np.asarray(item.speed_buckets, np.float32),
            identity_emb=identity.astype(np.float32),
            meta=meta,
            audio_emb=item.audio_emb,
        )


def sample_members(sample: ClipSample) -> dict[str, bytes]:
    return encode_sample(sample)
