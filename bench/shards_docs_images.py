"""Regenerate the pictures in docs/shards.md from a built corpus (palette PNGs, < 300 KB each).

    emo-data build manifests/samples.csv --out /tmp/emo_shards --audio-encoder DIR
    python bench/shards_docs_images.py /tmp/emo_shards [KEY]
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "images")


def _shrink(path: str, colors: int = 256) -> None:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv: list[str]) -> int:
    from emo_data.shards_cli import main as shards

    corpus = argv[0] if argv else "/tmp/emo_shards"
    key = argv[1] if len(argv) > 1 else "sadtalker__WDA_AlexandriaOcasioCortez_000_00000"
    os.makedirs(OUT, exist_ok=True)
    manifest = os.path.join(corpus, "manifest.parquet")
    stats_png = os.path.join(OUT, "shards_stats.png")
    sheet_png = os.path.join(OUT, "shards_render.png")
    argv_stats = ["stats", corpus, "--frames", "--plot", stats_png, "--dpi", "72"]
    if os.path.exists(manifest):
        argv_stats += ["--manifest", manifest]
    shards(argv_stats)
    shards(["render", os.path.join(corpus, "train-000000.tar"), key, "--out", sheet_png, "--dpi", "72"])
    for path in (stats_png, sheet_png):
        _shrink(path)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
