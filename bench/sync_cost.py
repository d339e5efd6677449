"""What the lip-sync / frozen-face gate costs: builds with and without it, side by side, and the
gate's own CPU time per clip.

    python bench/sync_cost.py [--manifest manifests/samples.csv] [--rounds 2]

The builds run in-process (``--executor local``, no audio features, so the gate's share is not
hidden behind wav2vec), alternating gate on / off ``--rounds`` times; CPU seconds are this
process's (all threads). The per-clip part times, on every kept clip, the two pieces the gate
adds: the mouth signals the video pass computes on the crops (pixel motion and darkness) and the
weight-free scorer's offset search.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(manifest: str, out: str, gate: bool) -> tuple[float, float, int]:
    from emo_data.config import BuildConfig
    from pipelines.local import build_corpus

    config = BuildConfig()
    config.audio_features.enabled = False
    config.sync.enabled = gate
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = build_corpus(manifest, out, config, progress=False)
    return time.perf_counter() - wall0, time.process_time() - cpu0, result.summary.clips


def per_clip_costs(corpus: str) -> None:
    import glob

    from emo_data.shards import decode_mp4, iter_raw_samples, load_npy, load_wav
    from emo_data.sync.base import SyncInput
    from emo_data.sync.envelope import EnvelopeSyncBackend
    from emo_data.sync.signals import mouth_darkness, mouth_motion

    backend = EnvelopeSyncBackend()
    signals_s = score_s = frames = 0.0
    clips = 0
    for shard in sorted(glob.glob(os.path.join(corpus, "*.tar"))):
        for raw in iter_raw_samples(shard):
            video = decode_mp4(raw["mp4"])
            lms = load_npy(raw["landmarks.npy"])
            wav, sr = load_wav(raw["wav"])
            t0 = time.process_time()
            motion = mouth_motion(video, lms)
            darkness = mouth_darkness(video, lms)
            t1 = time.process_time()
            item = SyncInput(key=raw["__key__"], fps=25.0, sample_rate=sr, num_frames=len(video), landmarks=lms,
                             landmark_format="ibug68", face_boxes=load_npy(raw["face_boxes.npy"]), crop_size=512,
                             audio=wav, audio_pad_frames=0, mouth_motion=motion, mouth_darkness=darkness)
            backend.score(item)
            t2 = time.process_time()
            signals_s += t1 - t0
            score_s += t2 - t1
            frames += len(video)
            clips += 1
    seconds = frames / 25.0
    print(f"per clip    {clips} clips, {seconds:.1f} s of kept footage")
    print(f"  mouth signals (video pass) {signals_s:6.2f} CPU-s  = {1000 * signals_s / max(frames, 1):.2f} ms/frame")
    print(f"  envelope offset search     {score_s:6.2f} CPU-s  = {1000 * score_s / max(clips, 1):.1f} ms/clip")
    print(f"  together                   {(signals_s + score_s) / max(seconds, 1e-9):.3f} CPU-s per second of kept footage")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", default=os.path.join(REPO, "manifests", "samples.csv"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float, int]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for gate in (True, False):
                out = os.path.join(tmp, f"{'gate' if gate else 'nogate'}-{r}")
                results[gate].append(build(args.manifest, out, gate))
        for gate in (True, False):
            walls = sorted(w for w, _, _ in results[gate])
            cpus = sorted(c for _, c, _ in results[gate])
            print(f"build {'with gate   ' if gate else 'without gate'}  wall min {walls[0]:6.1f} s  CPU min {cpus[0]:6.1f} s"
                  f"  ({results[gate][0][2]} clips kept)")
        on, off = min(c for _, c, _ in results[True]), min(c for _, c, _ in results[False])
        print(f"gate share of build CPU: {100 * (on - off) / on:.1f} % (min CPU with vs without)")
        per_clip_costs(os.path.join(tmp, "gate-0"))


if __name__ == "__main__":
    main()
