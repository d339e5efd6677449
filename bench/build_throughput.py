"""Seconds of footage processed per wall second: full build vs. a decode-only pass.

    python bench/build_throughput.py [--manifest manifests/samples.csv] [--executor local|ray] [--workers N]

The full build uses a wav2vec2-base-sized encoder with random weights (same compute as the real
checkpoint, which cannot be downloaded here). The decode-only passes read every frame of the same
files with PyAV (the build's decoder) and with decord, without any analysis.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def decode_only_pyav(paths: list[str]) -> float:
    import av

    start = time.perf_counter()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _frame in container.decode(stream):
                pass
    return time.perf_counter() - start


def decode_only_decord(paths: list[str]) -> float:
    import decord

    start = time.perf_counter()
    for path in paths:
        reader = decord.VideoReader(path, num_threads=0)
        for i in range(0, len(reader), 32):
            reader.get_batch(list(range(i, min(i + 32, len(reader)))))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default=os.path.join(REPO, "manifests", "samples.csv"))
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-audio-features", action="store_true")
    args = parser.parse_args()

    from emo_data.config import BuildConfig
    from emo_data.decode import ProbeStage
    from emo_data.manifest import read_sources

    sources = read_sources(args.manifest)
    paths = [s.path for s in sources]
    footage = sum(ProbeStage()(s).duration_s for s in sources)
    print(f"inputs      {len(paths)} videos, {footage:.1f} s of footage, {os.cpu_count()} cores")

    pyav_s = decode_only_pyav(paths)
    print(f"decode-only PyAV    {pyav_s:6.1f} s wall  {footage / pyav_s:6.2f} s footage / wall s")
    try:
        decord_s = decode_only_decord(paths)
        print(f"decode-only decord  {decord_s:6.1f} s wall  {footage / decord_s:6.2f} s footage / wall s")
    except Exception as exc:  # noqa: BLE001 - decord is optional
        print(f"decode-only decord  unavailable ({type(exc).__name__}: {exc})")

    config = BuildConfig()
    with tempfile.TemporaryDirectory() as tmp:
        if args.no_audio_features:
            config.audio_features.enabled = False
            label = "no audio features"
        else:
            from audio_helpers import make_base_wav2vec2

            config.audio_features.encoder = make_base_wav2vec2(os.path.join(tmp, "wav2vec2-base-random"))
            label = "wav2vec2-base (random weights), all layers"
        out = os.path.join(tmp, "corpus")
        start = time.perf_counter()
        if args.executor == "ray":
            from pipelines.ray_build import build_corpus_ray

            result = build_corpus_ray(args.manifest, out, config, workers=args.workers, progress=False)
        else:
            from pipelines.local import build_corpus

            result = build_corpus(args.manifest, out, config, progress=False)
        wall = time.perf_counter() - start
        s = result.summary
        print(f"full build ({args.executor}, {label})  {wall:6.1f} s wall  {footage / wall:6.2f} s footage / wall s"
              f"  ({s.clips} clips, {s.hours_kept * 3600:.1f} s kept)")


if __name__ == "__main__":
    main()
