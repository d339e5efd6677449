"""EMO model bench (CPU, tiny config): prints figures, asserts nothing.

    /work/venv/bin/python bench/model_bench.py [--threads 1] [--repeats 7] [--latent 8]

1. backbone forward time vs plain diffusers UNet2DConditionModel on the same 12 frames (target <= 2x)
2. ReferenceNet calls per generated clip (must be 1), counted with a forward hook
3. sampling time for 2x the audio length / 1x (target <= 2.1x)
4. full-size parameter counts (meta device) next to SD1.5's UNet and AnimateDiff v2's motion modules
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_backbone(repeats: int, latent: int) -> None:
    from diffusers import UNet2DConditionModel

    from emo_model import EMOModel
    from emo_model.tiny import TINY_UNET, tiny_emo_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    emo = EMOModel(**tiny_emo_config()).eval()
    emo.load_sd_unet(unet.state_dict())
    with torch.no_grad():  # trained-like new layers (zero init would let some ops be skipped by nothing, but be fair)
        for p in emo.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    f, n = emo.config.num_frames, emo.config.num_motion_frames
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, f, latent, latent, generator=g)
    frames = x[0].permute(1, 0, 2, 3).contiguous()
    ctx = emo.text_context.expand(f, -1, -1).contiguous()
    with torch.no_grad():
        ref = emo.encode_reference(torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, n, 4, latent, latent, generator=g))
        tokens = emo.audio_proj(torch.randn(1, f, 5, emo.config.audio_layers, emo.config.audio_feature_dim, generator=g))
        speed = emo.speed_proj(torch.randn(1, n + f, 9, generator=g))
        face = emo.face_locator(torch.ones(1, 1, 8 * latent, 8 * latent))

        def ours():
            emo(x, 500, reference=ref, audio_tokens=tokens, speed_embedding=speed, face_embedding=face)

        def theirs():
            unet(frames, 500, encoder_hidden_states=ctx)

        # interleave to share whatever else the machine is doing
        t_ours, t_theirs = [], []
        for _ in range(2):
            ours(), theirs()
        for _ in range(repeats):
            t0 = time.perf_counter()
            ours()
            t1 = time.perf_counter()
            theirs()
            t2 = time.perf_counter()
            t_ours.append(t1 - t0)
            t_theirs.append(t2 - t1)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    pair = statistics.median(a / b for a, b in zip(t_ours, t_theirs))
    print(f"[1] backbone forward, tiny config, {f} frames of {latent}x{latent} latents (+{n} motion frames, reference, audio, speed, face), {repeats} interleaved runs:")
    print(f"    EMO backbone      median {mo * 1000:8.1f} ms  min {min(t_ours) * 1000:8.1f} ms")
    print(f"    diffusers UNet2D  median {mt * 1000:8.1f} ms  min {min(t_theirs) * 1000:8.1f} ms")
    print(f"    ratio             {min(t_ours) / min(t_theirs):.2f}x of the minima, {pair:.2f}x median of paired runs (target <= 2x)")


def bench_pipeline(repeats: int) -> None:
    from emo_model.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.emo.reference_net.register_forward_hook(lambda *a: calls.append(1))
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    rng = np.random.default_rng(1)
    f = pipe.emo.config.num_frames
    steps, clips = 5, 3
    audio = (rng.standard_normal(clips * f * 640) * 0.1).astype(np.float32)
    out = pipe(img, audio, num_inference_steps=steps, guidance_scale=3.5, face_box=(16, 16, 48, 48),
               generator=torch.Generator().manual_seed(0))
    print(f"[2] ReferenceNet calls: {len(calls)} for {clips} clips x {steps} DDIM steps with CFG "
          f"({len(out.frames)} frames) -> {len(calls) / clips:g} per clip (must be 1)")
    hook.remove()

    one = (rng.standard_normal(2 * f * 640) * 0.1).astype(np.float32)  # 24 frames = 2 clips = 0.96 s
    two = np.concatenate([one, one[::-1]])  # 48 frames = 4 clips
    kw = dict(num_inference_steps=4, guidance_scale=3.5, face_box=(16, 16, 48, 48))
    t1s, t2s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        pipe(img, one, generator=torch.Generator().manual_seed(0), **kw)
        t1s.append(time.perf_counter() - t)
        t = time.perf_counter()
        pipe(img, two, generator=torch.Generator().manual_seed(0), **kw)
        t2s.append(time.perf_counter() - t)
    a, b = statistics.median(t1s), statistics.median(t2s)
    print(f"[3] sampling, tiny pipeline, 4 DDIM steps + CFG: {len(one) / 16000:.2f} s audio {a:.2f} s, "
          f"{len(two) / 16000:.2f} s audio {b:.2f} s (medians of {repeats}) -> {b / a:.2f}x (target <= 2.1x)")


def count_params() -> None:
    from diffusers import MotionAdapter, UNet2DConditionModel

    from emo_model import EMOModel

    with torch.device("meta"):
        emo = EMOModel()
        sd = UNet2DConditionModel(cross_attention_dim=768)  # SD1.5 defaults
        mm = MotionAdapter()  # AnimateDiff v2 layout (mm_sd_v15_v2)

    def count(module, pred=lambda n: True):
        return sum(p.numel() for n, p in module.named_parameters() if pred(n))

    bb = emo.backbone
    rows = [
        ("SD1.5 UNet2DConditionModel (diffusers defaults)", count(sd)),
        ("AnimateDiff v2 motion modules (MotionAdapter)", count(mm)),
        ("EMO backbone, total", count(bb)),
        ("  SD1.5 part (loaded from unet/)", count(bb, lambda n: ".motion_modules." not in n and ".audio_" not in n)),
        ("  temporal modules, AnimateDiff part", count(bb, lambda n: ".motion_modules." in n and ".speed_" not in n)),
        ("  speed cross-attention (in temporal modules)", count(bb, lambda n: ".speed_" in n)),
        ("  audio-attention layers", count(bb, lambda n: ".audio_" in n)),
        ("EMO ReferenceNet", count(emo.reference_net)),
        ("audio projection (wav2vec2-base, 13 layers, +-2 frames)", count(emo.audio_proj)),
        ("speed projection", count(emo.speed_proj)),
        ("face locator", count(emo.face_locator)),
        ("EMO model, total", count(emo)),
    ]
    print("[4] full-size parameter counts (meta device, no memory allocated):")
    for name, n in rows:
        print(f"    {name:<58} {n / 1e6:10.2f} M")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny ops gain nothing from more)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--latent", type=int, default=8, help="latent side for [1] (8 = 64 px images)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: backbone,pipeline,params")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")
    if "backbone" not in skip:
        bench_backbone(args.repeats, args.latent)
    if "pipeline" not in skip:
        bench_pipeline(max(3, args.repeats // 2))
    if "params" not in skip:
        count_params()
    return 0


if __name__ == "__main__":
    sys.exit(main())
