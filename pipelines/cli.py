"""``emo-data``: build EMO training shards from footage, add audio features and latents, fit speed buckets.

It lives beside the executors it starts, so ``emo_data`` never imports ``pipelines``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Optional

from emo_data.config import BuildConfig


def _load_config(args) -> BuildConfig:
    config = BuildConfig()
    if getattr(args, "config", None):
        with open(args.config) as fh:
            config = BuildConfig.from_dict(json.load(fh))
    if getattr(args, "audio_encoder", None):
        config.audio_features.encoder = args.audio_encoder
    if getattr(args, "audio_layers", None):
        config.audio_features.layers = [int(v) for v in args.audio_layers.split(",")]
    if getattr(args, "no_audio_features", False):
        config.audio_features.enabled = False
    if getattr(args, "face_backend", None):
        config.face.backend = args.face_backend
    if getattr(args, "face_model_root", None):
        config.face.model_root = args.face_model_root
    if getattr(args, "speech_backend", None):
        config.speech.backend = args.speech_backend
    if getattr(args, "pyannote_pipeline", None):
        config.speech.pyannote_pipeline = args.pyannote_pipeline
        if not getattr(args, "speech_backend", None):
            config.speech.backend = "pyannote"
    if getattr(args, "min_seconds", None) is not None:
        config.clip.min_seconds = args.min_seconds
    if getattr(args, "max_seconds", None) is not None:
        config.clip.max_seconds = args.max_seconds
    if getattr(args, "test_fraction", None) is not None:
        config.identity.test_fraction = args.test_fraction
    if getattr(args, "seed", None) is not None:
        config.identity.seed = args.seed
    sync_changes = {}
    if getattr(args, "no_sync_gate", False):
        sync_changes["enabled"] = False
    for flag, key in (("gate_mode", "mode"), ("sync_backend", "backend"), ("syncnet_weights", "syncnet_weights"),
                      ("sync_min_confidence", "min_confidence"), ("sync_correct_min_confidence", "correct_min_confidence")):
        if getattr(args, flag, None) is not None:
            sync_changes[key] = getattr(args, flag)
    import dataclasses

    if sync_changes:
        config.sync = dataclasses.replace(config.sync, **sync_changes)   # re-validated
    if getattr(args, "min_face_quality", None) is not None:
        config.quality = dataclasses.replace(config.quality, min_face_quality=args.min_face_quality)
    vocal_changes = {k: getattr(args, f) for f, k in (("vocals", "mode"), ("vocals_weights", "weights"))
                     if getattr(args, f, None) is not None}
    if vocal_changes:
        config.vocals = dataclasses.replace(config.vocals, **vocal_changes)
    if getattr(args, "shard_by", None):
        config.shards.group_by = [v.strip() for v in args.shard_by.split(",") if v.strip()]
    return config.validate()   # fields set one by one above: check the result as a whole


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", help="source manifest (.csv/.parquet with a 'path' column), a directory, or a glob")
    p.add_argument("--out", required=True, help="output directory for shards, manifest.parquet and build.json")
    p.add_argument("--config", help="JSON file with (part of) a BuildConfig; flags below override it")
    p.add_argument("--audio-encoder", help="wav2vec2 checkpoint: local directory or hub id (default facebook/wav2vec2-base-960h)")
    p.add_argument("--audio-layers", help="comma-separated hidden-state indices to keep (default: all)")
    p.add_argument("--no-audio-features", action="store_true", help="build without wav2vec features (add later with add-features)")
    p.add_argument("--face-backend", choices=["dlib", "insightface", "face_alignment"], help="default dlib (offline)")
    p.add_argument("--face-model-root", help="folder holding insightface / face-alignment weights")
    p.add_argument("--speech-backend", choices=["silero", "pyannote", "none"], help="default silero (offline)")
    p.add_argument("--pyannote-pipeline", help="local dir or hub id of a pyannote diarization pipeline")
    gate = p.add_argument_group("lip-sync / frozen-face gate (docs/sync.md)")
    gate.add_argument("--no-sync-gate", action="store_true",
                      help="no lip-sync, offset or frozen-face scoring (footage already curated, synthetic motion)")
    gate.add_argument("--gate-mode", choices=["enforce", "score"],
                      help="enforce (default): reject / correct clips; score: store every score, keep every clip")
    gate.add_argument("--sync-backend", choices=["auto", "envelope", "syncnet"],
                      help="auto (default): syncnet when --syncnet-weights is given, else the weight-free envelope scorer")
    gate.add_argument("--syncnet-weights", help="local syncnet_v2.model (or .safetensors) for the SyncNet backend")
    gate.add_argument("--sync-min-confidence", type=float,
                      help="reject clips whose sync confidence is below (default: syncnet 3.0, envelope never)")
    gate.add_argument("--sync-correct-min-confidence", type=float,
                      help="re-cut the audio of clips whose offset is at least this confident (default: syncnet 3.0, envelope 4.0)")
    gate.add_argument("--min-face-quality", type=float,
                      help="reject clips whose face quality (0-1, sharpness x exposure) is below (default: score only)")
    gate.add_argument("--vocals", choices=["auto", "always", "never"],
                      help="separate the voice from music / effects before speech activity, the gate and audio features: "
                           "auto (default) for manifest kinds singing and film when --vocals-weights is given")
    gate.add_argument("--vocals-weights", help="local HTDemucs (.th / .safetensors) or MDX-Net (.onnx) vocal separator")
    p.add_argument("--min-seconds", type=float, help="shortest clip kept (default 2)")
    p.add_argument("--max-seconds", type=float, help="longest clip (default 10)")
    p.add_argument("--test-fraction", type=float, help="share of footage in the identity-disjoint test split (default 0.1)")
    p.add_argument("--seed", type=int, help="seed of the split (default 0)")
    p.add_argument("--shard-by", help="separate shards per kind and/or language: e.g. kind,language -> train-talk-en-000000.tar")
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default: Ray Data, an embedded local Ray unless --address) or local (in-process, for debugging)")
    p.add_argument("--address", help="Ray cluster address (ray://host:10001 or auto); default: embedded local Ray")
    p.add_argument("--workers", type=int, default=None,
                   help="video-pass actors, one CPU each (Ray executor; default: all CPUs of the embedded Ray or cluster)")
    p.add_argument("--executor-config",
                   help="JSON file with (part of) an ExecutorConfig: per-stage num_cpus / num_gpus / concurrency / batch_size (docs/ray.md)")
    p.add_argument("--max-failure-fraction", type=float, default=None,
                   help="exit 1 with a table of failures if more than this share of sources failed (default 1.0: never)")
    p.add_argument("--stall-timeout", type=float, default=None,
                   help="Ray executor: end the build when no clip or source comes back for this many seconds; "
                        "unfinished sources become failed rows (reason stalled). Default 900")
    p.add_argument("--resplit", action="store_true",
                   help="recompute identities and train/test splits from scratch (by default a re-run keeps those of "
                        "existing samples and fits new ones around them); needed to change --test-fraction / --seed / "
                        "the identity threshold of an existing corpus")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output: only the summary (and errors)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's internal notices and worker output")


def cmd_build(args) -> int:
    from emo_data.config import ExecutorConfig
    from pipelines.failures import failure_table, too_many_failures
    from pipelines.local import build_corpus

    try:
        config = _load_config(args)
    except (ValueError, OSError) as exc:
        print(f"emo-data build: error: {exc}", file=sys.stderr)
        return 2
    executor = ExecutorConfig()
    if args.executor_config:
        with open(args.executor_config) as fh:
            executor = ExecutorConfig.from_dict(json.load(fh))
    if args.max_failure_fraction is not None:
        executor.max_failure_fraction = args.max_failure_fraction
    if args.stall_timeout is not None:
        executor.stall_timeout_s = args.stall_timeout
    try:
        executor.validate()
        if args.executor == "local" and args.address:
            raise ValueError("--address needs --executor ray")
        if args.executor == "ray":
            from pipelines.ray_build import build_corpus_ray

            result = build_corpus_ray(args.sources, args.out, config, address=args.address, workers=args.workers,
                                      progress=not args.quiet, executor=executor, resplit=args.resplit)
        else:
            if args.stall_timeout is not None:
                raise ValueError("--stall-timeout needs --executor ray")
            result = build_corpus(args.sources, args.out, config, progress=not args.quiet, resplit=args.resplit)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"emo-data build: error: {exc}", file=sys.stderr)
        return 2
    print(result.summary.format())
    print(f"shards    {', '.join(result.summary.shards) or 'none'} in {args.out}")
    print(f"manifest  {os.path.join(args.out, 'manifest.parquet')}")
    redone = len(result.plan.redo) if result.plan else 0
    if result.skipped:
        print(f"resumed   {result.skipped} sources were already done, {result.processed} processed now")
    if redone:
        print(f"redone    {redone} sources changed since they were staged (config or input file):")
        for line in result.plan.describe():
            print(f"          {line}")
    if too_many_failures(result.summary.sources, result.summary.sources_failed, executor.max_failure_fraction):
        print(f"emo-data build: error: {result.summary.sources_failed} of {result.summary.sources} sources failed "
              f"(more than --max-failure-fraction {executor.max_failure_fraction:g}):\n{failure_table(args.out)}", file=sys.stderr)
        return 1
    return 0


def cmd_add_features(args) -> int:
    import numpy as np

    from emo_data.audio_features import AudioFeatureInput, AudioFeatureStage, check_audio_encoder
    from emo_data.shards import SampleMeta, list_shards, load_wav, npy_bytes, rewrite_shard

    config = _load_config(args)
    config.audio_features.enabled = True
    try:
        check_audio_encoder(config.audio_features)
    except RuntimeError as exc:
        print(f"emo-data add-features: error: {exc}", file=sys.stderr)
        return 2
    stage = AudioFeatureStage(config.audio_features)
    stage.ensure_setup()
    shards = list_shards(args.shards)
    if not shards:
        print("emo-data add-features: no shards found", file=sys.stderr)
        return 2
    from tqdm import tqdm

    total = 0
    for shard in tqdm(shards, unit="shard", disable=args.quiet):
        def transform(raw):
            meta = SampleMeta.from_json(raw["json"])
            samples, _rate = load_wav(raw["wav"])
            emb = stage(AudioFeatureInput(samples.astype(np.float32), meta.num_frames, meta.fps))
            raw["audio_emb.npy"] = npy_bytes(emb.astype(np.float16))
            meta.audio_emb = {
                "encoder": stage.model_id,
                "layers": config.audio_features.layers,
                "num_layers": int(emb.shape[1]),
                "dim": int(emb.shape[2]),
                "rate": "resampled from 50 Hz to the video frames",
            }
            raw["json"] = meta.to_json()
            return raw

        # the samples' build config now says these audio features (its hash follows)
        total += rewrite_shard(shard, transform,
                               update_config=lambda stored: {**stored, "audio_features": config.audio_features.to_dict()})
    print(f"added audio features ({stage.model_id}) to {total} samples in {len(shards)} shards")
    return 0


def cmd_add_latents(args) -> int:
    from emo_data.latents import add_latents
    from emo_data.shards import list_shards

    shards = list_shards(args.shards)
    if not shards:
        print("emo-data add-latents: no shards found", file=sys.stderr)
        return 2
    if not os.path.isdir(args.vae):
        print(f"emo-data add-latents: error: --vae {args.vae} is not a directory (an AutoencoderKL save_pretrained dir)", file=sys.stderr)
        return 2
    total = add_latents(shards, args.vae, resolution=args.resolution, device=args.device, batch_size=args.batch_size,
                        progress=not args.quiet)
    print(f"added latents ({args.vae}) to {total} samples in {len(shards)} shards")
    return 0


def cmd_fit_buckets(args) -> int:
    import numpy as np

    from emo_data.pose import fit_bucket_centers
    from emo_data.shards import (
        SPEED_BUCKET_FORMULA,
        SampleMeta,
        list_shards,
        load_npy,
        npy_bytes,
        read_index,
        read_members,
        rewrite_shard,
        speed_bucket_encoding,
    )

    shards = list_shards(args.shards)
    speeds = []
    for shard in shards:
        index = read_index(shard)
        for entry in index["samples"] if index else []:
            speeds.append(load_npy(read_members(shard, entry, ["head_speed.npy"])["head_speed.npy"]))
    if not speeds:
        print("emo-data fit-buckets: no samples found", file=sys.stderr)
        return 2
    all_speeds = np.concatenate(speeds)
    centers, radii = fit_bucket_centers(all_speeds, args.num_buckets)
    quantiles = np.percentile(all_speeds, [5, 25, 50, 75, 95])
    print(f"{len(all_speeds)} frames from {len(speeds)} clips; speed (deg/frame) p5/p25/p50/p75/p95 = " + "/".join(f"{q:.3f}" for q in quantiles))
    print("centers " + json.dumps([round(float(c), 4) for c in centers]))
    print("radii   " + json.dumps([round(float(r), 4) for r in radii]))
    if args.write_config:
        config = BuildConfig()
        config.speed.centers = [float(c) for c in centers]
        config.speed.radii = [float(r) for r in radii]
        with open(args.write_config, "w") as fh:
            json.dump({"speed": config.speed.to_dict()}, fh, indent=1)
        print(f"wrote {args.write_config} (use with emo-data build --config)")
    if args.apply:
        fitted = {"centers": [float(c) for c in centers], "radii": [float(r) for r in radii]}

        def transform(raw):
            meta = SampleMeta.from_json(raw["json"])
            speed = load_npy(raw["head_speed.npy"])
            raw["speed_buckets.npy"] = npy_bytes(speed_bucket_encoding(speed, centers, radii))
            meta.speed_buckets = {**fitted, "formula": SPEED_BUCKET_FORMULA}
            raw["json"] = meta.to_json()
            return raw

        def refit(stored):  # the samples' build config now says these buckets (its hash follows)
            return {**stored, "speed": {**(stored.get("speed") or {}), **fitted}}

        for shard in shards:
            rewrite_shard(shard, transform, update_config=refit)
        print(f"recomputed speed_buckets.npy in {len(shards)} shards")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-data", description="Build EMO training shards from talk, film and singing footage.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="decode footage once, select single-face speaking clips, write WebDataset shards")
    _add_build_args(p)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("add-features", help="add or replace wav2vec features in existing shards (no video decoding)")
    p.add_argument("shards", nargs="+", help="shard files, directories or globs")
    p.add_argument("--audio-encoder", help="wav2vec2 checkpoint: local directory or hub id")
    p.add_argument("--audio-layers", help="comma-separated hidden-state indices (default: all)")
    p.add_argument("--config", help="JSON BuildConfig")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_add_features)
    p = sub.add_parser("add-latents", help="add or replace pre-encoded VAE latents (latents.npy) for training without the VAE")
    p.add_argument("shards", nargs="+", help="shard files, directories or globs")
    p.add_argument("--vae", required=True, help="AutoencoderKL directory (e.g. <sd1.5>/vae or <emo pipeline>/vae)")
    p.add_argument("--resolution", type=int, help="encode frames resized to this many pixels (default: the clip's crop size)")
    p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per VAE call")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_add_latents)
    p = sub.add_parser("fit-buckets", help="fit speed-bucket centres to a corpus's head-speed quantiles")
    p.add_argument("shards", nargs="+")
    p.add_argument("--num-buckets", "-d", type=int, default=9)
    p.add_argument("--write-config", help="write a BuildConfig JSON fragment with the fitted buckets")
    p.add_argument("--apply", action="store_true", help="recompute speed_buckets.npy in the shards from the stored raw speeds")
    p.set_defaults(func=cmd_fit_buckets)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Libraries' deprecation notices (torch.jit.load in silero-vad, ...) are for developers: -v shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
