"""Wall time of ``emo-data build`` on the same inputs: in-process executor, Ray with 1 worker,
Ray with 2 workers (each a fresh subprocess, fresh output folder, embedded Ray).

Prints per run the wall time and seconds of footage per wall second, then the Ray 2-vs-1-worker
speed-up and Ray vs local. Runs are interleaved (local, ray1, ray2, local, ...) so a noisy
neighbour on a shared machine hits every variant alike; the 1-minute load average before each
run is printed so a disturbed run can be spotted.

    python bench/build_scaling.py                          # the 11 samples, no wav2vec
    python bench/build_scaling.py --copies 3 --repeat 2    # each sample 3x (distinct ids)
    python bench/build_scaling.py --audio-encoder DIR      # with wav2vec features
    python bench/build_scaling.py --variants ray1c1,ray2   # 1 worker on 1 core vs 2 workers on 2

Variants: ``local`` (in-process), ``rayN`` (``--workers N``, all cores visible: the light stages
of a 1-worker build still run beside it on the other core), ``rayNcK`` (``--workers N`` with the
whole build pinned to K cores by CPU affinity: a K-core machine).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_manifest(src: str, copies: int, dst: str) -> str:
    import pandas as pd

    from emo_data.manifest import read_sources

    rows = []
    for k in range(copies):
        for s in read_sources(src):
            rows.append({"path": s.path, "source_id": s.source_id if copies == 1 else f"{s.source_id}-c{k}",
                         "kind": s.kind, "language": s.language, "licence": s.licence})
    pd.DataFrame(rows).to_csv(dst, index=False)
    return dst


def run(manifest: str, out: str, variant: str, audio_encoder: str | None) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "build", manifest, "--out", out, "-q"]
    cores = None
    if variant == "local":
        cmd += ["--executor", "local"]
    else:
        workers, _, pinned = variant[len("ray"):].partition("c")
        cmd += ["--executor", "ray", "--workers", workers]
        cores = int(pinned) if pinned else None
    cmd += ["--audio-encoder", audio_encoder] if audio_encoder else ["--no-audio-features"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    start, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pin = (lambda: os.sched_setaffinity(0, set(range(cores)))) if cores else None  # children inherit it
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=pin)
    wall = time.time() - start
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{res.stderr[-3000:]}")
    footage = next(line for line in res.stdout.splitlines() if line.startswith("footage"))
    seconds_in = float(footage.split()[1])
    return wall, seconds_in, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", nargs="?", default=os.path.join(REPO, "manifests", "samples.csv"))
    ap.add_argument("--copies", type=int, default=1, help="repeat every source this many times (distinct source ids)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--variants", default="local,ray1,ray2")
    ap.add_argument("--audio-encoder")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="emo_scaling_")
    try:
        manifest = make_manifest(args.manifest, args.copies, os.path.join(work, "sources.csv"))
        walls: dict[str, list[float]] = {}
        seconds_in = 0.0
        for rep in range(args.repeat):
            for variant in args.variants.split(","):
                load = os.getloadavg()[0]
                wall, seconds_in, cpu = run(manifest, os.path.join(work, variant), variant, args.audio_encoder)
                walls.setdefault(variant, []).append(wall)
                print(f"run {rep + 1} {variant:<6}  wall {wall:6.1f} s  {seconds_in / wall:5.2f} s footage/wall s  "
                      f"CPU {cpu:6.1f} s (reaped processes)  ({seconds_in:.1f} s footage, load avg before {load:.1f})", flush=True)
        med = {v: statistics.median(w) for v, w in walls.items()}
        print("median wall: " + ", ".join(f"{v} {w:.1f} s" for v, w in med.items()))
        if "ray1" in med and "ray2" in med:
            print(f"ray 2 workers vs 1 worker: {med['ray1'] / med['ray2']:.2f}x")
        if "ray1c1" in med and "ray2" in med:
            print(f"ray 2 workers on 2 cores vs 1 worker on 1 core: {med['ray1c1'] / med['ray2']:.2f}x")
        if "local" in med:
            for v in ("ray1", "ray2"):
                if v in med:
                    print(f"{v} vs local: {med['local'] / med[v]:.2f}x the speed "
                          f"({seconds_in / med[v]:.2f} vs {seconds_in / med['local']:.2f} s footage/wall s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
