"""``emo-shards render --sync sync.png``: what the lip-sync gate saw in one clip.

Top: the gate's score at every audio offset it tried (correlation: higher is better; SyncNet
distance: lower is better), the measured offset, what was applied, and the decision. Bottom:
the clip's mouth opening (from its landmarks) against the speech envelope of its stored audio,
i.e. after any correction, so a person can see whether they move together.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def sync_sheet(d: dict[str, Any], out_png: str, dpi: int = 80) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sync.signals import mouth_opening, speech_envelope, supports

    meta = d["meta"]
    gate = meta.get("sync") or {}
    fps = float(meta.get("fps") or 25.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7.5), dpi=dpi, gridspec_kw={"height_ratios": [1, 1.1]})
    fig.suptitle(f"{d['key']}: lip-sync gate", fontsize=13, fontweight="bold")

    offsets, curve = gate.get("offsets") or [], gate.get("curve") or []
    if offsets and curve:
        distance = gate.get("curve_kind") == "distance"
        top.plot(offsets, curve, "o-", color="#4c72b0", ms=3, lw=1.4)
        best = gate.get("offset_frames")
        if best is not None:
            top.axvline(best, color="#c44e52", lw=1.5, label=f"measured offset {best:+d} frames")
        applied = gate.get("applied_offset_frames") or 0
        if applied:
            top.axvline(applied, color="#55a868", lw=1.5, ls="--", label=f"applied {applied:+d}")
        top.axvline(0, color="#888", lw=0.8, ls=":")
        top.legend(loc="upper right", fontsize=9)
        top.set_ylabel("distance (lower = better)" if distance else "correlation (higher = better)")
        conf = gate.get("confidence")
        top.set_title(f"{gate.get('backend')}: confidence {conf if conf is None else round(float(conf), 2)}, "
                      f"decision {gate.get('decision')} ({gate.get('mode')})" + (f": {gate.get('reason')}" if gate.get("reason") else ""),
                      fontsize=10, loc="left")
        top.text(0.0, -0.22, str(gate.get("detail") or ""), transform=top.transAxes, fontsize=8, color="#555")
    else:
        top.text(0.5, 0.5, "this sample was built without the sync gate (--no-sync-gate)" if not gate
                 else "no curve stored", ha="center", va="center", transform=top.transAxes)
    top.set_xlabel("audio offset (frames; > 0: audio late)")
    top.grid(alpha=0.25)

    lms, wav = d.get("landmarks"), d.get("wav")
    fmt = meta.get("landmark_format") or "ibug68"
    if lms is not None and wav is not None and supports(fmt):
        z = lambda x: (x - x.mean()) / (x.std() + 1e-9)  # noqa: E731 - local shorthand
        opening = mouth_opening(lms, fmt)
        env = speech_envelope(wav, int(d.get("sample_rate") or 16000), fps)[: len(opening)]
        t = np.arange(len(opening)) / fps
        bottom.plot(t, z(opening), color="#c44e52", lw=1.3, label="mouth opening (landmarks)")
        bottom.plot(t[: len(env)], z(env), color="#4c72b0", lw=1.0, alpha=0.8, label="speech envelope (stored wav)")
        bottom.legend(loc="upper right", fontsize=9)
    else:
        bottom.text(0.5, 0.5, "no lip landmarks for this landmark format", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("z-score")
    bottom.set_title("Mouth opening against the speech envelope, as stored", fontsize=10, loc="left")
    bottom.grid(alpha=0.25)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png
