"""Throughput of ``emo-shards`` (validate, stats, ls) in samples/s.

    python bench/shards_bench.py /tmp/emo_shards            # shards from `emo-data build`
    python bench/shards_bench.py --synthetic 24 --frames 100 # fixture shards from real footage

Each command runs in-process (``emo_data.shards_cli.main``) ``--repeat`` times; the best wall
time is reported, so the figures exclude the interpreter start but include every import.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _make_synthetic(root: str, n: int, frames: int, per_shard: int) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from emo_data.shards import write_tar

    import shard_fixtures as fx

    for s in range(0, n, per_shard):
        samples = [fx.make_sample(i, frames, True, source_id=f"src{s // per_shard:03d}", seed=s)
                   for i in range(s, min(n, s + per_shard))]
        write_tar(os.path.join(root, f"train-{s // per_shard:06d}.tar"), samples)


def _time(argv: list[str], repeat: int) -> float:
    from emo_data.shards_cli import main

    best = float("inf")
    for _ in range(repeat):
        sink_out, sink_err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sink_out), contextlib.redirect_stderr(sink_err):
            main(argv)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", nargs="*")
    ap.add_argument("--synthetic", type=int, default=0, help="build this many fixture samples instead")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from emo_data.shards import list_shards, load_index

    tmp = None
    shards = args.shards
    if args.synthetic:
        tmp = tempfile.mkdtemp(prefix="emo_shards_bench_")
        _make_synthetic(tmp, args.synthetic, args.frames, args.per_shard)
        shards = [tmp]
    urls = list_shards(shards, must_match=True)
    n = sum(len(load_index(u)["samples"]) for u in urls)
    frames = sum(int((e.get("meta") or {}).get("num_frames") or 0) for u in urls for e in load_index(u)["samples"])
    size = sum(os.path.getsize(u) for u in urls if "://" not in u)
    print(f"{len(urls)} shards, {n} samples, {frames} frames, {size / 2**20:.1f} MiB, {os.cpu_count()} CPUs")
    rows = [
        ("ls", ["ls", *urls]),
        ("stats (index only)", ["stats", *urls]),
        ("stats --frames", ["stats", "--frames", *urls]),
        ("validate --no-decode", ["validate", "--no-decode", *urls]),
        ("validate", ["validate", *urls]),
        ("validate --jobs 2", ["validate", "--jobs", "2", *urls]),
    ]
    print("| command | wall s | samples/s | frames/s |\n|---|---:|---:|---:|")
    for name, argv in rows:
        secs = _time(argv, args.repeat if not name.startswith("validate") or "no-decode" in name else 1)
        print(f"| `emo-shards {name}` | {secs:.3f} | {n / secs:,.1f} | {frames / secs:,.0f} |", flush=True)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
