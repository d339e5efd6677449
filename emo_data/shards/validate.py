"""The validator: every check the contract implies, on one sample or a whole shard."""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .codecs import count_mp4_frames, load_npy, load_png, load_wav
from .contract import (
    ALL_MEMBERS,
    MEMBER_SPECS,
    REQUIRED_MEMBERS,
    SAMPLE_META_VERSION,
    SCHEMA_VERSION,
    UNSAFE_EXTENSIONS,
    SampleMeta,
    config_sha256,
    speed_bucket_encoding,
)
from .io import file_size, iter_raw_samples, read_index


@dataclass
class ValidationIssue:
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}\t{self.key}\t{self.reason}"


def validate_sample(raw: dict[str, Any], expected_digests: Optional[dict[str, dict]] = None, decode_media: bool = True,
                    configs: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Every check on one raw sample; returns human-readable failure reasons (empty = valid).

    ``expected_digests``: the shard index's member entries (sizes and SHA-256); ``configs``: the
    index's stored configs, which the sample's ``config_sha256`` must name.
    """
    problems: list[str] = []
    key = raw.get("__key__", "?")
    for name in (k for k in raw if not k.startswith("__")):
        if ("." + name).endswith(UNSAFE_EXTENSIONS):
            problems.append(f"unsafe member {name} (pickle-like)")
        elif name not in ALL_MEMBERS:
            problems.append(f"unexpected member {name}")
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        problems.append("missing members: " + ", ".join(missing))
    if expected_digests is not None:
        for name, info in expected_digests.items():
            if name in raw:
                data = raw[name]
                if len(data) != info["size"]:
                    problems.append(f"{name}: {len(data)} bytes, index says {info['size']}")
                elif hashlib.sha256(data).hexdigest() != info["sha256"]:
                    problems.append(f"{name}: SHA-256 differs from the shard index (corrupted bytes)")
            else:
                problems.append(f"{name}: listed in the shard index but absent from the tar")
    if "json" not in raw:
        return problems
    try:
        meta = SampleMeta.from_json(raw["json"])
    except Exception as exc:  # noqa: BLE001 - any decode failure is a finding
        return problems + [f"json does not parse: {exc}"]
    if meta.schema_version != SCHEMA_VERSION:
        problems.append(f"schema_version {meta.schema_version} != {SCHEMA_VERSION}")
    if not isinstance(meta.meta_version, int) or meta.meta_version > SAMPLE_META_VERSION:
        problems.append(f"meta_version {meta.meta_version!r}: this code reads json layouts up to {SAMPLE_META_VERSION}")
    if meta.key != key:
        problems.append(f"json key {meta.key!r} != sample key {key!r}")
    if configs is not None and meta.config_sha256 is not None and meta.config_sha256 not in configs:
        problems.append(f"json config_sha256 {meta.config_sha256[:12]}... names no config in the shard index")
    T, S = meta.num_frames, meta.crop_size
    if not isinstance(T, int) or T <= 0 or not isinstance(S, int) or S <= 0:
        return problems + ["json lacks num_frames/crop_size"]
    dims = meta.dims()

    def arr(name: str) -> Optional[np.ndarray]:
        if name not in raw:
            return None
        try:
            return load_npy(raw[name])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} does not load: {exc}")
            return None

    def check(name: str, a: Optional[np.ndarray]) -> None:
        if a is None:
            return
        spec = MEMBER_SPECS[name]
        shape = tuple(dims.get(s) if isinstance(s, str) else s for s in spec.shape)
        if a.dtype != np.dtype(spec.dtype):
            problems.append(f"{name}: dtype {a.dtype}, expected {np.dtype(spec.dtype)}")
        if len(a.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            problems.append(f"{name}: shape {tuple(a.shape)}, expected {tuple('*' if s is None else s for s in shape)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            problems.append(f"{name}: holds NaN or inf")

    for name in ("face_boxes.npy", "landmarks.npy", "head_pose.npy", "head_pose_raw.npy"):
        check(name, arr(name))
    speed = arr("head_speed.npy")
    check("head_speed.npy", speed)
    buckets = arr("speed_buckets.npy")
    check("speed_buckets.npy", buckets)
    if buckets is not None and buckets.size and (buckets.min() < -1.0001 or buckets.max() > 1.0001):
        problems.append("speed_buckets.npy: values outside [-1, 1]")
    centers, radii, d = meta.speed_centers, meta.speed_radii, dims["d"]
    if (speed is not None and buckets is not None and d and len(radii) == d and buckets.shape == (T, d)
            and speed.shape == (T,) and np.all(np.isfinite(speed)) and np.all(np.isfinite(buckets))):
        with np.errstate(divide="ignore", invalid="ignore"):
            try:
                err = float(np.nanmax(np.abs(speed_bucket_encoding(speed, centers, radii).astype(np.float64) - buckets)))
            except ValueError as exc:  # radii not positive: the json itself is wrong
                problems.append(f"json speed_buckets: {exc}")
                err = 0.0
        if err > 1e-3:
            problems.append(f"speed_buckets.npy disagrees with tanh((head_speed - c) / r * 3) by up to {err:.3g}")
    check("identity_emb.npy", arr("identity_emb.npy"))
    if meta.audio_emb:
        if "audio_emb.npy" not in raw:
            problems.append("json declares audio_emb but audio_emb.npy is missing")
        check("audio_emb.npy", arr("audio_emb.npy"))
    elif "audio_emb.npy" in raw:
        problems.append("audio_emb.npy present but json.audio_emb is null")
    if meta.latents:  # written by emo-data add-latents (emo_data/latents.py)
        if "latents.npy" not in raw:
            problems.append("json declares latents but latents.npy is missing")
        check("latents.npy", arr("latents.npy"))
    elif "latents.npy" in raw:
        problems.append("latents.npy present but json.latents is null")

    if "face_mask.png" in raw:
        try:
            mask = load_png(raw["face_mask.png"])
            if mask.shape != (S, S) or mask.dtype != np.uint8:
                problems.append(f"face_mask.png: {mask.dtype} {mask.shape}, expected uint8 ({S}, {S})")
            elif not mask.any():
                problems.append("face_mask.png: empty mask")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"face_mask.png does not decode: {exc}")
    if "wav" in raw:
        try:
            samples, rate = load_wav(raw["wav"])
            expected = int(round(T * rate / meta.fps))
            if rate != meta.sample_rate:
                problems.append(f"wav: {rate} Hz, json says {meta.sample_rate}")
            if abs(len(samples) - expected) > 1:
                problems.append(f"wav: {len(samples)} samples, {T} frames need {expected}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"wav does not decode: {exc}")
    if "mp4" in raw and decode_media:
        try:
            count, width, height = count_mp4_frames(raw["mp4"])
            if count != T:
                problems.append(f"mp4: {count} frames, json says {T}")
            if (width, height) != (S, S):
                problems.append(f"mp4: {width}x{height}, expected {S}x{S}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"mp4 does not decode: {exc}")
    return problems


def _check_index_configs(shard_url: str, index: dict[str, Any]) -> tuple[Optional[dict[str, Any]], list[ValidationIssue]]:
    configs = index.get("configs")
    if configs is None:
        return None, []
    if not isinstance(configs, dict):
        return None, [ValidationIssue(shard_url, "-", "shard index configs is not an object")]
    issues = [ValidationIssue(shard_url, "-", f"shard index config {digest[:12]}... does not hash to its key")
              for digest, stored in configs.items() if not isinstance(stored, dict) or config_sha256(stored) != digest]
    return configs, issues


def validate_shard(shard_url: str, decode_media: bool = True) -> tuple[int, list[ValidationIssue]]:
    """Check a whole shard: tar integrity, index agreement, every sample. Returns (samples, issues).

    Never raises for a bad shard: an unreadable index, a truncated or garbled tar, a sample
    that crashes a check all become issues.
    """
    issues: list[ValidationIssue] = []
    try:
        index = read_index(shard_url)
    except (ValueError, UnicodeDecodeError) as exc:
        index = None
        issues.append(ValidationIssue(shard_url, "-", f"shard index does not parse: {exc}"))
    expected: Optional[dict[str, dict]] = None
    configs: Optional[dict[str, Any]] = None
    if index is not None:
        try:
            expected = {e["key"]: e["members"] for e in index["samples"]}
        except (KeyError, TypeError) as exc:
            issues.append(ValidationIssue(shard_url, "-", f"shard index is malformed: {type(exc).__name__}: {exc}"))
        size = file_size(shard_url)
        if isinstance(index.get("bytes"), int) and size is not None and size != index["bytes"]:
            issues.append(ValidationIssue(
                shard_url, "-", f"tar is {size} bytes, index says {index['bytes']} (truncated or appended to)"))
        configs, config_issues = _check_index_configs(shard_url, index)
        issues.extend(config_issues)
    elif not issues:
        issues.append(ValidationIssue(shard_url, "-", "no shard index (.index.json): bit flips cannot be detected"))
    seen: set[str] = set()
    count = 0
    try:
        for raw in iter_raw_samples(shard_url):
            key = raw["__key__"]
            count += 1
            if key in seen:
                issues.append(ValidationIssue(shard_url, key, "duplicate key in shard (or its members are not contiguous)"))
            seen.add(key)
            digests = expected.get(key) if expected is not None else None
            if expected is not None and digests is None:
                issues.append(ValidationIssue(shard_url, key, "sample not listed in the shard index"))
            try:
                reasons = validate_sample(raw, digests, decode_media=decode_media,
                                          configs=configs if configs is not None else ({} if index is not None else None))
            except Exception as exc:  # noqa: BLE001 - a check that crashes is a finding, not a crash
                reasons = [f"sample check crashed: {type(exc).__name__}: {exc}"]
            for reason in reasons:
                issues.append(ValidationIssue(shard_url, key, reason))
    except FileNotFoundError as exc:
        issues.append(ValidationIssue(shard_url, "-", f"shard not found: {exc}"))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        issues.append(ValidationIssue(shard_url, "-", f"tar is not intact: {type(exc).__name__}: {exc}"))
    if expected is not None:
        for key in expected:
            if key not in seen:
                issues.append(ValidationIssue(shard_url, key, "listed in the shard index but missing from the tar"))
    return count, issues
