"""Compare two corpora built from the same sources: did a code change keep every sample the same?

    python bench/contract_parity.py BEFORE_DIR AFTER_DIR [--frames]

Checks, over every shard of both corpus folders (``<split>-NNNNNN.tar``, read from the tars, not
from their indexes):

* the same shards and the same sample keys in the same order;
* the same manifest rows (``manifest.parquet``; timing columns excluded, none exist today);
* every member other than ``json`` byte-identical (SHA-256); an ``mp4`` that differs is decoded
  and its frame count, size and pixel difference reported (``--frames``: for every differing mp4);
* every ``json`` equal once the build-config storage is normalised: the config a sample carries
  inline (sample json layout 1) or references (``config_sha256`` -> its shard index's
  ``configs``, layout 2) is resolved on both sides and compared, then dropped with the layout
  keys (``meta_version``, ``config_sha256``, ``config``); the remaining keys must be equal;
* ``build.json``: the same summary and the same config fields (class / version markers aside).

Prints one line per check and every difference; exits 1 when anything but mp4 bytes differs,
2 when only mp4 bytes differ (with their decoded-frame report), 0 when the corpora are the same.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections import Counter
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from emo_data.shards import (  # noqa: E402 - after the path setup above
    SampleMeta,
    config_fields,
    decode_mp4,
    iter_raw_samples,
    read_index,
)

SHARD_RE = re.compile(r"^[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*-\d{6}\.tar$")
TIMING_COLUMNS = ("wall_s", "elapsed_s", "processed_s", "seconds_taken")
LAYOUT_KEYS = ("meta_version", "config_sha256", "config")
VOLATILE_BUILD_KEYS = ("finalize_digest", "config", "config_sha256", "executor")


def shards_of(corpus: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(glob.escape(corpus), "*.tar")) if SHARD_RE.match(os.path.basename(p)))


def sample_config(meta: dict[str, Any], index: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The config fields a sample was built with, however it stores them."""
    stored = SampleMeta.from_dict(meta).build_config(index)
    return None if stored is None else config_fields(stored)


def load_corpus(corpus: str) -> dict[str, Any]:
    """shard name -> [(key, {member: bytes})], the indexes, the manifest and build.json."""
    shards: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
    indexes: dict[str, Optional[dict[str, Any]]] = {}
    for path in shards_of(corpus):
        name = os.path.basename(path)
        shards[name] = [(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
                        for raw in iter_raw_samples(path)]
        indexes[name] = read_index(path)
    manifest = None
    if os.path.exists(os.path.join(corpus, "manifest.parquet")):
        import pandas as pd

        manifest = pd.read_parquet(os.path.join(corpus, "manifest.parquet"))
    build = {}
    if os.path.exists(os.path.join(corpus, "build.json")):
        with open(os.path.join(corpus, "build.json")) as fh:
            build = json.load(fh)
    return {"shards": shards, "indexes": indexes, "manifest": manifest, "build": build}


def mp4_report(a: bytes, b: bytes) -> str:
    import numpy as np

    fa, fb = decode_mp4(a), decode_mp4(b)
    if fa.shape != fb.shape:
        return f"decoded {fa.shape} vs {fb.shape}"
    diff = np.abs(fa.astype(np.int16) - fb.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    return (f"{fa.shape[0]} frames {fa.shape[1]}x{fa.shape[2]} both; {len(a):,} -> {len(b):,} bytes "
            f"({100.0 * (len(b) - len(a)) / len(a):+.1f} %); pixels differ by mean {diff.mean():.3f}, max {int(diff.max())}; "
            f"PSNR {psnr:.1f} dB between the two encodes")


def compare(before: str, after: str, all_frames: bool) -> int:
    A, B = load_corpus(before), load_corpus(after)
    problems: list[str] = []
    mp4_diffs: list[tuple[str, bytes, bytes]] = []
    member_counts: Counter = Counter()

    names_a, names_b = list(A["shards"]), list(B["shards"])
    print(f"shards       {len(names_a)} vs {len(names_b)}: {'same names' if names_a == names_b else 'DIFFERENT'}")
    if names_a != names_b:
        problems.append(f"shards differ: {names_a} vs {names_b}")
    keys_a = [(s, k) for s in names_a for k, _ in A["shards"][s]]
    keys_b = [(s, k) for s in names_b for k, _ in B["shards"][s]]
    print(f"samples      {len(keys_a)} vs {len(keys_b)}: {'same keys, same shards, same order' if keys_a == keys_b else 'DIFFERENT'}")
    if keys_a != keys_b:
        problems.append(f"keys differ: only before {sorted(set(keys_a) - set(keys_b))}, only after {sorted(set(keys_b) - set(keys_a))}")

    json_equal = 0
    config_equal = 0
    for shard in names_a:
        if shard not in B["shards"]:
            continue
        b_samples = dict(B["shards"][shard])
        for key, ma in A["shards"][shard]:
            mb = b_samples.get(key)
            if mb is None:
                continue
            if sorted(ma) != sorted(mb):
                problems.append(f"{shard}:{key}: members {sorted(ma)} vs {sorted(mb)}")
            for member in sorted(set(ma) & set(mb)):
                if member == "json":
                    continue
                same = hashlib.sha256(ma[member]).digest() == hashlib.sha256(mb[member]).digest()
                member_counts[(member, same)] += 1
                if not same:
                    if member == "mp4":
                        mp4_diffs.append((f"{shard}:{key}", ma[member], mb[member]))
                    else:
                        problems.append(f"{shard}:{key}: {member} bytes differ")
            ja, jb = json.loads(ma["json"]), json.loads(mb["json"])
            ca, cb = sample_config(ja, A["indexes"][shard]), sample_config(jb, B["indexes"][shard])
            if ca == cb and ca is not None:
                config_equal += 1
            else:
                problems.append(f"{shard}:{key}: build config differs or is missing (before {ca is not None}, after {cb is not None})")
            ra = {k: v for k, v in ja.items() if k not in LAYOUT_KEYS}
            rb = {k: v for k, v in jb.items() if k not in LAYOUT_KEYS}
            if ra == rb:
                json_equal += 1
            else:
                changed = sorted(k for k in set(ra) | set(rb) if ra.get(k, "<absent>") != rb.get(k, "<absent>"))
                problems.append(f"{shard}:{key}: json differs in {changed}")
    for member in sorted({m for m, _ in member_counts}):
        same, differ = member_counts[(member, True)], member_counts[(member, False)]
        print(f"member       {member:<18} {same} identical, {differ} differ")
    print(f"json         {json_equal} of {len(keys_a)} equal apart from the config storage "
          f"({', '.join(LAYOUT_KEYS)}); the build config resolves to the same fields for {config_equal}")
    layouts = Counter(json.loads(m["json"]).get("meta_version", 1) for s in names_b for _, m in B["shards"][s])
    inline = sum("config" in json.loads(m["json"]) for s in names_a for _, m in A["shards"][s])
    print(f"layout       before: config inline in {inline} samples; after: meta_version {dict(layouts)}")

    ma_, mb_ = A["manifest"], B["manifest"]
    if ma_ is None or mb_ is None:
        problems.append("a manifest.parquet is missing")
    else:
        drop = [c for c in TIMING_COLUMNS if c in ma_.columns or c in mb_.columns]
        ra_ = ma_.drop(columns=[c for c in drop if c in ma_.columns])
        rb_ = mb_.drop(columns=[c for c in drop if c in mb_.columns])
        same_rows = list(ra_.columns) == list(rb_.columns) and ra_.astype(str).equals(rb_.astype(str))
        print(f"manifest     {len(ra_)} vs {len(rb_)} rows, {len(ra_.columns)} columns"
              f"{' (' + ', '.join(drop) + ' excluded)' if drop else ''}: {'identical' if same_rows else 'DIFFERENT'}")
        if not same_rows:
            problems.append("manifest rows differ")

    ba, bb = A["build"], B["build"]
    summary_same = ba.get("summary") == bb.get("summary") and ba.get("split") == bb.get("split") and ba.get("sources") == bb.get("sources")
    config_same = config_fields(ba.get("config") or {}) == config_fields(bb.get("config") or {})
    print(f"build.json   summary/split {'identical' if summary_same else 'DIFFERENT'}; config fields "
          f"{'identical' if config_same else 'DIFFERENT'} (after: _class {bb.get('config', {}).get('_class')!r}, "
          f"_version {bb.get('config', {}).get('_version')!r}, config_sha256 {str(bb.get('config_sha256'))[:12]}...)")
    if not summary_same:
        problems.append("build.json summary differs")
    if not config_same:
        problems.append("build.json config differs")

    index_a = sum(os.path.getsize(os.path.join(before, n[:-4] + ".index.json")) for n in names_a)
    index_b = sum(os.path.getsize(os.path.join(after, n[:-4] + ".index.json")) for n in names_b)
    tar_a = sum(os.path.getsize(os.path.join(before, n)) for n in names_a)
    tar_b = sum(os.path.getsize(os.path.join(after, n)) for n in names_b)
    print(f"sizes        tars {tar_a:,} -> {tar_b:,} bytes; indexes {index_a:,} -> {index_b:,} bytes")

    for where, a, b in (mp4_diffs if all_frames else mp4_diffs[:2]):
        print(f"mp4 differs  {where}: {mp4_report(a, b)}")
    if len(mp4_diffs) > 2 and not all_frames:
        print(f"mp4 differs  ... and {len(mp4_diffs) - 2} more (--frames reports every one)")
    for p in problems:
        print(f"DIFFERENCE   {p}")
    if problems:
        print("verdict      DIFFERENT")
        return 1
    if mp4_diffs:
        print("verdict      same samples, except mp4 bytes (see above)")
        return 2
    print("verdict      same samples")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--frames", action="store_true", help="decode and report every differing mp4, not only two")
    args = ap.parse_args()
    return compare(args.before, args.after, args.frames)


if __name__ == "__main__":
    sys.exit(main())
