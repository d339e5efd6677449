"""``emo-sample``: portrait + voice -> talking-head mp4 (with the input audio muxed in).

    emo-sample --model DIR --image face.png --audio speech.wav --out video.mp4 [--seed 0]
    emo-sample --make-tiny-model DIR      # a tiny random pipeline for tests / demos
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _box(text: str):
    parts = [float(v) for v in text.replace(" ", "").split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("face box is x0,y0,x1,y1")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emo-sample", description="EMO: portrait + audio -> talking-head video")
    ap.add_argument("--model", help="directory written by EMOPipeline.save_pretrained, or an emo-train checkpoint-N directory")
    ap.add_argument("--ema", action="store_true", help="use the EMA weights of an emo-train checkpoint (its emo_ema/)")
    ap.add_argument("--image", help="reference portrait")
    ap.add_argument("--audio", help="voice track (any format PyAV reads; resampled to 16 kHz mono)")
    ap.add_argument("--out", help="output .mp4")
    ap.add_argument("--seed", type=int, default=None, help="random seed (same seed -> identical video)")
    ap.add_argument("--steps", type=int, default=40, help="DDIM steps per clip (paper: 40)")
    ap.add_argument("--guidance", type=float, default=3.5, help="CFG scale on reference + audio (1 = off)")
    ap.add_argument("--audio-guidance", type=float, default=None, help="separate CFG scale for audio (3 passes)")
    ap.add_argument("--speed", type=float, default=0.5, help="target head speed; paper: 0.1-1.0 speech, 1.0-1.3 singing")
    ap.add_argument("--mask", help="face-region mask image (white = face region), overrides detection")
    ap.add_argument("--face-box", type=_box, help="x0,y0,x1,y1 face box in input-image pixels")
    ap.add_argument("--no-face-guidance", action="store_true", help="all-ones face mask (no face-region guidance)")
    ap.add_argument("--mask-scale", type=float, default=1.2, help="enlarge the face box by this for the mask")
    ap.add_argument("--crop", choices=("center", "face"), default="center", help="how the portrait is cropped square")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--max-seconds", type=float, default=None, help="only generate this much of the audio")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp16 on GPU, fp32 on CPU")
    ap.add_argument("--cpu-offload", action="store_true", help="enable_model_cpu_offload (GPU only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--make-tiny-model", metavar="DIR", help="write a tiny random pipeline to DIR and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.make_tiny_model:
        from .tiny import make_tiny_model

        make_tiny_model(args.make_tiny_model, seed=args.seed or 0)
        print(f"tiny EMO pipeline written to {args.make_tiny_model}")
        return 0
    missing = [n for n in ("model", "image", "audio", "out") if getattr(args, n) is None]
    if missing:
        build_parser().error("missing " + ", ".join("--" + m for m in missing))
    for path in (args.image, args.audio):
        if not os.path.exists(path):
            build_parser().error(f"{path}: no such file")

    from .media import SAMPLE_RATE, write_mp4
    from .pipeline import EMOPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.ema:
        from .model import EMOModel

        ema_dir = os.path.join(args.model, "emo_ema")
        if not os.path.isdir(ema_dir):
            build_parser().error(f"--ema: {args.model} has no emo_ema/ (trained without --use-ema?)")
        pipe = EMOPipeline.from_pretrained(args.model, emo=EMOModel.from_pretrained(ema_dir, dtype=dtype), dtype=dtype)
    else:
        pipe = EMOPipeline.from_pretrained(args.model, dtype=dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
    generator = torch.Generator("cpu").manual_seed(seed)

    mask = None
    if args.no_face_guidance:
        mask = np.full((pipe.resolution, pipe.resolution), 255, np.uint8)
    elif args.mask:
        from .media import load_image

        mask = load_image(args.mask)[..., 0]

    from .media import load_audio

    audio = load_audio(args.audio)
    max_frames = int(round(args.max_seconds * args.fps)) if args.max_seconds else None
    t0 = time.perf_counter()
    out = pipe(
        args.image, audio, num_inference_steps=args.steps, guidance_scale=args.guidance,
        audio_guidance_scale=args.audio_guidance, speed=args.speed, face_mask=mask, face_box=args.face_box,
        mask_scale=args.mask_scale, crop=args.crop, fps=args.fps, generator=generator, max_frames=max_frames,
        progress=not args.quiet,
    )
    elapsed = time.perf_counter() - t0
    n = len(out.frames)
    audio_out = out.audio[: int(round(n / args.fps * SAMPLE_RATE))] if max_frames else out.audio
    write_mp4(args.out, out.frames, fps=args.fps, audio=audio_out)
    print(
        f"{args.out}: {n} frames ({n / args.fps:.2f} s at {args.fps:g} fps), {out.frames.shape[2]}x{out.frames.shape[1]}, "
        f"seed {seed}, face region: {out.face_box_source}, speed buckets: "
        f"{'trained (' + str(len(pipe.emo.config.speed_centers)) + ' centres from the model config)' if pipe.emo.config.speed_centers else 'defaults'}, "
        f"{elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
