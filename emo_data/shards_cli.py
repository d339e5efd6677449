"""``emo-shards``: see and check an EMO corpus without writing code.

    emo-shards ls SHARDS... [--json]
    emo-shards stats SHARDS... [--manifest manifest.parquet] [--plot report.png] [--frames] [--json]
    emo-shards show SHARD [KEY | --index N] [--json]
    emo-shards render SHARD [KEY | --index N] --out sheet.png [--video clip.mp4]
    emo-shards validate SHARDS... [--jobs N] [--no-decode]
    emo-shards sample SHARDS... -n 20 --out DIR [--seed S]

SHARDS are files, directories (their ``*.tar``) or globs, local or fsspec URLs (s3://, gs://,
http(s)://, memory://, file://). ``ls``/``stats``/``show``/``render``/``sample`` read the sidecar
``.index.json`` and then only the byte ranges they need. Nothing is ever unpickled.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Optional

import numpy as np

from . import shards
from .shards import SampleMeta, file_size, find_entry, list_shards, load_index, read_members


def resolve_shards(specs) -> list[str]:
    """Shard tars named by files, directories (every ``*.tar`` directly inside) or globs; a spec
    that names none is an error."""
    return list_shards(specs, must_match=True)


def safe_name(name: str) -> bool:
    """A key or member name that can become a path component (no traversal, no hidden files)."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name


def _duration_s(meta: Optional[dict[str, Any]]) -> float:
    try:
        return SampleMeta.from_dict(meta).duration_s if meta else 0.0
    except (TypeError, ValueError):
        return 0.0


def _human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TB"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=False, default=shards.json_default))


# ----------------------------------------------------------------------------------- ls
def cmd_ls(args) -> int:
    rows = []
    for url in resolve_shards(args.shards):
        index = load_index(url)
        metas = [e.get("meta") or {} for e in index["samples"]]
        secs = sum(_duration_s(m) for m in metas)
        size = index.get("bytes") if isinstance(index.get("bytes"), int) else file_size(url)
        splits = sorted({str(m.get("split")) for m in metas if m.get("split")})
        rows.append({
            "shard": url,
            "samples": len(index["samples"]),
            "bytes": size,
            "seconds": round(secs, 3),
            "hours": secs / 3600.0,
            "splits": splits,
            "index": not index.get("from_tar_scan", False),
        })
    total = {
        "shards": len(rows),
        "samples": sum(r["samples"] for r in rows),
        "bytes": sum(r["bytes"] or 0 for r in rows),
        "seconds": round(sum(r["seconds"] for r in rows), 3),
        "hours": sum(r["hours"] for r in rows),
    }
    if args.json:
        _print_json({"shards": rows, "total": total})
        return 0
    width = max([len(r["shard"]) for r in rows] + [5])
    print(f"{'shard':<{width}}  {'samples':>8}  {'size':>10}  {'hours':>8}  split  index")
    for r in rows:
        print(f"{r['shard']:<{width}}  {r['samples']:>8,}  {_human_bytes(r['bytes']):>10}  {r['hours']:>8.4f}  "
              f"{','.join(r['splits']) or '-':<5}  {'yes' if r['index'] else 'NO (tar scanned)'}")
    print(f"total: {total['shards']} shards, {total['samples']:,} samples, {_human_bytes(total['bytes'])}, "
          f"{total['hours']:.4f} h ({total['seconds']:,.1f} s)")
    return 0


# -------------------------------------------------------------------------------- stats
def cmd_stats(args) -> int:
    from .inspect import stats as st

    t0 = time.perf_counter()
    urls = resolve_shards(args.shards)
    stats = st.collect(urls, read_frames=args.frames)
    if args.manifest:
        stats.rejections = st.load_rejections(args.manifest)
        stats.gate_rows = st.load_gate_rows(args.manifest)
    elapsed = time.perf_counter() - t0
    n = len(stats.records)
    if args.plot:
        st.plot_report(stats, args.plot, dpi=args.dpi)
    if args.json:
        out = stats.to_dict()
        out["elapsed_s"] = elapsed
        if args.plot:
            out["plot"] = args.plot
        _print_json(out)
        return 0
    print(st.format_text(stats, top_identities=args.top))
    if args.plot:
        print(f"report: {args.plot}")
    print(f"read {n:,} samples in {elapsed:.2f} s ({n / max(elapsed, 1e-9):,.0f} samples/s)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------- show
def _mp4_info(data: bytes) -> dict[str, Any]:
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        vs = container.streams.video[0]
        frames = sum(1 for p in container.demux(vs) if p.size)  # packets, no decoding
        rate = float(vs.average_rate) if vs.average_rate else None
        return {"codec": vs.codec_context.name, "width": vs.codec_context.width, "height": vs.codec_context.height,
                "pix_fmt": vs.codec_context.pix_fmt, "fps": rate, "frames": frames,
                "seconds": frames / rate if rate else None}


def describe_member(name: str, data: bytes) -> dict[str, Any]:
    """dtype / shape / a short note for one member; never unpickles."""
    info: dict[str, Any] = {"member": name, "bytes": len(data)}
    try:
        if ("." + name).endswith(shards.UNSAFE_EXTENSIONS):
            info["note"] = "REFUSED: pickle-like member"
        elif name.endswith(".npy"):
            a = shards.load_npy(data)
            info.update(dtype=str(a.dtype), shape=list(a.shape))
            if a.size and a.dtype.kind in "fiu":
                f = a.astype(np.float64)
                info["note"] = f"min {f.min():.4g}  max {f.max():.4g}  mean {f.mean():.4g}"
        elif name == "mp4":
            m = _mp4_info(data)
            info.update(dtype=f"{m['codec']} {m['pix_fmt']}", shape=[m["frames"], m["height"], m["width"], 3])
            info["note"] = f"{m['fps']:g} fps, {m['seconds']:.2f} s" if m["fps"] else ""
        elif name == "wav":
            samples, rate = shards.load_wav(data)
            info.update(dtype="int16 PCM mono", shape=[int(len(samples))])
            peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
            info["note"] = f"{rate} Hz, {len(samples) / rate:.3f} s, peak {peak:.3f}"
        elif name.endswith("png"):
            img = shards.load_png(data)
            info.update(dtype=str(img.dtype), shape=list(img.shape))
            info["note"] = f"{100.0 * float((img > 0).mean()):.1f}% non-zero"
        elif name == "json" or name.endswith(".json"):
            meta = json.loads(data.decode("utf-8"))
            info.update(dtype="utf-8 json", shape=[len(meta)] if isinstance(meta, dict) else None)
            info["note"] = f"{len(meta)} fields" if isinstance(meta, dict) else ""
        else:
            info["note"] = "unknown member (left as bytes)"
    except Exception as exc:  # noqa: BLE001 - show what is wrong instead of failing
        info["note"] = f"DOES NOT DECODE: {type(exc).__name__}: {exc}"
    return info


def _load_one(args) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    url = resolve_shards([args.shard])[0]
    index = load_index(url)
    if args.key is None and args.index is None:
        args.index = 0
    entry = find_entry(index, key=args.key, position=args.index)
    raw = read_members(url, entry)
    return url, index, entry, raw


def cmd_show(args) -> int:
    url, index, entry, raw = _load_one(args)
    meta = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
    config = SampleMeta.from_dict(meta).build_config(index) if isinstance(meta, dict) else None
    members = [describe_member(name, raw[name]) for name in sorted(entry["members"], key=lambda m: entry["members"][m]["offset"])]
    if args.json:
        _print_json({"shard": url, "key": entry["key"], "meta": meta, "config": config, "members": members})
        return 0
    print(f"shard: {url}")
    print(f"key:   {entry['key']}")
    if meta is not None:
        short = {k: v for k, v in meta.items() if k != "config"}
        print("meta:")
        for k in sorted(short):
            v = json.dumps(short[k], default=shards.json_default)
            print(f"  {k:<20} {v if len(v) <= 110 else v[:107] + '...'}")
        if config is not None:
            where = "inline in the sample json" if "config" in meta else "in the shard index"
            print(f"  {'(config)':<20} build config {config.get('_class')} v{config.get('_version')}, "
                  f"{len(json.dumps(config))} bytes, {where}; --json shows it")
    print("members:")
    print(f"  {'member':<18} {'bytes':>10}  {'dtype':<18} {'shape':<20} note")
    for m in members:
        shape = "x".join(str(s) for s in m["shape"]) if m.get("shape") is not None else "-"
        print(f"  {m['member']:<18} {m['bytes']:>10,}  {m.get('dtype', '-'):<18} {shape:<20} {m.get('note', '')}")
    return 0


# ------------------------------------------------------------------------------- render
def cmd_render(args) -> int:
    from .inspect import render

    if not args.out and not args.video and not args.sync:
        print("render: give --out sheet.png, --video clip.mp4 and/or --sync sync.png", file=sys.stderr)
        return 2
    url, _index, _entry, raw = _load_one(args)
    d = render.decode_for_render(raw)
    if args.out:
        render.contact_sheet(d, args.out, n_frames=args.frames, shard=url, dpi=args.dpi)
        print(f"contact sheet: {args.out}")
    if args.video:
        render.overlay_video(d, args.video)
        print(f"video: {args.video}")
    if args.sync:
        from .inspect.sync_plot import sync_sheet

        sync_sheet(d, args.sync, dpi=args.dpi)
        print(f"sync plot: {args.sync}")
    if d.get("audio_emb") is None:
        print("note: no audio features in this sample")
    return 0


# ----------------------------------------------------------------------------- validate
def _validate_one(url: str, decode_media: bool) -> tuple[str, int, list[tuple[str, str, str]], float]:
    t0 = time.perf_counter()
    n, issues = shards.validate_shard(url, decode_media=decode_media)
    return url, n, [(i.shard, i.key, i.reason) for i in issues], time.perf_counter() - t0


def cmd_validate(args) -> int:
    t0 = time.perf_counter()
    urls = resolve_shards(args.shards)
    decode = not args.no_decode
    total, failures, bad_shards = 0, 0, 0

    def report(result) -> None:
        nonlocal total, failures, bad_shards
        url, n, issues, secs = result
        total += n
        failures += len(issues)
        bad_shards += bool(issues)
        for shard, key, reason in issues:
            print(f"{shard}\t{key}\t{reason}", flush=True)
        if args.verbose:
            print(f"# {url}: {n} samples, {len(issues)} issues, {secs:.2f} s", file=sys.stderr)

    if args.jobs > 1 and len(urls) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_validate_one, u, decode) for u in urls]
            for fut in as_completed(futures):
                report(fut.result())
    else:
        for u in urls:
            report(_validate_one(u, decode))
    elapsed = time.perf_counter() - t0
    verdict = "OK" if not failures else f"FAILED: {failures} issues in {bad_shards} shards"
    print(f"{verdict} - {len(urls)} shards, {total:,} samples in {elapsed:.2f} s "
          f"({total / max(elapsed, 1e-9):.1f} samples/s, jobs={args.jobs})", file=sys.stderr)
    return 1 if failures else 0


# ------------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    urls = resolve_shards(args.shards)
    pool: list[tuple[str, dict[str, Any]]] = []
    for url in urls:
        pool.extend((url, e) for e in load_index(url)["samples"])
    rng = random.Random(args.seed)
    picked = rng.sample(pool, min(args.n, len(pool)))
    os.makedirs(args.out, exist_ok=True)
    written = 0
    for url, entry in picked:
        key = entry["key"]
        if not safe_name(key):
            print(f"skipping sample with unsafe key {key!r} in {url}", file=sys.stderr)
            continue
        names = [m for m in entry["members"] if safe_name(m) and not ("." + m).endswith(shards.UNSAFE_EXTENSIONS)]
        for m in set(entry["members"]) - set(names):
            print(f"{url}\t{key}\trefusing member {m!r} (pickle-like or unsafe name)", file=sys.stderr)
        raw = read_members(url, entry, names)
        target = os.path.join(args.out, key)
        os.makedirs(target, exist_ok=True)
        for m in names:
            with open(os.path.join(target, m), "wb") as fh:
                fh.write(raw[m])
        written += 1
        if not args.quiet:
            print(f"{key}\t{url}")
    print(f"wrote {written} samples ({len(pool)} available) to {args.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-shards", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shards_help = "shard tars: files, directories, globs; local or fsspec URLs"

    p = sub.add_parser("ls", help="shards with sample counts, sizes and hours")
    p.add_argument("shards", nargs="+", help=shards_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stats", help="totals by split/kind/language/identity, distributions, rejections")
    p.add_argument("shards", nargs="+", help=shards_help)
    p.add_argument("--manifest", help="build manifest.parquet (status, reason) or a rejections table (.parquet/.csv)")
    p.add_argument("--plot", help="write a PNG report with histograms")
    p.add_argument("--frames", action="store_true",
                   help="also read each sample's face_boxes.npy + head_speed.npy (byte ranges) for per-frame distributions")
    p.add_argument("--top", type=int, default=10, help="identities listed (default 10)")
    p.add_argument("--dpi", type=int, default=90, help="report resolution (default 90: 1440 px wide)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    for name, helptext in (("show", "one sample's metadata and every member's dtype and shape"),
                           ("render", "contact sheet PNG (and overlay video) of one sample")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("shard", help="one shard (file or URL)")
        p.add_argument("key", nargs="?", help="sample key (default: the first sample)")
        p.add_argument("--index", type=int, help="sample position in the shard instead of a key")
        if name == "show":
            p.add_argument("--json", action="store_true")
            p.set_defaults(func=cmd_show)
        else:
            p.add_argument("--out", help="contact sheet PNG")
            p.add_argument("--video", help="MP4 of the clip with overlays and its audio (H.264 + AAC)")
            p.add_argument("--sync", help="PNG of the lip-sync gate's score over audio offsets and the mouth against the voice")
            p.add_argument("--frames", type=int, default=8, help="frames in the strip (default 8)")
            p.add_argument("--dpi", type=int, default=80, help="contact sheet resolution (default 80: 1280 px wide)")
            p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="check every sample; non-zero exit on any failure")
    p.add_argument("shards", nargs="+", help=shards_help)
    p.add_argument("--jobs", "-j", type=int, default=1, help="processes (one shard each)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every mp4 frame (much faster)")
    p.add_argument("-v", "--verbose", action="store_true", help="per-shard timing")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sample", help="copy a random subset out as plain files DIR/<key>/<member>")
    p.add_argument("shards", nargs="+", help=shards_help)
    p.add_argument("-n", type=int, default=20, help="samples (default 20)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, KeyError, IndexError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"emo-shards {args.command}: {msg}", file=sys.stderr)
        return 2
    except (EOFError, OSError, tarfile.TarError) as exc:  # e.g. show/render on a truncated shard
        print(f"emo-shards {args.command}: {type(exc).__name__}: {exc} (run `emo-shards validate`)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
