"""Cost per clip of the face image-quality scores (emo_data/quality.py).

Decodes the first/middle/last frame of each talking head in the shared samples, finds the face
with the offline face backend (not timed), then times ``FaceQualityScorer.score`` on those three
frames (``--repeat`` times, median). With ``--musiq`` it also times MUSIQ on random weights
through pyiqa's class (needs pyiqa installed).

    python bench/quality_cost.py --repeat 20
    python bench/quality_cost.py --repeat 3 --musiq
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SAMPLES = os.environ.get("EMO_SAMPLES_DIR", os.path.join(os.path.dirname(REPO), "shared", "samples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--musiq", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from emo_data.config import FaceConfig
    from emo_data.decode import iter_frames
    from emo_data.faces.dlib_backend import DlibBackend
    from emo_data.quality import FaceQualityScorer, QualityConfig, make_learned_iqa, pick_frames

    detector = DlibBackend(FaceConfig())
    detector.setup()
    scorers = [("offline", FaceQualityScorer())]
    if args.musiq:
        import torch
        from pyiqa.archs.musiq_arch import MUSIQ

        torch.set_num_threads(1)
        path = os.path.join(tempfile.mkdtemp(), "musiq_random.pth")
        torch.save(MUSIQ(pretrained=False).state_dict(), path)
        scorers.append(("musiq", make_learned_iqa(QualityConfig(iqa_backend="musiq", iqa_weights=path))))
    for _, scorer in scorers:
        scorer.setup()
    for path in sorted(glob.glob(os.path.join(SAMPLES, "video", "*.mp4"))):
        images = [f.image.copy() for f in iter_frames(path)]
        frames, boxes = [], []
        for i in pick_frames(len(images)):
            faces = detector.detect(images[i])
            if faces:
                frames.append(images[i])
                boxes.append(max(faces, key=lambda f: f.box[2] - f.box[0]).box)
        if not frames:
            continue
        boxes = np.stack(boxes)
        line = f"{os.path.basename(path):48s} {images[0].shape[1]}x{images[0].shape[0]} {len(frames)} frames"
        for name, scorer in scorers:
            walls, cpus = [], []
            for _ in range(args.repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                scorer.score(frames, boxes)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            line += f" | {name}: {1000 * statistics.median(cpus):7.1f} ms CPU ({1000 * statistics.median(walls):7.1f} ms wall)"
        print(line)


if __name__ == "__main__":
    main()
