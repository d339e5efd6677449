"""CPU cost of vocal separation per second of audio (emo_data/vocals.py), on random weights.

Builds the models the way tests/test_vocals.py does (random weights, saved and loaded the real
way) in a temporary folder, separates ``--seconds`` of a real song at 16 kHz and prints CPU
seconds per audio second (process CPU time, so a busy machine does not inflate it) and wall
time. Models:

- ``htdemucs-tiny``: the test model (channels 8, 1 transformer layer, 1 s segment);
- ``htdemucs-full``: the architecture of the released ``htdemucs`` / each ``htdemucs_ft`` model
  (channels 48, depth 4, dconv_mode 3, 5 cross-transformer layers, 7.8 s segment; 42 M
  parameters): its cost is that of the real weights, which are not downloadable here;
- ``mdx-tiny``: the test MDX-Net-shaped ONNX model (two 3x3 convolutions) at Kim_Vocal_2's STFT
  size (n_fft 7680, dim_f 3072, dim_t 256): the cost of everything around the network.

    python bench/vocals_cost.py --threads 1 --seconds 30
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="htdemucs-tiny,mdx-tiny,htdemucs-full")
    args = parser.parse_args()

    import numpy as np
    import torch
    from demucs.htdemucs import HTDemucs
    from demucs.states import get_state
    from test_vocals import SONG, decode, export_tiny_mdx, save_tiny_htdemucs

    from emo_data.vocals import VocalsConfig, make_vocal_separator

    torch.set_num_threads(args.threads)
    audio = decode(SONG, 16000, start_s=10.0, seconds=args.seconds)
    tmp = Path(tempfile.mkdtemp(prefix="vocals_cost_"))
    print(f"{args.seconds:.0f} s of {os.path.basename(SONG)} at 16 kHz, torch threads {args.threads}")
    for name in args.models.split(","):
        path = tmp / name
        if name == "htdemucs-tiny":
            path = path.with_suffix(".th")
            save_tiny_htdemucs(path)
        elif name == "mdx-tiny":
            path = path.with_suffix(".onnx")
            export_tiny_mdx(path, dynamic_time=False)
        elif name == "htdemucs-full":
            path = path.with_suffix(".th")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = HTDemucs(sources=["drums", "bass", "other", "vocals"], dconv_mode=3, t_layers=5,
                                 segment=Fraction(39, 5))
            args_, kwargs = model._init_args_kwargs
            torch.save({"klass": HTDemucs, "args": args_, "kwargs": kwargs, "state": get_state(model, None, half=True)}, path)
            print(f"  htdemucs-full: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                  f"checkpoint {path.stat().st_size / 1e6:.0f} MB")
            del model
        else:
            raise SystemExit(f"unknown model {name}")
        separator = make_vocal_separator(VocalsConfig(mode="always", weights=str(path)))
        t0 = time.process_time()
        separator.setup()
        load_cpu = time.process_time() - t0
        wall, cpu = time.perf_counter(), time.process_time()
        vocals = separator.separate(audio, 16000)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert vocals.shape == audio.shape and np.isfinite(vocals).all()
        print(f"  {name:14s} segment {separator.describe()['segment_s']:.2f} s: load {load_cpu:.2f} CPU s; "
              f"separate {cpu:.2f} CPU s = {cpu / args.seconds:.3f} CPU s per audio s (wall {wall:.2f} s)")


if __name__ == "__main__":
    main()
