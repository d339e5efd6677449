"""Speed of the speech-activity backends on the sample audio.

    /work/venv/bin/python bench/audio_vad.py            # silero
    /work/venv-pya/bin/python bench/audio_vad.py --pyannote   # + pyannote, random-weight pipeline

silero: the shipped model. pyannote: the real SpeakerDiarization pipeline (PyanNet +
WeSpeakerResNet34 + VBx) with random weights, built by tests/audio_helpers.py -- the speed is
that of the real architecture (pyannote's own step 0.1 and our test step 0.5), the output is not
meaningful.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES = Path(os.environ.get("EMO_SAMPLES_DIR", ROOT.parent / "shared" / "samples"))
FILES = ["audio/musetalk__eng.wav", "audio/sadtalker__RD_Radio31_000.wav", "audio/librosa__198-209-0000.hq.ogg",
         "audio/librosa__robin-single-13.hq.ogg", "video/imageio__cockatoo.mp4"]


def run(stage, files, label):
    from emo_data.types import AudioTrack
    from tests.audio_helpers import decode_audio_16k

    stage.ensure_setup()
    for rel in files:
        path = SAMPLES / rel
        if not path.is_file():
            print(f"  {rel}: missing")
            continue
        x = decode_audio_16k(path)
        dur = len(x) / 16000
        t0 = time.perf_counter()
        segs = stage(AudioTrack(x, 16000, 0.0))
        dt = time.perf_counter() - t0
        cov = sum(s.end_s - s.start_s for s in segs)
        print(f"  {label:18s} {rel:42s} {dur:6.1f} s  {dt:6.2f} s  RTF {dt / dur:.3f}  "
              f"speech {cov:5.1f} s in {len(segs)} segments")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pyannote", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from emo_data.config import SpeechConfig
    from emo_data.speech import SpeechActivityStage

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    stage = SpeechActivityStage(SpeechConfig(backend="silero"))
    stage.ensure_setup()
    print(f"silero setup {time.perf_counter() - t0:.2f} s")
    run(stage, FILES, "silero")
    if args.pyannote:
        from tests.audio_helpers import make_tiny_pyannote_pipeline

        for step in (0.5, 0.1):
            with tempfile.TemporaryDirectory() as tmp:
                make_tiny_pyannote_pipeline(tmp, segmentation_step=step)
                t0 = time.perf_counter()
                stage = SpeechActivityStage(SpeechConfig(backend="pyannote", pyannote_pipeline=tmp))
                stage.ensure_setup()
                print(f"pyannote (random weights, step {step}) setup {time.perf_counter() - t0:.2f} s")
                run(stage, FILES[1:3], f"pyannote step {step}")


if __name__ == "__main__":
    main()
