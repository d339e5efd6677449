"""Peak memory of a build on one long video: 1 minute vs 10 minutes of talking heads.

Makes the videos with PyAV by re-encoding the 512x512, 25 fps talking-head samples back to back
(video libx264, audio 16 kHz mono AAC, each piece's audio trimmed/padded to its frames so lip
sync holds), then runs ``emo-data build`` on each as a subprocess and samples, every 0.2 s with
psutil, the RSS of every process descending from it:

- ``worker``: the largest Ray worker process of the stage graph (``ray::MapWorker(MapBatches(X))``
  actors and ``MapBatches(X)`` tasks), the number that must not grow with video length, and the
  peak per operator X (VideoPass, Analyse, AudioFeatures, head_pose, write_samples);
- ``all``: the sum over the driver, raylet, GCS and every worker (a whole-machine view);
- for ``--executor local`` the one build process.

Prints one line per run. Usage::

    python bench/build_memory.py                     # ray, 1 and 10 minutes
    python bench/build_memory.py --with-local        # + the in-process executor on both
    python bench/build_memory.py --minutes 1 3 --keep /tmp/emo_long
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.environ.get("EMO_SAMPLES_DIR", os.path.join(os.path.dirname(REPO), "shared", "samples"))
PIECES = [
    "video/aniportrait__pose_ref_video.mp4",
    "video/sadtalker__WDA_AlexandriaOcasioCortez_000.mp4",
    "video/sadtalker__WDA_KatieHill_000.mp4",
]
FPS = 25
RATE = 16000


def _decode_piece(path: str) -> tuple[list[np.ndarray], np.ndarray]:
    import av

    frames: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    with av.open(path) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
    with av.open(path) as c:
        res = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        for f in c.decode(audio=0):
            for o in res.resample(f):
                chunks.append(o.to_ndarray().reshape(-1))
        for o in res.resample(None):
            chunks.append(o.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    need = len(frames) * RATE // FPS
    audio = np.pad(audio[:need], (0, max(0, need - len(audio))))
    return frames, audio.astype(np.float32)


def make_long_video(out_path: str, seconds: float) -> float:
    """Concatenate the 512x512 talking heads until ``seconds``; returns the real duration."""
    import av

    pieces = [_decode_piece(os.path.join(SAMPLES, p)) for p in PIECES]
    total_frames = int(round(seconds * FPS))
    with av.open(out_path, "w") as dst:
        vs = dst.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = 512, 512, "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "23"}
        aus = dst.add_stream("aac", rate=RATE, layout="mono")
        written, apts = 0, 0
        pending = np.zeros(0, np.float32)

        def encode_audio(samples: np.ndarray) -> None:
            nonlocal apts
            af = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = RATE, apts, Fraction(1, RATE)
            apts += len(samples)
            for pkt in aus.encode(af):
                dst.mux(pkt)

        while written < total_frames:
            for frames, audio in pieces:
                n = min(len(frames), total_frames - written)
                for i in range(n):
                    vf = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
                    vf.pts, vf.time_base = written + i, Fraction(1, FPS)
                    for pkt in vs.encode(vf):
                        dst.mux(pkt)
                pending = np.concatenate([pending, audio[: n * RATE // FPS]])
                while len(pending) >= 1024:
                    encode_audio(pending[:1024])
                    pending = pending[1024:]
                written += n
                if written >= total_frames:
                    break
        if len(pending):
            encode_audio(np.pad(pending, (0, 1024 - len(pending))))
        for pkt in vs.encode(None):
            dst.mux(pkt)
        for pkt in aus.encode(None):
            dst.mux(pkt)
    return total_frames / FPS


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled every ``interval`` s."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.peak_all = self.peak_worker = self.peak_root = 0
        self.worker_pids: set[int] = set()
        self.peak_by_stage: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            total = worker = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:1])
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                total += rss
                if "MapBatches(" in name:
                    worker = max(worker, rss)
                    self.worker_pids.add(p.pid)
                    stage = name.split("MapBatches(", 1)[1].split(")", 1)[0]
                    self.peak_by_stage[stage] = max(self.peak_by_stage.get(stage, 0), rss)
                if p.pid == self.root_pid:
                    self.peak_root = max(self.peak_root, rss)
            self.peak_all = max(self.peak_all, total)
            self.peak_worker = max(self.peak_worker, worker)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_build(video: str, out: str, executor: str, audio_encoder: str | None) -> dict:
    manifest = os.path.join(os.path.dirname(out), os.path.basename(out) + ".csv")
    with open(manifest, "w") as fh:
        fh.write(f"path,kind,language\n{video},talk,en\n")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "build", manifest, "--out", out, "-q", "--executor", executor]
    if executor == "ray":
        cmd += ["--workers", "1"]
    cmd += ["--audio-encoder", audio_encoder] if audio_encoder else ["--no-audio-features"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{stderr[-3000:]}")
    clips = next((line for line in stdout.splitlines() if line.startswith("footage")), "")
    return {"wall": wall, "all": sampler.peak_all, "worker": sampler.peak_worker, "root": sampler.peak_root,
            "workers_seen": len(sampler.worker_pids), "footage": clips, "by_stage": dict(sampler.peak_by_stage)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    ap.add_argument("--with-local", action="store_true", help="also the in-process executor")
    ap.add_argument("--audio-encoder", help="wav2vec2 dir (default: --no-audio-features)")
    ap.add_argument("--keep", help="folder for the videos and builds (default: a temp dir, removed)")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="emo_mem_")
    os.makedirs(work, exist_ok=True)
    mib = 1024 ** 2
    try:
        results = []
        for minutes in args.minutes:
            video = os.path.join(work, f"talk_{minutes:g}min.mp4")
            if not os.path.exists(video):
                t = time.time()
                seconds = make_long_video(video, minutes * 60)
                print(f"made {video}: {seconds:.0f} s, {os.path.getsize(video) / mib:.1f} MiB in {time.time() - t:.0f} s", flush=True)
            for executor in ["ray"] + (["local"] if args.with_local else []):
                r = run_build(video, os.path.join(work, f"out_{executor}_{minutes:g}"), executor, args.audio_encoder)
                results.append((minutes, executor, r))
                peak = r["worker"] if executor == "ray" else r["root"]
                print(f"{minutes:>4g} min  {executor:<5}  wall {r['wall']:6.1f} s  {minutes * 60 / r['wall']:.2f} s footage/wall s  "
                      f"peak RSS: largest worker {peak / mib:7.0f} MiB, driver {r['root'] / mib:5.0f} MiB, "
                      f"all processes {r['all'] / mib:7.0f} MiB  | {r['footage']}", flush=True)
                if r["by_stage"]:
                    print("           per stage: " + ", ".join(f"{k} {v / mib:.0f} MiB" for k, v in sorted(r["by_stage"].items())), flush=True)
        for executor in ["ray", "local"]:
            rows = [(m, r) for m, e, r in results if e == executor]
            if len(rows) >= 2:
                key = "worker" if executor == "ray" else "root"
                (m0, r0), (m1, r1) = rows[0], rows[-1]
                print(f"{executor}: peak {'largest-worker' if executor == 'ray' else 'process'} RSS {m1:g} min / {m0:g} min = {r1[key] / r0[key]:.2f}x")
                if executor == "ray":
                    for stage in sorted(set(r0["by_stage"]) & set(r1["by_stage"])):
                        print(f"       {stage}: {r1['by_stage'][stage] / r0['by_stage'][stage]:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
