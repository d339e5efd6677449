"""The EMO shard contract: what a sample holds, in which dtype and shape, and what its json says.

Writers (:mod:`emo_data.samples`, :mod:`emo_data.finalize`, ``emo-data add-features`` /
``add-latents`` / ``fit-buckets --apply``), the validator, the inspector and the trainer all import
these definitions; nothing else defines a member, a per-sample key or a shared constant.

A shard is a WebDataset tar, ``<split>-NNNNNN.tar``; one sample per clip, key
``<source_id>_<clip:05d>`` (no dots); members are ``.npy`` (never pickle), ``.json``, ``.png``,
``.mp4`` and ``.wav`` only (:data:`MEMBERS`). Next to each tar, ``<shard>.index.json`` lists every
sample's members (byte offset, size, SHA-256) and metadata, and holds the build configs the
samples reference (``configs``: ``config_sha256`` -> stored config).

Two versions, because they change for different reasons:

* :data:`SCHEMA_VERSION`: the members, their dtypes and shapes. A trainer reads exactly this version.
* :data:`SAMPLE_META_VERSION`: the layout of the per-sample json (:class:`SampleMeta`). Version 1
  carried the whole build config in every sample (``config``); version 2 carries
  ``config_sha256``, a reference to the config stored once in the shard index and in
  ``build.json``. Every version stays readable: missing keys get defaults, unknown keys are kept.

This module needs only numpy and the standard library, so any process can import it cheaply.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

SCHEMA_VERSION = 1
SAMPLE_META_VERSION = 2

SAMPLE_RATE = 16000       # Hz of every stored wav; wav2vec, Silero VAD and SyncNet all take 16 kHz mono
DEFAULT_FPS = 25.0        # frames per second of the clips unless the build config says otherwise
DEFAULT_CROP_SIZE = 512   # side of the stored square clip, pixels
# Side of the square face crop = this x the long side of the clip's union face box. The data side
# crops clips with it (ClipConfig.crop_scale) and the model side crops a reference image the same way.
CROP_SCALE = 1.8

# Speed buckets (EMO Sec. 3.3): s_i = tanh((w - c_i) / r_i * 3) of the head rotation speed w in
# degrees per frame. EMO publishes neither d nor c_i, r_i: 9 buckets over 0..~3 deg/frame, refit to
# a corpus with `emo-data fit-buckets`.
SPEED_BUCKET_FORMULA = "tanh((w - c) / r * 3)"
DEFAULT_SPEED_CENTERS = (0.0, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5)
DEFAULT_SPEED_RADII = (0.05, 0.05, 0.075, 0.1, 0.125, 0.2, 0.25, 0.4, 0.75)
HEAD_SPEED_UNIT = "degrees per frame"


def speed_bucket_encoding(speed, centers: Sequence[float] = DEFAULT_SPEED_CENTERS,
                          radii: Sequence[float] = DEFAULT_SPEED_RADII) -> np.ndarray:
    """``s_i = tanh((w - c_i) / r_i * 3)``, float32: a scalar speed gives ``[d]``, ``[T]`` gives ``[T, d]``."""
    c = np.asarray(centers, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"{c.size} speed-bucket centres but {r.size} radii: they must have the same length")
    if np.any(r <= 0):
        raise ValueError("speed-bucket radii must be positive")
    w = np.asarray(speed, dtype=np.float64)
    return np.tanh((w[..., None] - c) / r * 3.0).astype(np.float32)


# --------------------------------------------------------------------------- members
@dataclass(frozen=True)
class MemberSpec:
    """One tar member: ``shape`` names its axes (``T`` frames, ``K`` landmarks, ``d`` speed buckets,
    ``E`` identity dims, ``L``/``D`` audio layers/dims, ``C``/``s`` latent channels/side, ``S`` crop
    side), resolved per sample from its :class:`SampleMeta` (:meth:`SampleMeta.dims`)."""

    name: str
    required: bool
    dtype: str                 # numpy dtype of an .npy member; the encoding of the others
    shape: tuple[Union[str, int], ...]
    meaning: str


# Tar order: a sample's members are written in this order (part of "same inputs, same bytes").
MEMBERS = (
    MemberSpec("mp4", True, "H.264 yuv420p", ("T", "S", "S", 3), "the cropped clip at the clip fps"),
    MemberSpec("wav", True, "PCM16 mono", ("T * sample_rate / fps",), "the clip's audio, 16 kHz"),
    MemberSpec("face_mask.png", True, "uint8", ("S", "S"), "face-union mask M: 255 inside any frame's face box"),
    MemberSpec("face_boxes.npy", True, "float32", ("T", 4), "per-frame face box x0, y0, x1, y1 (crop pixels)"),
    MemberSpec("landmarks.npy", True, "float32", ("T", "K", 2), "per-frame landmarks (crop pixels)"),
    MemberSpec("head_pose.npy", True, "float32", ("T", 6), "yaw, pitch, roll (degrees), tx, ty, tz; smoothed"),
    MemberSpec("head_speed.npy", True, "float32", ("T",), "head rotation speed w, degrees per frame"),
    MemberSpec("speed_buckets.npy", True, "float32", ("T", "d"), "s_i = tanh((w - c_i) / r_i * 3)"),
    MemberSpec("identity_emb.npy", True, "float32", ("E",), "face embedding of the clip (identity splits)"),
    MemberSpec("json", True, "utf-8 json", (), "SampleMeta: metadata and the build-config reference"),
    MemberSpec("audio_emb.npy", False, "float16", ("T", "L", "D"), "wav2vec hidden states per frame"),
    MemberSpec("latents.npy", False, "float16", ("T", "C", "s", "s"), "VAE posterior means per frame, unscaled"),
    MemberSpec("head_pose_raw.npy", False, "float32", ("T", 6), "per-frame pose before smoothing"),
)
MEMBER_SPECS = {m.name: m for m in MEMBERS}
REQUIRED_MEMBERS = tuple(m.name for m in MEMBERS if m.required)
OPTIONAL_MEMBERS = tuple(m.name for m in MEMBERS if not m.required)
ALL_MEMBERS = tuple(m.name for m in MEMBERS)
NPY_MEMBERS = tuple(m.name for m in MEMBERS if m.name.endswith(".npy"))
# Extensions that imply pickle or arbitrary code: refused on read, reported by the validator.
UNSAFE_EXTENSIONS = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".ckpt", ".cls", ".joblib")
INDEX_SUFFIX = ".index.json"


# --------------------------------------------------------------------------- configs
# Stored configs carry their class and layout version beside their fields.
CONFIG_CLASS_KEY = "_class"
CONFIG_VERSION_KEY = "_version"
# BuildConfig sections that only finalisation reads (identity clusters, splits, shard sizes) and
# fields that change how fast a source is processed, not one byte of it: neither shapes a sample.
FINALIZE_ONLY_SECTIONS = ("identity", "shards")
NON_SHAPING_FIELDS = {("decode", "threads")}


def config_fields(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config without its class / version markers."""
    return {k: v for k, v in stored.items() if k not in (CONFIG_CLASS_KEY, CONFIG_VERSION_KEY)}


def as_stored_config(config: Mapping[str, Any], class_name: str = "BuildConfig") -> dict[str, Any]:
    """A config as stored: one without markers (written before they existed) is layout version 1."""
    if CONFIG_CLASS_KEY in config:
        return dict(config)
    return {CONFIG_CLASS_KEY: class_name, CONFIG_VERSION_KEY: 1, **config}


def sample_shaping_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a stored ``BuildConfig`` that shapes samples: every section except the
    finalize-only ones, without the non-shaping fields. A section added to BuildConfig later is
    covered without touching this function."""
    out: dict[str, Any] = {}
    for section, values in sorted(config_fields(config).items()):
        if section in FINALIZE_ONLY_SECTIONS:
            continue
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if (section, k) not in NON_SHAPING_FIELDS}
        out[section] = values
    return out


def config_sha256(config: Mapping[str, Any]) -> str:
    """The reference a sample keeps to its build config: SHA-256 of the sample-shaping part
    (canonical JSON: sorted keys, no spaces). Finalize-only settings (splits, shard sizes) do not
    change it, so re-splitting a corpus leaves every sample's json as it was."""
    canonical = json.dumps(sample_shaping_config(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- per-sample metadata
# Keys written only when they have a value (their absence means something: no latents were added,
# a record of meta_version 2 keeps no inline config, a foreign shard names no config).
_OMITTED_WHEN_NONE = ("config_sha256", "latents", "config")


@dataclass
class SampleMeta:
    """A sample's ``json`` member (and its ``meta`` in the shard index): every key any writer sets.

    :meth:`from_json` reads every :data:`SAMPLE_META_VERSION` so far: keys a record lacks get the
    defaults below, keys this code does not know are kept in :attr:`extra` and written back.
    """

    schema_version: int = SCHEMA_VERSION
    meta_version: int = SAMPLE_META_VERSION
    key: str = ""
    # where the clip comes from (the manifest row; finalisation refreshes path, kind, language, licence)
    source_id: Optional[str] = None
    source_path: Optional[str] = None
    kind: Optional[str] = None
    language: Optional[str] = None
    licence: Optional[str] = None
    clip_index: Optional[int] = None
    start_s: Optional[float] = None       # in the source, seconds
    end_s: Optional[float] = None
    # frames and audio
    fps: float = DEFAULT_FPS
    num_frames: int = 0                   # T
    sample_rate: int = SAMPLE_RATE
    num_audio_samples: Optional[int] = None
    crop_size: int = 0                    # S
    crop_box: Optional[list] = None       # square crop x0, y0, x1, y1 in source pixels
    source_size: Optional[list] = None    # source frame width, height
    landmark_count: Optional[int] = None  # K
    landmark_format: Optional[str] = None
    # identity (finalisation assigns identity and split)
    identity_dim: Optional[int] = None    # E
    identity: Optional[str] = None
    split: Optional[str] = None
    # head motion
    speed_buckets: dict = field(default_factory=dict)  # {"centers", "radii", "formula"}
    head_speed_unit: str = HEAD_SPEED_UNIT
    head_speed_mean: Optional[float] = None
    # optional members' descriptions
    audio_emb: Optional[dict] = None      # {"encoder", "layers", "num_layers", "dim", "rate", ...}
    latents: Optional[dict] = None        # emo-data add-latents: {"vae", "vae_fingerprint", "resolution", "channels", "latent_size", ...}
    # how the clip was found and judged
    face_backend: Optional[str] = None
    speech_backend: Optional[str] = None
    scores: dict = field(default_factory=dict)
    sync: Optional[dict] = None           # the lip-sync / frozen-face gate's scores and decision
    quality: Optional[dict] = None
    audio_source: Optional[str] = None    # what the gates and audio features heard: mix | vocals
    vocals: Optional[dict] = None
    # provenance
    emo_version: Optional[str] = None
    config_sha256: Optional[str] = None   # -> the shard index's "configs" (meta_version 2)
    config: Optional[dict] = None         # the whole build config inline (meta_version 1 only)
    extra: dict = field(default_factory=dict)  # keys this code does not know, kept as read

    # ----------------------------------------------------------------- reading and writing
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SampleMeta":
        if not isinstance(data, Mapping):
            raise ValueError(f"sample json must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("meta_version", 1)  # records before the version key: config inline
        values.setdefault("schema_version", None)  # every record ever written has one: absent = not a shard sample
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, data: Union[bytes, str]) -> "SampleMeta":
        """The ``json`` member's bytes (or text) -> SampleMeta; ValueError if it is not a json object."""
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode("utf-8")
        return cls.from_dict(json.loads(data))

    def to_dict(self) -> dict[str, Any]:
        """Every known key (those of :data:`_OMITTED_WHEN_NONE` only when set), then the unknown ones.
        Written by this code, so in this code's layout: ``meta_version`` is the current one."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in _OMITTED_WHEN_NONE:
                continue
            out[f.name] = value
        out["meta_version"] = SAMPLE_META_VERSION
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def to_json(self) -> bytes:
        """The ``json`` member: utf-8, sorted keys (same metadata, same bytes)."""
        from .codecs import json_default

        return json.dumps(self.to_dict(), sort_keys=True, default=json_default).encode("utf-8")

    # ----------------------------------------------------------------- derived values
    @property
    def speed_centers(self) -> list[float]:
        sb = self.speed_buckets if isinstance(self.speed_buckets, dict) else {}
        return [float(c) for c in sb.get("centers") or []]

    @property
    def speed_radii(self) -> list[float]:
        sb = self.speed_buckets if isinstance(self.speed_buckets, dict) else {}
        return [float(r) for r in sb.get("radii") or []]

    @property
    def duration_s(self) -> float:
        try:
            if self.num_frames and self.fps:
                return float(self.num_frames) / float(self.fps)
            if self.start_s is not None and self.end_s is not None:
                return float(self.end_s) - float(self.start_s)
        except (TypeError, ValueError):
            pass
        return 0.0

    def dims(self) -> dict[str, Optional[int]]:
        """The axis sizes :data:`MEMBERS` name, from this metadata (None = not stated)."""
        audio = self.audio_emb or {}
        latents = self.latents or {}
        return {"T": self.num_frames, "S": self.crop_size, "K": self.landmark_count,
                "d": len(self.speed_centers) or None, "E": self.identity_dim,
                "L": audio.get("num_layers"), "D": audio.get("dim"),
                "C": latents.get("channels"), "s": latents.get("latent_size")}

    def build_config(self, index: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
        """The stored build config this sample was made with (with its class / version markers):
        the one inline (meta_version 1), else the shard index's entry for :attr:`config_sha256`,
        else the single config an index of meta_version 1 stored; None when nothing says."""
        if isinstance(self.config, dict):
            return as_stored_config(self.config)
        if index is None:
            return None
        if self.config_sha256:
            stored = (index.get("configs") or {}).get(self.config_sha256)
            return dict(stored) if isinstance(stored, dict) else None
        legacy = index.get("config")
        return as_stored_config(legacy) if isinstance(legacy, dict) and legacy else None

    def crop_scale(self, index: Optional[Mapping[str, Any]] = None) -> float:
        """The crop scale the clip was cut with (its build config's ``clip.crop_scale``, else the default)."""
        clip = (self.build_config(index) or {}).get("clip")
        value = clip.get("crop_scale") if isinstance(clip, dict) else None
        return float(value) if isinstance(value, (int, float)) and value > 0 else CROP_SCALE
