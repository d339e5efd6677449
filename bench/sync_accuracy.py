"""How well the lip-sync gate's scorer tells truth from the cases it must catch, on variants of the
real sample footage made here (tests/sync_media.py).

    python bench/sync_accuracy.py [--backend envelope|syncnet --syncnet-weights PATH] [--out DIR]

For every talking head in manifests/samples.csv (kind talk, one clip each): the original, its
voice shifted by -600/-200/+200/+600 ms, another speaker's voice (every other talking head), its
picture frozen after 10 frames, and a still photo over speech. All are built in one corpus in
``--gate-mode score`` (nothing rejected, every score stored). Printed:

- per talking head: the offset measured on the original, and on each shifted copy the error of
  (measured - original) against the applied shift, in frames;
- the confidence of true voices against other speakers' voices, and what share of each a
  confidence threshold keeps (what ``--sync-min-confidence`` would do);
- the mouth motion of frozen / still faces against talking ones (the static-face check).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TALKING = ["sadtalker__WDA_AlexandriaOcasioCortez_000", "sadtalker__WDA_KatieHill_000", "aniportrait__pose_ref_video",
           "video-retalking__face_2", "video-retalking__face_5"]
SHIFTS_MS = (-600, -200, 200, 600)


def make_variants(samples: Path, out: Path) -> list[tuple[str, str, str, float]]:
    """(file, case, talking head, shift frames) rows."""
    import sync_media as media

    rows = []
    for name in TALKING:
        video = samples / "video" / f"{name}.mp4"
        tag = name.split("__")[-1].replace("_", "")[:12]
        rows.append((str(media.with_voice_shifted(video, out / f"{tag}-orig.mp4", 0.0)), "original", name, 0.0))
        for ms in SHIFTS_MS:
            path = media.with_voice_shifted(video, out / f"{tag}-shift{ms:+d}.mp4".replace("+", "p").replace("-shift-", "-shiftm"), ms / 1000)
            rows.append((str(path), "shift", name, ms / 40.0))
        for other in TALKING:
            if other != name:
                otag = other.split("__")[-1].replace("_", "")[:12]
                rows.append((str(media.with_voice_of(video, samples / "video" / f"{other}.mp4", out / f"{tag}-voiceof-{otag}.mp4")),
                             "other_voice", name, 0.0))
        rows.append((str(media.frozen_after(video, out / f"{tag}-frozen.mp4", 10)), "frozen", name, 0.0))
    speech = samples / "audio" / "sadtalker__RD_Radio31_000.wav"
    rows.append((str(media.still_photo_over(samples / "images" / "face_recognition__obama.jpg", speech, out / "still-obama.mp4", 6.0)),
                 "still_photo", "obama", 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", default=os.environ.get("EMO_SAMPLES_DIR", str(REPO.parent / "shared" / "samples")))
    parser.add_argument("--backend", default="envelope", choices=["envelope", "syncnet"])
    parser.add_argument("--syncnet-weights")
    parser.add_argument("--out", help="keep the variants and corpus here (default: a temporary folder)")
    args = parser.parse_args()

    import pandas as pd

    from emo_data.config import BuildConfig, SyncConfig
    from pipelines.local import build_corpus

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        (root / "variants").mkdir(parents=True, exist_ok=True)
        rows = make_variants(Path(args.samples), root / "variants")
        manifest = root / "variants.csv"
        manifest.write_text("path,kind\n" + "".join(f"{p},talk\n" for p, _, _, _ in rows))
        config = BuildConfig()
        config.audio_features.enabled = False
        config.sync = SyncConfig(mode="score", backend=args.backend, syncnet_weights=args.syncnet_weights)
        build_corpus(str(manifest), str(root / "corpus"), config, progress=False)
        table = pd.read_parquet(root / "corpus" / "manifest.parquet")
        scored = table[table.sync_backend.notna()]
        by_path = {p: (case, name, shift) for p, case, name, shift in rows}
        # one scored clip per variant: the longest
        best = scored.sort_values("num_frames", ascending=False).drop_duplicates("path")
        res = [dict(case=by_path[r.path][0], name=by_path[r.path][1], shift=by_path[r.path][2], offset=r.sync_offset_frames,
                    conf=r.sync_confidence, motion=r.mouth_motion_p90, frames=r.num_frames) for r in best.itertuples() if r.path in by_path]
        res = pd.DataFrame(res)
        print(f"backend {args.backend}: {len(res)} variants scored out of {len(rows)} made")
        print("\nA/V offset: measured on the original, and error of (shifted - original) against the applied shift")
        for name in TALKING:
            mine = res[res.name == name]
            orig = mine[mine.case == "original"]
            if orig.empty:
                print(f"  {name:<42} original not kept as a clip")
                continue
            o = int(orig.offset.iloc[0])
            errs = []
            for r in mine[mine.case == "shift"].sort_values("shift").itertuples():
                errs.append(f"{r.shift * 40:+5.0f} ms: {int(r.offset) - o - r.shift:+5.1f}")
            print(f"  {name:<42} original {o:+3d} frames | " + "  ".join(errs))
        shift_err = []
        for r in res[res.case == "shift"].itertuples():
            orig = res[(res.name == r.name) & (res.case == "original")]
            if not orig.empty:
                shift_err.append(abs(r.offset - orig.offset.iloc[0] - r.shift))
        if shift_err:
            e = np.array(shift_err)
            print(f"  shifts within 1 frame: {np.mean(e <= 1):.0%} of {len(e)}")
        true = res[res.case.isin(["original", "shift"])].conf.to_numpy()
        other = res[res.case == "other_voice"].conf.to_numpy()
        print(f"\nconfidence, true voice      (n={len(true)}): " + " ".join(f"{v:.2f}" for v in sorted(true)))
        print(f"confidence, another speaker (n={len(other)}): " + " ".join(f"{v:.2f}" for v in sorted(other)))
        for thr in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
            print(f"  threshold {thr:3.1f}: keeps {np.mean(true >= thr):4.0%} of true voices, {np.mean(other >= thr):4.0%} of other speakers'")
        talk = res[res.case.isin(["original", "shift", "other_voice"])].motion.to_numpy()
        still = res[res.case.isin(["frozen", "still_photo"])]
        print(f"\nmouth motion p90 (grey levels): talking min {talk.min():.2f} median {np.median(talk):.2f}; "
              f"frozen/still: " + ", ".join(f"{r.name}:{r.case} {r.motion:.3f}" for r in still.itertuples()))


if __name__ == "__main__":
    main()
