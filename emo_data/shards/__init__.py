"""The EMO shard format, defined once: the contract (members, dtypes, shapes, per-sample
metadata, versions, shared constants, the speed-bucket encoder), member codecs, shard I/O and
the validator. Everything that writes, reads, inspects or trains on shards imports it from here.

* :mod:`.contract`: :data:`MEMBERS`, :class:`SampleMeta`, :data:`SCHEMA_VERSION`,
  :data:`SAMPLE_META_VERSION`, :data:`SAMPLE_RATE`, :data:`CROP_SCALE`,
  :func:`speed_bucket_encoding`, :func:`config_sha256`;
* :mod:`.codecs`: npy / wav / png, the one H.264 writer (:func:`encode_mp4`), sample (de)coding;
* :mod:`.io`: :class:`ShardWriter`, the index, :func:`read_members` (the one byte-range read),
  :func:`list_shards`, :func:`rewrite_shard`;
* :mod:`.validate`: :func:`validate_sample`, :func:`validate_shard`.
"""
from .codecs import (
    count_mp4_frames,
    decode_member,
    decode_mp4,
    decode_sample,
    encode_mp4,
    encode_sample,
    json_default,
    load_npy,
    load_png,
    load_wav,
    npy_bytes,
    png_bytes,
    wav_bytes,
    write_mp4,
)
from .contract import (
    ALL_MEMBERS,
    CROP_SCALE,
    DEFAULT_CROP_SIZE,
    DEFAULT_FPS,
    DEFAULT_SPEED_CENTERS,
    DEFAULT_SPEED_RADII,
    HEAD_SPEED_UNIT,
    INDEX_SUFFIX,
    MEMBER_SPECS,
    MEMBERS,
    NPY_MEMBERS,
    OPTIONAL_MEMBERS,
    REQUIRED_MEMBERS,
    SAMPLE_META_VERSION,
    SAMPLE_RATE,
    SCHEMA_VERSION,
    SPEED_BUCKET_FORMULA,
    UNSAFE_EXTENSIONS,
    MemberSpec,
    SampleMeta,
    as_stored_config,
    config_fields,
    config_sha256,
    sample_shaping_config,
    speed_bucket_encoding,
)
from .io import (
    MEMBER_MTIME,
    ShardWriter,
    StreamingTarWriter,
    file_size,
    find_entry,
    index_path_for,
    is_url,
    iter_raw_samples,
    list_shards,
    load_index,
    open_shard,
    read_index,
    read_members,
    read_sample,
    rewrite_shard,
    scan_tar,
    shard_name,
    write_tar,
)
from .validate import ValidationIssue, validate_sample, validate_shard

__all__ = [
    "ALL_MEMBERS", "CROP_SCALE", "DEFAULT_CROP_SIZE", "DEFAULT_FPS", "DEFAULT_SPEED_CENTERS", "DEFAULT_SPEED_RADII",
    "HEAD_SPEED_UNIT", "INDEX_SUFFIX", "MEMBERS", "MEMBER_MTIME", "MEMBER_SPECS", "NPY_MEMBERS", "OPTIONAL_MEMBERS",
    "REQUIRED_MEMBERS", "SAMPLE_META_VERSION", "SAMPLE_RATE", "SCHEMA_VERSION", "SPEED_BUCKET_FORMULA",
    "UNSAFE_EXTENSIONS", "MemberSpec", "SampleMeta", "ShardWriter", "StreamingTarWriter", "ValidationIssue",
    "as_stored_config", "config_fields", "config_sha256", "count_mp4_frames", "decode_member", "decode_mp4",
    "decode_sample", "encode_mp4", "encode_sample", "file_size", "find_entry", "index_path_for", "is_url",
    "iter_raw_samples", "json_default", "list_shards", "load_index", "load_npy", "load_png", "load_wav", "npy_bytes",
    "open_shard", "png_bytes", "read_index", "read_members", "read_sample", "rewrite_shard", "sample_shaping_config",
    "scan_tar", "shard_name", "speed_bucket_encoding", "validate_sample", "validate_shard", "wav_bytes", "write_mp4",
    "write_tar",
]
