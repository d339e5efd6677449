"""Where a build's CPU time goes: per-process CPU seconds of ``emo-data build``'s process tree.

Runs the build as a subprocess, samples every process descending from it every 0.5 s (psutil) and
prints, at the end, CPU seconds grouped by Ray operator (``MapBatches(VideoPass)`` ...) or process
name, with the wall time. Processes that end between two samples lose at most 0.5 s of their
CPU time, so the total is a slight underestimate.

    python bench/build_cpu.py -- manifests/samples.csv --out /tmp/cpu --workers 2 --no-audio-features
    python bench/build_cpu.py --copies 3 -- manifests/samples.csv --out /tmp/cpu --workers 2 --audio-encoder DIR

``--copies N`` builds every source of the manifest N times under distinct ids (as
``bench/build_scaling.py --copies N`` does).
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _group(cmdline: list[str]) -> str:
    name = " ".join(cmdline[:1])
    if "MapBatches(" in name:
        return "MapBatches(" + name.split("MapBatches(", 1)[1].split(")", 1)[0] + ")"
    if "pipelines.cli" in cmdline:
        return "driver (emo-data build)"
    return os.path.basename(name.split()[0]) if name else "?"


def main() -> None:
    import psutil

    args = sys.argv[1:]
    copies = 1
    if args[:1] == ["--copies"]:
        copies, args = int(args[1]), args[2:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SystemExit(__doc__)
    if copies > 1:
        import tempfile

        sys.path.insert(0, REPO)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from build_scaling import make_manifest

        args[0] = make_manifest(args[0], copies, os.path.join(tempfile.mkdtemp(prefix="emo_cpu_"), "sources.csv"))
    cmd = [sys.executable, "-m", "pipelines.cli", "build", "-q"] + args
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    last: dict[int, tuple[str, float]] = {}
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            break
        for p in procs:
            try:
                times = p.cpu_times()
                last[p.pid] = (_group(p.cmdline()), times.user + times.system)
            except psutil.Error:
                continue
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}):\n{stderr[-3000:]}")
    by_group: dict[str, float] = collections.defaultdict(float)
    for name, cpu in last.values():
        by_group[name] += cpu
    print(f"wall {wall:.1f} s, {os.cpu_count()} cores: {wall * (os.cpu_count() or 1):.0f} CPU-seconds available")
    for name, cpu in sorted(by_group.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.5:
            print(f"{cpu:7.1f} s  {name}")
    print(f"{sum(by_group.values()):7.1f} s  total")
    print(next((line for line in stdout.splitlines() if line.startswith("footage")), ""))


if __name__ == "__main__":
    main()
