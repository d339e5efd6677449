"""Real-time factor of wav2vec2-base-sized feature extraction (random weights) on CPU.

    /work/venv/bin/python bench/audio_wav2vec.py [--threads 2] [--seconds 2 5 10] [--repeats 3]

Builds a base-size Wav2Vec2Model (94 M parameters, 12 layers, hidden 768; the architecture of
facebook/wav2vec2-base-960h) with random weights in a temp dir, loads it back through
AudioFeatureStage (from_pretrained, offline) and times process() on real speech, all 13 hidden
states, float16 output. RTF = processing time / audio duration (lower is better).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SPEECH = (ROOT / ".." / "shared" / "samples" / "audio" / "musetalk__eng.wav").resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--audio", default=str(SPEECH))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from emo_data.audio_features import AudioFeatureInput, AudioFeatureStage
    from emo_data.config import AudioFeatureConfig
    from tests.audio_helpers import decode_audio_16k, make_base_wav2vec2

    if Path(args.audio).is_file():
        audio = decode_audio_16k(args.audio, max_seconds=max(args.seconds))
        src = Path(args.audio).name
    else:
        audio = (0.1 * np.random.default_rng(0).standard_normal(int(max(args.seconds) * 16000))).astype(np.float32)
        src = "white noise (sample not found)"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_base_wav2vec2(tmp)
        t_build = time.perf_counter() - t0
        stage = AudioFeatureStage(AudioFeatureConfig(encoder=tmp))
        t0 = time.perf_counter()
        stage.ensure_setup()
        t_load = time.perf_counter() - t0
        params = sum(p.numel() for p in stage._model.parameters())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; audio: {src}")
        print(f"wav2vec2 base-size random weights: {params / 1e6:.1f} M params, "
              f"{stage.num_layers} hidden states x {stage.dim}; build+save {t_build:.1f} s, load {t_load:.2f} s")
        stage(AudioFeatureInput(audio[:16000], 25, args.fps))  # warm-up
        print(f"load average before: {os.getloadavg()[0]:.2f} (other processes share the cores: "
              "compare 'cpu s' = process CPU time, ~threads x wall when uncontended)")
        print(f"{'clip s':>7} {'frames':>6} {'best s':>8} {'cpu s':>7} {'RTF':>7} {'x realtime':>10}  output")
        for sec in args.seconds:
            n = int(round(sec * 16000))
            frames = int(round(sec * args.fps))
            times, cpus = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                out = stage(AudioFeatureInput(audio[:n], frames, args.fps))
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            best = min(times)
            print(f"{sec:7.2f} {frames:6d} {best:8.3f} {min(cpus):7.2f} {best / sec:7.3f} {sec / best:10.1f}  "
                  f"{tuple(out.shape)} {out.dtype} {out.nbytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
