"""``emo-eval generate``: one generated video per held-out sample, beside its ground truth.

For every sample of the shards (``split == "test"`` by default): the reference portrait is a frame
of the ground-truth clip (``reference_frame``, default the first), the voice is the sample's own
audio (``wav``; the pipeline's wav2vec computes the features, so they match the model), the face
region is the reference frame's face box (or the shard's union mask), and the seed is derived
from ``(seed, key)`` so that a sample's video does not depend on which samples ran before it.

Per sample, in ``out/``:

- ``<key>.generated.mp4``: the generated frames + the sample's audio;
- ``<key>.ground_truth.mp4``: the shard's clip (H.264 stream copied, not re-encoded) + the audio;
- ``<key>.json``: what was generated and how (written last: its presence marks the sample done).

``out/generate.json`` holds the configuration. A rerun skips finished samples; a rerun with
settings that change the frames is refused (use another ``--out``), so a directory never mixes them.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import time
from fractions import Fraction
from typing import Any, Callable, Iterator, Optional

import numpy as np

from emo_data.shards.contract import SAMPLE_RATE

from .config import GenerateConfig
from .weights import file_sha256

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def sample_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def model_fingerprint(model_dir: str) -> dict[str, Any]:
    """Path + SHA-256 prefix of every weights file of the pipeline directory."""
    files = sorted(glob.glob(os.path.join(model_dir, "*", "*.safetensors")) + glob.glob(os.path.join(model_dir, "*", "*.bin")))
    return {"path": os.path.abspath(model_dir),
            "weights": {os.path.relpath(f, model_dir): file_sha256(f)[:16] for f in files}}


def sample_paths(out_dir: str, key: str) -> dict[str, str]:
    return {"generated": os.path.join(out_dir, f"{key}.generated.mp4"),
            "ground_truth": os.path.join(out_dir, f"{key}.ground_truth.mp4"),
            "json": os.path.join(out_dir, f"{key}.json")}


def iter_eval_samples(shards: list[str], split: Optional[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(shard, raw sample) of every sample of ``shards`` whose json ``split`` is ``split``."""
    from emo_data.shards import SampleMeta, iter_raw_samples, list_shards

    for shard in list_shards(shards):
        for raw in iter_raw_samples(shard):
            if split is None or SampleMeta.from_json(raw["json"]).split == split:
                yield shard, raw


def count_eval_samples(shards: list[str], split: Optional[str]) -> Optional[int]:
    """From the shard indexes (None when one has no index)."""
    from emo_data.shards import SampleMeta, list_shards, read_index

    total = 0
    for shard in list_shards(shards):
        index = read_index(shard)
        if index is None:
            return None
        total += sum(1 for s in index["samples"] if split is None or SampleMeta.from_dict(s.get("meta") or {}).split == split)
    return total


def remux_with_audio(mp4: bytes, audio: np.ndarray, path: str, sample_rate: int = SAMPLE_RATE) -> None:
    """Copy the H.264 stream of ``mp4`` (no re-encode: the frames stay bit-identical) and add AAC audio."""
    import av

    with av.open(io.BytesIO(mp4)) as src, av.open(path, mode="w", format="mp4") as dst:
        vin = src.streams.video[0]
        vout = dst.add_stream_from_template(vin)
        aout = dst.add_stream("aac", rate=sample_rate)
        aout.layout = "mono"
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            dst.mux(packet)
        samples = np.clip(np.asarray(audio, np.float32).reshape(-1), -1.0, 1.0)
        for start in range(0, len(samples), 16384):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 16384], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
            for packet in aout.encode(frame):
                dst.mux(packet)
        for packet in aout.encode():
            dst.mux(packet)


def _load_pipeline(cfg: GenerateConfig, progress: bool = True):
    import torch
    from diffusers.utils import logging as diffusers_logging

    from emo_model.pipeline import EMOPipeline

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[cfg.dtype]) if cfg.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    from transformers.utils import logging as transformers_logging

    if not progress:  # the loaders' own bars too
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        pipe = EMOPipeline.from_pretrained(cfg.model, dtype=dtype)
    finally:
        if not progress:
            diffusers_logging.enable_progress_bar()
            transformers_logging.enable_progress_bar()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device, str(dtype).replace("torch.", "")


def _check_run_config(cfg: GenerateConfig, fingerprint: dict[str, Any], overwrite: bool) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "generate.json")
    record = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "generation_digest": cfg.generation_digest(),
              "model": fingerprint}
    if os.path.exists(path) and not overwrite:
        with open(path) as fh:
            old = json.load(fh)
        if old.get("generation_digest") != record["generation_digest"] or old.get("model", {}).get("weights") != fingerprint["weights"]:
            raise ValueError(
                f"{cfg.out} holds videos generated with other settings or another model ({path}); "
                "use a new --out, or --overwrite to regenerate every sample")
        return  # a resumed run: the record of the first one stands
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def generate_corpus(cfg: GenerateConfig, overwrite: bool = False, progress: bool = True,
                    pipeline=None, on_sample: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Generate every selected sample (skipping finished ones). Returns a summary dict.

    ``pipeline``: an already loaded :class:`~emo_model.pipeline.EMOPipeline` (else loaded from
    ``cfg.model`` once)."""
    import torch
    from tqdm.auto import tqdm

    from emo_data.shards import SampleMeta, decode_mp4, load_npy, load_png, load_wav, write_mp4

    fingerprint = model_fingerprint(cfg.model)
    _check_run_config(cfg, fingerprint, overwrite)
    digest = cfg.generation_digest()
    pipe, device, dtype = (pipeline, str(pipeline.device), str(pipeline.emo.dtype).replace("torch.", "")) if pipeline is not None else _load_pipeline(cfg, progress)

    total = count_eval_samples(cfg.shards, cfg.split)
    if cfg.limit is not None and total is not None:
        total = min(total, cfg.limit)
    done, skipped, seen = 0, 0, 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc="generate", unit="sample", disable=not progress)
    for shard, raw in iter_eval_samples(cfg.shards, cfg.split):
        if cfg.limit is not None and seen >= cfg.limit:
            break
        seen += 1
        key = raw["__key__"]
        paths = sample_paths(cfg.out, key)
        if not overwrite and os.path.exists(paths["json"]):
            with open(paths["json"]) as fh:
                if json.load(fh).get("generation_digest") == digest:
                    skipped += 1
                    bar.update(1)
                    continue
        meta = SampleMeta.from_json(raw["json"])
        T, fps = int(meta.num_frames), float(meta.fps)
        if cfg.reference_frame >= T:
            raise ValueError(f"{key}: reference frame {cfg.reference_frame} but the clip has {T} frames")
        reference = decode_mp4(raw["mp4"], max_frames=cfg.reference_frame + 1)[cfg.reference_frame]
        audio, rate = load_wav(raw["wav"])
        if rate != SAMPLE_RATE:
            raise ValueError(f"{key}: audio at {rate} Hz, the shard contract says {SAMPLE_RATE} Hz")
        boxes = load_npy(raw["face_boxes.npy"])
        speed = float(load_npy(raw["head_speed.npy"]).mean()) if cfg.speed == "sample" else float(cfg.speed)
        size = pipe.resolution
        face_mask = None
        if cfg.face_region == "clip-mask":
            face_mask = load_png(raw["face_mask.png"])
        elif cfg.face_region == "none":
            face_mask = np.full((size, size), 255, np.uint8)
        frames_wanted = min(T, cfg.max_frames) if cfg.max_frames else T
        seed = sample_seed(cfg.seed, key)
        t0 = time.perf_counter()
        out = pipe(
            reference, audio, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
            audio_guidance_scale=cfg.audio_guidance_scale, speed=speed, face_mask=face_mask,
            face_box=tuple(float(v) for v in boxes[cfg.reference_frame]), crop="center", fps=fps,
            generator=torch.Generator("cpu").manual_seed(seed), max_frames=frames_wanted, progress=False,
        )
        seconds = time.perf_counter() - t0
        n = len(out.frames)
        used_audio = audio[: int(round(n * SAMPLE_RATE / fps))]
        tmp = paths["generated"] + ".tmp.mp4"
        write_mp4(tmp, out.frames, fps=fps, audio=used_audio)
        os.replace(tmp, paths["generated"])
        tmp = paths["ground_truth"] + ".tmp.mp4"
        remux_with_audio(raw["mp4"], audio, tmp)
        os.replace(tmp, paths["ground_truth"])
        record = {
            "format_version": FORMAT_VERSION, "key": key, "shard": os.path.abspath(shard) if "://" not in shard else shard,
            "identity": meta.identity, "split": meta.split, "kind": meta.kind,
            "fps": fps, "num_frames": n, "ground_truth_frames": T, "resolution": int(out.frames.shape[1]),
            "ground_truth_resolution": int(meta.crop_size or 0), "reference_frame": cfg.reference_frame,
            "seed": seed, "speed": speed, "face_region": cfg.face_region, "face_region_source": out.face_box_source,
            "files": {k: os.path.basename(v) for k, v in paths.items() if k != "json"},
            "generation_digest": digest, "config": cfg.to_dict(), "model": fingerprint["path"],
            "device": device, "dtype": dtype, "seconds": round(seconds, 3),
        }
        tmp = paths["json"] + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(record, fh, indent=1, sort_keys=True)
        os.replace(tmp, paths["json"])
        done += 1
        bar.update(1)
        bar.set_postfix_str(f"{key} {n} frames {seconds:.1f}s")
        if on_sample is not None:
            on_sample(record)
    bar.close()
    if seen == 0:
        raise ValueError(f"no samples with split={cfg.split!r} in {cfg.shards}")
    return {"generated": done, "skipped": skipped, "samples": seen, "out": cfg.out,
            "seconds": round(time.perf_counter() - t_start, 2)}
