"""Reading our shards with Hugging Face ``datasets`` and with Ray Data (docs/shards.md).

``datasets.load_dataset("webdataset", ...)`` types members by extension: ``mp4`` becomes a
``Video`` and ``wav`` an ``Audio`` feature, both decoded through torchcodec, which needs FFmpeg
libraries and a torch build it matches (it fails on a CPU-only torch). :func:`hf_features` types
them as raw bytes instead (decode them with :func:`emo_data.shards.decode_mp4` /
:func:`emo_data.shards.load_wav` when you need them) and infers the rest (arrays from ``.npy``,
the ``json`` metadata, the PNG mask) from the first sample, the way ``datasets`` itself does.

Ray Data needs nothing extra: ``ray.data.read_webdataset(shards)`` keeps ``mp4``/``wav`` as bytes
and decodes ``.npy``/``.json``/``.png``; :func:`read_ray_dataset` passes ``decoder=None`` and maps
:func:`emo_data.shards.decode_sample` so both readers give the arrays our own reader gives.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Optional, Union

from .shards import decode_sample, iter_raw_samples

# Members kept as raw bytes (no torchcodec): the clip and its audio.
BYTES_MEMBERS = ("mp4", "wav")


def shard_files(corpus: Union[str, list[str]], split: Optional[str] = None) -> list[str]:
    """Shard paths: a list as given, a shard, or a corpus folder (``<split>-*.tar``, or every shard)."""
    if isinstance(corpus, (list, tuple)):
        return [str(p) for p in corpus]
    if os.path.isdir(corpus):
        pattern = f"{split}-*.tar" if split else "*.tar"
        files = sorted(glob.glob(os.path.join(glob.escape(corpus), pattern)))
        if not files:
            raise FileNotFoundError(f"no {pattern} shards in {corpus}")
        return files
    return [corpus]


def hf_features(shard: str):
    """``datasets.Features`` for our shards: mp4/wav as bytes, everything else as ``datasets``
    would infer it from the first sample of ``shard``."""
    import datasets
    import pyarrow as pa
    from datasets.features.features import cast_to_python_objects
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    raw = next(iter_raw_samples(shard), None)
    if raw is None:
        raise ValueError(f"{shard} holds no sample")
    example: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "__shard__":
            continue
        extension = name.rsplit(".", 1)[-1].lower()
        example[name] = WebDataset.DECODERS[extension](value) if extension in WebDataset.DECODERS and name not in BYTES_MEMBERS else value
    example["__url__"] = shard
    table = pa.Table.from_pylist(cast_to_python_objects([example], only_1d_for_numpy=True))
    features = datasets.Features.from_arrow_schema(table.schema)
    for name in features:
        if name in BYTES_MEMBERS:
            features[name] = datasets.Value("binary")
        elif name.rsplit(".", 1)[-1].lower() in WebDataset.IMAGE_EXTENSIONS:
            features[name] = datasets.Image()
    return features


def load_hf_dataset(corpus: Union[str, list[str]], split: str = "train", **kwargs):
    """``datasets.load_dataset("webdataset", ...)`` over a corpus folder's ``<split>-*.tar``
    shards (or a list of shards) with :func:`hf_features`. Extra arguments go to
    ``load_dataset`` (e.g. ``streaming=True``, ``cache_dir``)."""
    import datasets

    files = shard_files(corpus, split)
    return datasets.load_dataset("webdataset", data_files={split: files}, split=split,
                                 features=hf_features(files[0]), **kwargs)


def read_ray_dataset(corpus: Union[str, list[str]], split: Optional[str] = None, **kwargs):
    """``ray.data.read_webdataset`` over the shards, each row decoded by
    :func:`emo_data.shards.decode_sample` (arrays, metadata dict, mp4 as bytes; never unpickles)."""
    import ray.data

    return ray.data.read_webdataset(shard_files(corpus, split), decoder=None, **kwargs).map(_decode_row)


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    return decode_sample(row)
