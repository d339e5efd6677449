"""``emo-eval``: the EMO paper's metrics on the held-out split.

    emo-eval generate --model DIR --shards 'corpus/test-*.tar' --out gen/ [--seed 0] [--steps 40]
    emo-eval score gen/ --shards 'corpus/test-*.tar' --weights-dir eval-weights/ [--out scores.json]
    emo-eval make-test-weights DIR      # random weights with the real keys (tests / demos only)

See docs/eval.md for the protocol and where the weights come from.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a video for every held-out sample")
    p.add_argument("--model", required=True, help="EMOPipeline directory (save_pretrained layout)")
    p.add_argument("--shards", required=True, nargs="+", help="shard files, globs or directories")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--split", default="test", help="only samples of this split ('all': every sample)")
    p.add_argument("--reference-frame", type=int, default=0, help="ground-truth frame used as the reference portrait")
    p.add_argument("--seed", type=int, default=0, help="base seed; each sample's seed is derived from it and its key")
    p.add_argument("--steps", type=int, default=40, help="DDIM steps (paper: 40)")
    p.add_argument("--guidance", type=float, default=3.5, help="CFG scale on reference + audio (1 = off)")
    p.add_argument("--audio-guidance", type=float, default=None, help="separate CFG scale for audio")
    p.add_argument("--speed", default="0.5", help="constant head speed, or 'sample' for the clip's measured mean")
    p.add_argument("--face-region", choices=("reference-box", "clip-mask", "none"), default="reference-box",
                   help="face locator input: the reference frame's box, the shard's union mask, or none")
    p.add_argument("--max-frames", type=int, default=None, help="generate at most this many frames per sample")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--overwrite", action="store_true", help="regenerate finished samples")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_score(sub) -> None:
    from .config import METRICS

    p = sub.add_parser("score", help="compute the metrics over a generate directory")
    p.add_argument("gen_dir")
    p.add_argument("--shards", required=True, nargs="+", help="the shards the samples came from (ground truth)")
    p.add_argument("--out", default=None, help="JSON path (default: GEN_DIR/scores.json)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {', '.join(METRICS)}")
    p.add_argument("--weights-dir", default=None, help="directory with the weights under their usual names (docs/eval.md)")
    p.add_argument("--inception", dest="inception_weights", help="Inception (FID) weights file")
    p.add_argument("--i3d", dest="i3d_weights", help="I3D (FVD) weights file")
    p.add_argument("--syncnet", dest="syncnet_weights", help="SyncNet weights (syncnet_v2.model)")
    p.add_argument("--expression", choices=("landmarks", "deep3d"), default="landmarks", help="E-FID extractor")
    p.add_argument("--deep3d", dest="deep3d_weights", help="Deep3DFaceRecon checkpoint (epoch_20.pth or safetensors)")
    p.add_argument("--deep3d-lm3d", help="Deep3DFaceRecon BFM/similarity_Lm3D_all.mat")
    p.add_argument("--identity", choices=("dlib", "insightface"), default="dlib", help="F-SIM face embedding")
    p.add_argument("--face-model-root", help="InsightFace pack directory (for --identity insightface)")
    p.add_argument("--resolution", type=int, default=None, help="compare FID/FVD frames at this size")
    p.add_argument("--fid-frame-stride", type=int, default=1)
    p.add_argument("--face-frame-stride", type=int, default=1)
    p.add_argument("--fvd-resolution", type=int, default=224)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emo-eval", description="EMO paper metrics on the held-out split")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_score(sub)
    p = sub.add_parser("make-test-weights", help="random weights with the real keys (tests / demos; numbers mean nothing)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "make-test-weights":
        from .testing import write_test_weights

        for name, path in write_test_weights(args.dir, seed=args.seed).items():
            print(f"{name:12s} {path}")
        print("random weights: every number computed with them is meaningless")
        return 0
    if args.command == "generate":
        from .config import GenerateConfig
        from .generate import generate_corpus

        try:
            cfg = GenerateConfig(
                model=args.model, shards=args.shards, out=args.out, split=None if args.split == "all" else args.split,
                reference_frame=args.reference_frame, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                audio_guidance_scale=args.audio_guidance, speed=args.speed, face_region=args.face_region,
                max_frames=args.max_frames, limit=args.limit, device=args.device, dtype=args.dtype)
            summary = generate_corpus(cfg, overwrite=args.overwrite, progress=not args.quiet)
        except (ValueError, FileNotFoundError) as exc:
            print(f"emo-eval generate: {exc}", file=sys.stderr)
            return 2
        print(f"{summary['generated']} generated, {summary['skipped']} already done, in {args.out} "
              f"({summary['seconds']:.1f} s)")
        return 0
    from .config import ScoreConfig
    from .score import format_table, score_corpus

    try:
        cfg = ScoreConfig(
            metrics=args.metrics, weights_dir=args.weights_dir, inception_weights=args.inception_weights,
            i3d_weights=args.i3d_weights, syncnet_weights=args.syncnet_weights, expression=args.expression,
            deep3d_weights=args.deep3d_weights, deep3d_lm3d=args.deep3d_lm3d, identity=args.identity,
            face_model_root=args.face_model_root, resolution=args.resolution, fid_frame_stride=args.fid_frame_stride,
            face_frame_stride=args.face_frame_stride, fvd_resolution=args.fvd_resolution, device=args.device)
        result = score_corpus(args.gen_dir, args.shards, cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"emo-eval score: {exc}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.gen_dir, "scores.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    os.replace(tmp, out)
    print(format_table(result))
    print(f"scores: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
