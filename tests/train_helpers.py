"""Small training corpora from the real sample footage, and a tiny EMO pipeline, for the training tests.

Samples come from :func:`shard_fixtures.make_sample` (real frames and audio of a talking-head
clip, consistent pose / speed / bucket members), downscaled to the tiny model's 64 x 64 so that a
training step decodes in milliseconds; ``emo-data add-features`` then replaces the fixture's
random audio features with real ones from the tiny local wav2vec2 (3 hidden states x 32 dims, what
the tiny EMO model takes).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

FPS = 25.0


def downscale_sample(key: str, members: dict, meta: dict, size: int) -> tuple[str, dict, dict]:
    """The same sample at ``size`` x ``size`` pixels (video, mask, boxes, landmarks, json)."""
    import cv2

    from emo_data.latents import resize_frames
    from emo_data.shards import config_sha256, decode_mp4, encode_mp4, load_npy, load_png, npy_bytes, png_bytes

    from shard_fixtures import fixture_config

    src = int(meta["crop_size"])
    scale = size / src
    frames = resize_frames(decode_mp4(members["mp4"]), size)
    out = dict(members)
    out["mp4"] = encode_mp4(list(frames), FPS)
    mask = cv2.resize(load_png(members["face_mask.png"]), (size, size), interpolation=cv2.INTER_NEAREST)
    out["face_mask.png"] = png_bytes(mask)
    out["face_boxes.npy"] = npy_bytes((load_npy(members["face_boxes.npy"]) * scale).astype(np.float32))
    out["landmarks.npy"] = npy_bytes((load_npy(members["landmarks.npy"]) * scale).astype(np.float32))
    meta = dict(meta, crop_size=size, source_size=[size, size], crop_box=[0.0, 0.0, float(size), float(size)])
    # as a real build records it (emo_data/samples.py): a reference to the config in the shard index
    meta["config_sha256"] = config_sha256(fixture_config(size))
    meta["speed_buckets"] = dict(meta["speed_buckets"], formula="tanh((w - c) / r * 3)")
    out["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return key, out, meta


def write_corpus(root: str, *, train_shards: int = 2, per_shard: int = 3, test_shards: int = 1, frames: int = 24,
                 size: int = 64, wav2vec: Optional[str] = None) -> dict:
    """``root/train-00000N.tar`` (+ ``test-...``) of real-footage samples; with ``wav2vec`` real audio
    features are added through ``emo-data add-features``. Returns ``{"train": [...], "test": [...]}``."""
    from emo_data.shards import shard_name, write_tar

    from shard_fixtures import fixture_index, make_sample

    os.makedirs(root, exist_ok=True)
    out: dict[str, list] = {"train": [], "test": []}
    clip = 0
    for split, count in (("train", train_shards), ("test", test_shards)):
        for s in range(count):
            samples = []
            for _ in range(per_shard):
                key, members, meta = make_sample(clip, frames, True, split=split, source_id=f"src{clip:03d}",
                                                 identity=f"id_{split}", seed=clip)
                samples.append(downscale_sample(key, members, meta, size))
                clip += 1
            path = os.path.join(root, shard_name(split, s))
            write_tar(path, samples, extra_index=fixture_index(size))
            out[split].append(path)
    if wav2vec:
        from pipelines.cli import main

        assert main(["add-features", *out["train"], *out["test"], "--audio-encoder", wav2vec, "-q"]) == 0
    return out


def tiny_pipeline_dir(path: str) -> str:
    from emo_model.tiny import make_tiny_model

    return make_tiny_model(path)


_SHARED: dict = {}


def shared_corpus(tmp_path_factory, wav2vec: str) -> dict:
    """One corpus (+ tiny pipeline) per pytest session for all training tests (built once, ~15 s):
    ``{"root", "train": [2 shards x 3 samples], "test": [1 shard x 3], "model": tiny EMOPipeline dir}``.
    Tests that modify shards copy them first (:func:`copy_shards`)."""
    if "corpus" not in _SHARED:
        root = tmp_path_factory.mktemp("train_corpus")
        corpus = write_corpus(str(root / "shards"), wav2vec=wav2vec)
        corpus["model"] = tiny_pipeline_dir(str(root / "tiny"))
        corpus["root"] = str(root)
        _SHARED["corpus"] = corpus
    return _SHARED["corpus"]


def copy_shards(paths: list, dest: str) -> list:
    """Copy shards with their index sidecars into ``dest``."""
    import shutil

    from emo_data.shards import index_path_for

    os.makedirs(dest, exist_ok=True)
    out = []
    for p in paths:
        target = os.path.join(dest, os.path.basename(p))
        shutil.copy2(p, target)
        shutil.copy2(index_path_for(p), index_path_for(target))
        out.append(target)
    return out


def read_metrics(out_dir: str) -> list:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def subprocess_env() -> dict:
    """Environment for training subprocesses: offline, one thread per process (deterministic and
    fast on a busy 2-core machine), the repository importable."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env
