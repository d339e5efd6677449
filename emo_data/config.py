"""Build configuration as dataclasses.

A build stores its config once, as ``BuildConfig.to_stored()`` (its fields plus ``_class`` and
``_version``): in ``build.json`` and in each shard's index, where every sample's json names it by
``config_sha256`` (docs/shards.md), so a shard always says how it was made, in the spirit of
diffusers' ``register_to_config``. ``from_dict`` reads every layout stored so far.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .shards.contract import (
    CONFIG_CLASS_KEY,
    CONFIG_VERSION_KEY,
    CROP_SCALE,
    DEFAULT_CROP_SIZE,
    DEFAULT_FPS,
    DEFAULT_SPEED_CENTERS,
    DEFAULT_SPEED_RADII,
    SAMPLE_RATE,
)


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass ``cls`` from a (possibly partial) nested dict; unknown keys are errors."""
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"unknown config key {cls.__name__}.{key}")
        ftype = fields[key].type
        sub = _NESTED.get(ftype) if isinstance(ftype, str) else None
        if sub is not None and isinstance(value, dict):
            value = _from_dict(sub, value)
        elif isinstance(value, list) and fields[key].default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = list(value)
        kwargs[key] = value
    return cls(**kwargs)


def _unwrap_stored(cls, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(fields, layout version) of a stored config; checks the class it was stored as."""
    data = dict(data)
    stored_class = data.pop(CONFIG_CLASS_KEY, None)
    version = data.pop(CONFIG_VERSION_KEY, 1)
    if stored_class is not None and stored_class != cls.__name__:
        raise ValueError(f"a stored {stored_class} is not a {cls.__name__}")
    if not isinstance(version, int) or version > cls.CONFIG_VERSION:
        raise ValueError(f"{cls.__name__} layout version {version!r} is newer than this code reads "
                         f"({cls.CONFIG_VERSION}): update emo")
    return data, version


def _redact_secrets(config, data: dict[str, Any]) -> dict[str, Any]:
    """Blank every field marked ``metadata={"secret": True}`` (tokens, credentials), at any depth."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret"):
            data[f.name] = None
        elif dataclasses.is_dataclass(value) and isinstance(data.get(f.name), dict):
            _redact_secrets(value, data[f.name])
    return data


class ConfigBase:
    # Layout version of the stored fields: raise it when a field is renamed, moved or removed, and
    # teach ``_upgrade`` to read the older layout. Stored configs without markers are version 1.
    CONFIG_VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        """The config's fields, as fingerprints and digests compare them: secrets are never part of it."""
        return _redact_secrets(self, dataclasses.asdict(self))  # type: ignore[call-overload]

    def to_stored(self) -> dict[str, Any]:
        """The config as outputs store it: its class and layout version, then :meth:`to_dict`."""
        return {CONFIG_CLASS_KEY: type(self).__name__, CONFIG_VERSION_KEY: self.CONFIG_VERSION, **self.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Fields (all or some), stored with or without class / version markers, in any layout
        version up to this code's; unknown keys are errors."""
        return _from_dict(cls, cls._upgrade(*_unwrap_stored(cls, data)))

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Stored fields of layout ``version`` -> this code's layout (nothing to do by default)."""
        return data

    def validate(self):
        """Check this config and every nested one again (after fields were set one by one, as a
        command line does); returns it. Construction already checks."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value.validate()
        check = getattr(self, "__post_init__", None)
        if check is not None:
            check()
        return self


@dataclass
class DecodeConfig(ConfigBase):
    fps: float = DEFAULT_FPS        # output frame rate: VFR sources are resampled by timestamp
    audio_sample_rate: int = SAMPLE_RATE  # mono float32 for VAD and wav2vec
    # PyAV only: it gives per-frame timestamps (VFR-safe) and decoded the samples ~4x faster than
    # decord here (bench/build_throughput.py).
    threads: int = 0                # decoder threads; 0 = library default

    def __post_init__(self) -> None:
        if not 1.0 <= float(self.fps) <= 120.0:
            raise ValueError(f"decode.fps must be in [1, 120], got {self.fps}")
        if self.audio_sample_rate not in (8000, 16000, 22050, 24000, 44100, 48000):
            raise ValueError(f"decode.audio_sample_rate {self.audio_sample_rate} is not a standard rate (wav2vec wants 16000)")
        if self.threads < 0:
            raise ValueError("decode.threads must be >= 0")


@dataclass
class SpeechConfig(ConfigBase):
    backend: str = "silero"         # "silero" (offline, ships weights) | "pyannote" | "none"
    threshold: float = 0.5          # silero speech probability threshold
    min_speech_s: float = 0.25
    min_silence_s: float = 0.6      # shorter pauses are bridged: a clip may hold a breath
    pad_s: float = 0.1
    pyannote_pipeline: Optional[str] = None  # local dir / config.yaml / hub id of a diarization pipeline
    # A credential, not a setting: never stored (to_dict() writes None). Prefer the environment:
    # PYANNOTE_TOKEN or HF_TOKEN. A value set here is used by this process, and the Ray build
    # hands it to its workers as PYANNOTE_TOKEN.
    pyannote_token: Optional[str] = field(default=None, repr=False, metadata={"secret": True})

    def __post_init__(self) -> None:
        if self.backend not in ("silero", "pyannote", "none"):
            raise ValueError(f"speech.backend must be silero, pyannote or none, got {self.backend!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"speech.threshold must be in (0, 1), got {self.threshold}")
        if min(self.min_speech_s, self.min_silence_s, self.pad_s) < 0:
            raise ValueError("speech.min_speech_s, min_silence_s and pad_s must be >= 0")


@dataclass
class SceneConfig(ConfigBase):
    threshold: float = 0.15         # cut when the HSV+edge frame difference (0..1) exceeds this
    adaptive_ratio: float = 3.0     # ... and exceeds this x the median of the recent differences
    adaptive_window: int = 12
    min_scene_frames: int = 5       # no two cuts closer than this
    analysis_size: int = 64         # frames are compared at this size

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0 or self.adaptive_ratio < 1.0:
            raise ValueError("scene: threshold in (0, 1] and adaptive_ratio >= 1 are required")
        if self.adaptive_window < 1 or self.min_scene_frames < 1 or self.analysis_size < 8:
            raise ValueError("scene: adaptive_window >= 1, min_scene_frames >= 1 and analysis_size >= 8 are required")


@dataclass
class FaceConfig(ConfigBase):
    backend: str = "dlib"           # "dlib" (offline default) | "insightface" | "face_alignment"
    model_root: Optional[str] = None  # where insightface / face-alignment weights live
    detect_every: int = 5           # run the detector every k frames, track in between
    detect_max_side: int = 320      # frames are downscaled to this long side for detection
    upsample: int = 0               # dlib HOG pyramid upsampling (finds smaller faces, slower)
    min_face_fraction: float = 0.15 # face box long side / frame short side below this is rejected
    min_face_px: int = 96           # ... and so is a face box under this many source pixels
    max_track_lost: int = 2         # detections a track may miss before it is dropped
    embed_frames: int = 2           # frames per clip averaged into the identity embedding (~0.1 s each)
    # Head pose (docs/pose.md). Each track's rigid landmarks follow optical flow and move this
    # fraction of the way to the detected ones per frame: for their joint shift, in-plane turn and
    # scale (blend), and for the change of their shape, which carries yaw and pitch (shape
    # blend). 1.0 and 1.0 = the detected landmarks as they are.
    landmark_flow_blend: float = 0.02
    landmark_shape_blend: float = 0.05
    # A face tilted (rolled) by more than this many degrees gets its landmarks, and a missed
    # detection a second try, on a crop turned upright by the tracked roll.
    derotate_above_deg: float = 15.0

    def __post_init__(self) -> None:
        if not (0.0 < self.landmark_flow_blend <= 1.0 and 0.0 < self.landmark_shape_blend <= 1.0):
            raise ValueError("face.landmark_flow_blend and face.landmark_shape_blend must be in (0, 1], got "
                             f"{self.landmark_flow_blend}, {self.landmark_shape_blend}")
        if self.derotate_above_deg < 0:
            raise ValueError(f"face.derotate_above_deg must be >= 0, got {self.derotate_above_deg}")


@dataclass
class ClipConfig(ConfigBase):
    min_seconds: float = 2.0        # must hold n+f = 4+12 frames with room to sample windows
    max_seconds: float = 10.0
    crop_size: int = DEFAULT_CROP_SIZE
    crop_scale: float = CROP_SCALE  # square crop side = this x the long side of the union face box
    buffer_scale: float = 3.0       # frames are buffered inside a square of this x face size
    # A run of at most this many frames whose one face is merely too small or silent, inside a
    # good span, stays in the clip (a blink of the size estimate or a breath does not cut it).
    max_gap_frames: int = 3
    mp4_crf: int = 18
    mp4_preset: str = "veryfast"
    # A second face makes a frame multi_face only when it was found by at least this many
    # detections in a row and scores at least this fraction of the main face's detection score
    # (a one-off or very weak detection on a badge or a poster is not a second person).
    second_face_min_detections: int = 2
    second_face_min_score_ratio: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"clip: need 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.crop_size < 16 or self.crop_scale <= 0 or self.buffer_scale < self.crop_scale:
            raise ValueError("clip: crop_size >= 16, crop_scale > 0 and buffer_scale >= crop_scale are required")
        if self.max_gap_frames < 0 or self.second_face_min_detections < 1:
            raise ValueError("clip: max_gap_frames >= 0 and second_face_min_detections >= 1 are required")


@dataclass
class SpeedConfig(ConfigBase):
    # EMO does not publish d, c_i, r_i: the contract's defaults, refit with `emo-data fit-buckets`.
    centers: list[float] = field(default_factory=lambda: list(DEFAULT_SPEED_CENTERS))
    radii: list[float] = field(default_factory=lambda: list(DEFAULT_SPEED_RADII))
    # The per-frame pose is smoothed on rotations (quaternions) by a centred local polynomial of
    # this order over this many frames before speeds are taken (emo_data/pose.py, docs/pose.md).
    smooth_frames: int = 15
    smooth_order: int = 2

    def __post_init__(self) -> None:
        if len(self.centers) != len(self.radii) or not self.centers:
            raise ValueError("speed: centers and radii must be non-empty and of the same length")
        if any(r <= 0 for r in self.radii):
            raise ValueError("speed: every radius must be > 0")
        if self.smooth_frames < 1 or self.smooth_order < 0:
            raise ValueError("speed: smooth_frames >= 1 and smooth_order >= 0 are required")


@dataclass
class AudioFeatureConfig(ConfigBase):
    enabled: bool = True
    encoder: str = "facebook/wav2vec2-base-960h"  # local dir or hub id
    layers: Optional[list[int]] = None  # hidden-state indices to keep; None = all
    dtype: str = "float16"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"audio_features.dtype must be float16 or float32, got {self.dtype!r}")
        if self.layers is not None and (not self.layers or any(int(i) != i for i in self.layers)):
            raise ValueError(f"audio_features.layers must be None or hidden-state indices (-1 = last), got {self.layers}")
        if not self.encoder:
            raise ValueError("audio_features.encoder must name a local directory or a hub id")


@dataclass
class IdentityConfig(ConfigBase):
    distance_threshold: float = 0.5  # dlib embeddings: same person below ~0.6
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"identity.test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.distance_threshold <= 0:
            raise ValueError("identity.distance_threshold must be > 0")


@dataclass
class ShardConfig(ConfigBase):
    max_samples: int = 200
    max_bytes: int = 1 << 30
    # Separate shards per value of these sample fields ("kind", "language"), named
    # <split>-<kind>-<language>-NNNNNN.tar, so a training job can pick or weight them by name.
    group_by: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1 << 20:
            raise ValueError("shards: max_samples >= 1 and max_bytes >= 1 MiB are required")
        unknown = [g for g in self.group_by if g not in ("kind", "language")]
        if unknown:
            raise ValueError(f"shards.group_by: cannot group shards by {unknown}: choose from kind, language")


VOCALS_MODES = ("auto", "always", "never")
VOCALS_BACKENDS = ("auto", "htdemucs", "mdx_onnx")


def vocals_backend_for(path: str) -> str:
    """Which separator reads a weights file, by its extension."""
    lower = path.lower()
    if lower.endswith((".th", ".pt", ".pth", ".safetensors")):
        return "htdemucs"
    if lower.endswith(".onnx"):
        return "mdx_onnx"
    raise ValueError(f"{path}: cannot tell the separator backend from the extension "
                     "(.th/.safetensors = htdemucs, .onnx = mdx_onnx); set VocalsConfig.backend")


@dataclass
class VocalsConfig(ConfigBase):
    # "auto": separate sources whose manifest kind is in ``auto_kinds``, when weights are
    # configured (no weights: no separation, and the decision says so; the build goes on).
    # "always": every source; weights required. "never": no source.
    mode: str = "auto"
    backend: str = "auto"               # "auto" (by the weights file's extension) | "htdemucs" | "mdx_onnx"
    weights: Optional[str] = None       # local file: .th / .safetensors (htdemucs) or .onnx (mdx_onnx)
    device: str = "cpu"                 # "cpu" | "cuda" | "cuda:N"
    chunk_s: Optional[float] = None     # audio per model call; None = the model's own segment (see module doc)
    overlap: float = 0.25               # fraction of a segment shared with the next, cross-faded
    batch_segments: int = 1             # segments per model call (GPU throughput); memory grows with it
    auto_kinds: list[str] = field(default_factory=lambda: ["singing", "film"])
    # MDX-Net STFT parameters that an ONNX file does not carry. Defaults are those of UVR's vocal
    # MDX-Net models (Kim_Vocal_1/2, UVR-MDX-NET-Voc_FT: n_fft 7680, hop 1024, dim_f 3072, dim_t 256).
    mdx_n_fft: int = 7680
    mdx_hop: int = 1024
    mdx_dim_t: Optional[int] = None     # only for files with a dynamic time axis; None = from the file, else 256

    def __post_init__(self) -> None:
        if self.mode not in VOCALS_MODES:
            raise ValueError(f"VocalsConfig.mode must be one of {VOCALS_MODES}, not {self.mode!r}")
        if self.backend not in VOCALS_BACKENDS:
            raise ValueError(f"VocalsConfig.backend must be one of {VOCALS_BACKENDS}, not {self.backend!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights.strip()):
            raise ValueError("VocalsConfig.weights must be a path to a local file or None")
        if self.weights is not None and self.backend == "auto":
            vocals_backend_for(self.weights)  # raises for an extension no backend reads
        if self.chunk_s is not None and not (self.chunk_s > 0):
            raise ValueError(f"VocalsConfig.chunk_s must be > 0 seconds or None, not {self.chunk_s!r}")
        if not (0.0 <= self.overlap <= 0.5):
            raise ValueError(f"VocalsConfig.overlap must be in [0, 0.5], not {self.overlap!r}")
        if int(self.batch_segments) != self.batch_segments or self.batch_segments < 1:
            raise ValueError(f"VocalsConfig.batch_segments must be a positive integer, not {self.batch_segments!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"VocalsConfig.device must be 'cpu', 'cuda' or 'cuda:N', not {self.device!r}")
        self.auto_kinds = [str(k).strip().lower() for k in self.auto_kinds]
        if self.mdx_n_fft <= 0 or self.mdx_hop <= 0 or (self.mdx_dim_t is not None and self.mdx_dim_t < 2):
            raise ValueError("VocalsConfig.mdx_n_fft and mdx_hop must be > 0 and mdx_dim_t >= 2")

    def decide(self, kind: str) -> "VocalsDecision":
        """Whether a source of manifest ``kind`` gets separated, and why (stored per clip)."""
        kind_norm = (kind or "unknown").strip().lower()
        if self.mode == "never":
            return VocalsDecision(False, "mode_never", "vocal separation is off (--vocals never)")
        if self.mode == "always":
            return VocalsDecision(True, "mode_always", "every source is separated (--vocals always)")
        if kind_norm not in self.auto_kinds:
            return VocalsDecision(False, "kind_not_separated",
                                  f"kind {kind_norm!r} is not one of {self.auto_kinds} that --vocals auto separates")
        if self.weights is None:
            return VocalsDecision(False, "no_weights_configured",
                                  f"kind {kind_norm!r} would be separated, but no separator weights are "
                                  "configured (--vocals-weights); the mix was used")
        return VocalsDecision(True, "kind_separated", f"kind {kind_norm!r} is separated by --vocals auto")


@dataclass(frozen=True)
class VocalsDecision:
    separate: bool
    reason: str     # mode_never | mode_always | kind_not_separated | no_weights_configured | kind_separated
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"separate": self.separate, "reason": self.reason, "detail": self.detail}


@dataclass
class QualityConfig(ConfigBase):
    frames: int = 3                        # frames scored per clip: first, middle, last (LatentSync)
    min_face_quality: Optional[float] = None  # optional gate on ``face_quality`` (None: store only)
    iqa_backend: Optional[str] = None      # None | "musiq": a learned score beside the offline ones
    iqa_weights: Optional[str] = None      # local MUSIQ state dict (.pth / .safetensors)
    iqa_device: str = "cpu"

    def __post_init__(self) -> None:
        if int(self.frames) != self.frames or self.frames < 1:
            raise ValueError(f"QualityConfig.frames must be a positive integer, not {self.frames!r}")
        if self.min_face_quality is not None and not (0.0 <= self.min_face_quality <= 1.0):
            raise ValueError(f"QualityConfig.min_face_quality must be in [0, 1] or None, not {self.min_face_quality!r}")
        if self.iqa_backend not in (None, "musiq"):
            raise ValueError(f"QualityConfig.iqa_backend must be None or 'musiq', not {self.iqa_backend!r}")
        if self.iqa_backend is not None and not self.iqa_weights:
            raise ValueError(f"iqa_backend {self.iqa_backend!r} needs iqa_weights (a local MUSIQ checkpoint, see docs/sync.md)")


@dataclass
class SyncConfig(ConfigBase):
    """The lip-sync, frozen-face and face-quality gate run on every clip (docs/sync.md).

    Offsets are in frames; > 0 means the audio is late. Decisions, in order: a mouth that does
    not move while the voice is active -> ``static_face``; a face-quality score under
    ``QualityConfig.min_face_quality`` -> ``low_quality``; confidence under ``min_confidence`` ->
    ``out_of_sync``; |offset| <= ``keep_tolerance`` -> keep; a confident offset up to
    ``max_correction`` -> the clip's audio is re-cut to match the frames (``correct``); a
    confident larger one -> ``out_of_sync``. ``mode="score"`` stores every score and the decision
    the gate would take, but keeps every clip as it is.
    """

    enabled: bool = True                    # False (--no-sync-gate): no scoring, no decisions
    mode: str = "enforce"                   # enforce | score
    backend: str = "auto"                   # auto (syncnet when weights are given, else envelope) | envelope | syncnet
    syncnet_weights: Optional[str] = None   # local syncnet_v2.model / .safetensors
    device: str = "cpu"                     # the Ray build moves SyncNet to the GPU it was given
    max_offset: int = 15                    # frames searched each way (SyncNet's convention: +-15 = +-0.6 s)
    keep_tolerance: int = 1                 # |offset| <= this: keep the clip as it is
    max_correction: int = 15                # confident |offset| <= this: re-cut the audio to match
    # None = the backend's default: syncnet 3.0 (LatentSync's threshold); envelope: no rejection
    # (measured: it cannot tell a dubbed voice from the true one on 2-10 s clips, docs/sync.md)
    min_confidence: Optional[float] = None
    # None = the backend's default: syncnet 3.0; envelope 4.0 (well above chance, ~2-2.5)
    correct_min_confidence: Optional[float] = None
    static_check: bool = True               # reject a mouth that does not move while the voice is active
    static_max_motion: float = 0.5          # 90th percentile of mouth motion (grey levels) below this = static

    def __post_init__(self) -> None:
        if self.mode not in ("enforce", "score"):
            raise ValueError(f"sync.mode must be 'enforce' or 'score', got {self.mode!r}")
        if self.backend not in ("auto", "envelope", "syncnet"):
            raise ValueError(f"sync.backend must be auto, envelope or syncnet, got {self.backend!r}")
        if self.backend == "syncnet" and not self.syncnet_weights:
            raise ValueError("sync.backend 'syncnet' needs sync.syncnet_weights (--syncnet-weights PATH)")
        if not (0 <= self.keep_tolerance <= self.max_correction <= self.max_offset):
            raise ValueError("sync: need 0 <= keep_tolerance <= max_correction <= max_offset, got "
                             f"{self.keep_tolerance}, {self.max_correction}, {self.max_offset}")
        if self.static_max_motion < 0:
            raise ValueError("sync.static_max_motion must be >= 0")

    @property
    def backend_name(self) -> str:
        if self.backend == "auto":
            return "syncnet" if self.syncnet_weights else "envelope"
        return self.backend

    def thresholds(self) -> tuple[Optional[float], float]:
        """(min_confidence, correct_min_confidence) with the backend defaults filled in."""
        syncnet = self.backend_name == "syncnet"
        min_conf = self.min_confidence if self.min_confidence is not None else (3.0 if syncnet else None)
        correct = self.correct_min_confidence if self.correct_min_confidence is not None else (3.0 if syncnet else 4.0)
        return min_conf, correct


@dataclass
class BuildConfig(ConfigBase):
    # 2: stored with class / version markers. 1 (stored before them) may also hold fields since
    # removed or moved: decode.backend (only "pyav" was ever implemented) and sync.min_face_quality
    # (now quality.min_face_quality).
    CONFIG_VERSION = 2

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    face: FaceConfig = field(default_factory=FaceConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    audio_features: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    vocals: VocalsConfig = field(default_factory=VocalsConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    @classmethod
    def _upgrade(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version >= 2:
            return data
        data = dict(data)
        decode = data.get("decode")
        if isinstance(decode, dict) and "backend" in decode:  # decoding was PyAV whatever it said
            data["decode"] = {k: v for k, v in decode.items() if k != "backend"}
        sync = data.get("sync")
        if isinstance(sync, dict) and "min_face_quality" in sync:
            data["sync"] = {k: v for k, v in sync.items() if k != "min_face_quality"}
            quality = dict(data.get("quality") or {})
            quality.setdefault("min_face_quality", sync["min_face_quality"])
            data["quality"] = quality
        return data


@dataclass
class StageResources(ConfigBase):
    """What one operator of the Ray build asks for (see docs/ray.md)."""

    num_cpus: float = 0.0                 # CPUs reserved per actor / task
    num_gpus: Optional[float] = None      # None = auto: model stages take 1 GPU each when the cluster has GPUs
    concurrency: Optional[int] = None     # actors (model stages) or tasks in flight; None = a default per stage
    batch_size: int = 1                   # items per call (clips for per-clip stages)

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("stage resources: num_cpus and num_gpus must be >= 0")
        if (self.concurrency is not None and self.concurrency < 1) or self.batch_size < 1:
            raise ValueError("stage resources: concurrency (when set) and batch_size must be >= 1")


@dataclass
class ExecutorConfig(ConfigBase):
    """How a build runs, not what it makes: kept out of ``BuildConfig`` so shards built by either
    executor, with any number of workers, carry the same config.

    The Ray build is a chain of operators: ``analyse`` (probe, audio decode, speech activity or
    diarization: an actor pool holding the speech model) -> ``video`` (the one streaming pass
    over the frames: scene cuts, face model, clip selection, crop, mp4: an actor pool holding
    the face backend) -> ``sync_gate`` (actor pool: lip sync / frozen face / quality; SyncNet on a
    GPU when there is one) -> ``head_pose`` (CPU tasks) -> ``audio_features`` (wav2vec actor pool)
    -> ``write`` (CPU tasks writing staged parts). The video pass does most of the work, so it
    reserves whole CPUs and ``workers`` counts its actors; the other operators reserve none by
    default and are bounded by their ``concurrency`` instead (on a CPU-only cluster with
    wav2vec, give ``audio_features`` ``num_cpus`` so it gets cores of its own).
    """

    workers: Optional[int] = None         # video-pass actors (and CPUs of an embedded Ray); None = all CPUs
    analyse: StageResources = field(default_factory=lambda: StageResources(num_cpus=0.0))
    video: StageResources = field(default_factory=lambda: StageResources(num_cpus=1.0, num_gpus=0.0))
    # The per-clip steps (emo_data/clip_steps.py: sync_gate, head_pose, audio_features, write, and
    # any added later), by name; a step not named here uses the default it declares. batch_size
    # stays 1: a batch waits until it is full, and a source is sealed only when its last clip is back.
    clip_steps: dict[str, StageResources] = field(default_factory=dict)
    object_store_memory: int = 768 * 1024 ** 2   # embedded Ray only: clips in flight, not the corpus
    worker_niceness: int = 0              # embedded Ray only; Ray's own default (15) starves workers on a busy machine
    idle_workers: Optional[int] = None    # embedded Ray only: idle worker processes kept for reuse; None = 4 x workers + 4
    max_restarts: int = -1                # Ray actor restarts after a worker process dies (-1 = always)
    max_task_retries: int = 1             # retries of a source on a restarted actor after a worker crash
    source_retries: int = 1               # extra driver-side rounds for sources still unfinished after a round
    max_failure_fraction: float = 1.0     # exit non-zero if more than this share of sources failed (1.0 = never)
    # Stall watchdog: a round with no output row for this long ends the build; every source not
    # yet sealed becomes a failed row (reason "stalled"). A clip or a sealed source counts as output.
    stall_timeout_s: float = 900.0
    crash_on_source: Optional[str] = None  # FAULT INJECTION (tests only): the video worker calls os._exit(1) on this source_id

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError("executor.workers must be >= 1")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"executor.max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        if self.stall_timeout_s <= 0 or self.source_retries < 0:
            raise ValueError("executor.stall_timeout_s must be > 0 and source_retries >= 0")

    def resources_for(self, step: str, default: StageResources) -> StageResources:
        """The resources of per-clip step ``step``: configured, else the step's own default."""
        return self.clip_steps.get(step, default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Also reads the layout before the per-clip steps were declared by name (``audio_features``,
        ``head_pose``, ``write``, ``sync_gate`` at the top level), so older files keep working."""
        data, _version = _unwrap_stored(cls, data)
        steps = {k: v for k, v in dict(data.pop("clip_steps", None) or {}).items()}
        for legacy in ("sync_gate", "head_pose", "audio_features", "write"):
            if legacy in data:
                steps.setdefault(legacy, data.pop(legacy))
        config = _from_dict(cls, data)
        config.clip_steps = {name: value if isinstance(value, StageResources) else StageResources.from_dict(value)
                             for name, value in steps.items()}
        return config


_NESTED = {
    "DecodeConfig": DecodeConfig,
    "SpeechConfig": SpeechConfig,
    "SceneConfig": SceneConfig,
    "FaceConfig": FaceConfig,
    "ClipConfig": ClipConfig,
    "SpeedConfig": SpeedConfig,
    "AudioFeatureConfig": AudioFeatureConfig,
    "IdentityConfig": IdentityConfig,
    "ShardConfig": ShardConfig,
    "StageResources": StageResources,
    "SyncConfig": SyncConfig,
    "VocalsConfig": VocalsConfig,
    "QualityConfig": QualityConfig,
}
