"""ms/frame of the dlib face backend on a sample: detection at several sizes, landmarks, tracker.

    /work/venv/bin/python bench/faces_speed.py [video] [--frames N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emo_data.config import FaceConfig  # noqa: E402
from emo_data.faces import FaceTracker, make_face_backend  # noqa: E402
from emo_data.pose import head_pose_from_landmarks  # noqa: E402

DEFAULT = (Path(__file__).resolve().parents[1] / ".." / "shared" / "samples" / "video"
           / "sadtalker__WDA_KatieHill_000.mp4").resolve()


def load(path: Path, n: int) -> list[np.ndarray]:
    import av

    out = []
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            out.append(f.to_ndarray(format="rgb24"))
            if len(out) >= n:
                break
    return out


def ms(fn, frames) -> float:
    t0 = time.perf_counter()
    for f in frames:
        fn(f)
    return (time.perf_counter() - t0) * 1000.0 / len(frames)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video", nargs="?", default=str(DEFAULT))
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--backend", default="dlib")
    ap.add_argument("--model-root", default=None)
    args = ap.parse_args()
    frames = load(Path(args.video), args.frames)
    h, w = frames[0].shape[:2]
    print(f"{Path(args.video).name}: {len(frames)} frames {w}x{h}, backend {args.backend}")
    boxes = None
    # min_face_fraction=0 shows the raw cost of detect_max_side; with the default fraction the
    # backend may detect larger so the smallest accepted face stays visible (detection_scale).
    for frac in (0.0, FaceConfig().min_face_fraction):
        for side in (320, 512, 0):
            b = make_face_backend(FaceConfig(backend=args.backend, model_root=args.model_root,
                                             detect_max_side=side, min_face_fraction=frac))
            b.setup()
            for f in frames[:5]:  # warm-up
                b.detect(f)
            t = ms(b.detect, frames)
            found = [len(b.detect(f)) for f in frames]
            s = b.detection_scale(w, h)
            label = f"{side}" if side else "full"
            print(f"detect max_side={label:>4} min_face_fraction={frac:4.2f} -> detects at "
                  f"{round(w * s)}x{round(h * s)}: {t:7.2f} ms/frame, faces/frame {np.mean(found):.2f}")
            if boxes is None or sum(map(len, boxes)) < sum(found):
                boxes = [[d.box for d in b.detect(f)] for f in frames]
    b = make_face_backend(FaceConfig(backend=args.backend, model_root=args.model_root))
    b.setup()
    pairs = [(f, bx) for f, bx in zip(frames, boxes) if bx]
    t = ms(lambda p: b.landmarks(p[0], p[1]), pairs)
    print(f"landmarks ({b.landmark_count} pts)       : {t:7.2f} ms/frame")
    with_face = [(f, bx[0]) for f, bx in pairs if bx]
    from emo_data.types import Face

    if not with_face:
        print("no face found at any detection size: skipping landmarks/embedding/tracker")
        return
    t = ms(lambda p: b.embed(p[0], Face(box=p[1])), with_face[:20])
    print(f"embed ({b.embedding_dim}-d)              : {t:7.2f} ms/face")
    for need in (False, True):
        tr = FaceTracker(b, FaceConfig(detect_every=5))
        t0 = time.perf_counter()
        lms = []
        for i, f in enumerate(frames):
            faces = tr.update(f, i, need_landmarks=need)
            if need and len(faces) == 1:
                lms.append(faces[0].landmarks)
        t = (time.perf_counter() - t0) * 1000.0 / len(frames)
        print(f"tracker detect_every=5 landmarks={str(need):5}: {t:7.2f} ms/frame")
    if lms and b.landmark_format == "ibug68":
        arr = np.stack(lms)
        t0 = time.perf_counter()
        head_pose_from_landmarks(arr, (w, h))
        print(f"solvePnP head pose           : {(time.perf_counter() - t0) * 1000 / len(arr):7.3f} ms/frame")


if __name__ == "__main__":
    main()
