"""Draw one sample for a person: contact sheet PNG and an overlay video with its audio."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .. import shards as schema

MASK_RGB = (0, 220, 90)
BOX_RGB = (255, 210, 0)
LMK_RGB = (255, 40, 40)


def decode_for_render(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode the members a rendering needs (never unpickles; missing members become None)."""
    for name in raw:
        if not name.startswith("__") and name.endswith(schema.UNSAFE_EXTENSIONS):
            raise ValueError(f"refusing pickle-like member {name}")
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}

    def npy(name):
        return schema.load_npy(raw[name]) if name in raw else None

    wav, rate = (schema.load_wav(raw["wav"]) if "wav" in raw else (None, schema.SAMPLE_RATE))
    return {
        "key": raw.get("__key__", meta.get("key", "?")),
        "meta": meta,
        "frames": schema.decode_mp4(raw["mp4"]) if "mp4" in raw else None,
        "mask": schema.load_png(raw["face_mask.png"]) if "face_mask.png" in raw else None,
        "boxes": npy("face_boxes.npy"),
        "landmarks": npy("landmarks.npy"),
        "pose": npy("head_pose.npy"),
        "pose_raw": npy("head_pose_raw.npy"),
        "speed": npy("head_speed.npy"),
        "buckets": npy("speed_buckets.npy"),
        "audio_emb": npy("audio_emb.npy"),
        "wav": wav,
        "sample_rate": rate,
    }


def overlay(frame: np.ndarray, t: int, d: dict[str, Any], label: bool = True) -> np.ndarray:
    """Frame ``t`` with the face-union mask (tint + outline), face box and landmarks drawn on."""
    import cv2

    img = frame.copy()
    h, w = img.shape[:2]
    scale = max(1, int(round(w / 256)))
    mask = d.get("mask")
    if mask is not None and mask.shape[:2] == (h, w):
        m = (mask > 127) if mask.ndim == 2 else (mask[..., 0] > 127)
        tint = np.array(MASK_RGB, np.float32)
        img[m] = (0.72 * img[m] + 0.28 * tint).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, MASK_RGB, scale)
    boxes = d.get("boxes")
    if boxes is not None and t < len(boxes):
        x0, y0, x1, y1 = [int(round(v)) for v in boxes[t]]
        cv2.rectangle(img, (x0, y0), (x1, y1), BOX_RGB, scale + 1)
    lm = d.get("landmarks")
    if lm is not None and t < len(lm):
        for x, y in lm[t]:
            cv2.circle(img, (int(round(x)), int(round(y))), scale + 1, LMK_RGB, -1, lineType=cv2.LINE_AA)
    if label:
        fps = float(d["meta"].get("fps") or 25.0)
        text = f"{t}  {t / fps:.2f}s"
        speed = d.get("speed")
        if speed is not None and t < len(speed):
            text += f"  {float(speed[t]):.2f} deg/f"
        cv2.putText(img, text, (6 * scale, 18 * scale), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), 3 * scale, cv2.LINE_AA)
        cv2.putText(img, text, (6 * scale, 18 * scale), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (255, 255, 255), scale, cv2.LINE_AA)
    return img


def contact_sheet(d: dict[str, Any], out_png: str, n_frames: int = 8, shard: str = "", dpi: int = 80) -> str:
    """Frame strip with overlays over speed / buckets / waveform / audio features on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    meta = d["meta"]
    frames = d["frames"]
    fps = float(meta.get("fps") or 25.0)
    T = int(meta.get("num_frames") or (len(frames) if frames is not None else 0))
    dur = T / fps
    picks = np.unique(np.linspace(0, max(T - 1, 0), num=min(n_frames, max(T, 1))).round().astype(int))
    picks = [int(p) for p in picks if frames is not None and p < len(frames)]

    has_emb = d.get("audio_emb") is not None
    fig = plt.figure(figsize=(16, 12), dpi=dpi)
    gs = GridSpec(6, max(len(picks), 1), figure=fig, height_ratios=[1.75, 1.15, 1.15, 0.9, 1.25, 0.12], hspace=0.5, wspace=0.04,
                  top=0.9, bottom=0.04, left=0.07, right=0.93)
    title = f"{d['key']}  ({T} frames, {fps:g} fps, {dur:.2f} s"
    for k in ("kind", "language", "identity", "split"):
        if meta.get(k) is not None:
            title += f", {k} {meta[k]}"
    title += ")"
    fig.suptitle(title + (f"\n{shard}" if shard else ""), fontsize=13, fontweight="bold")

    for i, t in enumerate(picks):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(overlay(frames[t], t, d, label=False))
        ax.set_title(f"frame {t}\nt = {t / fps:.2f} s", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if not picks:
        ax = fig.add_subplot(gs[0, :])
        ax.text(0.5, 0.5, "no frames", ha="center", va="center")
        ax.axis("off")

    axes = [fig.add_subplot(gs[r, :]) for r in range(1, 5)]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    times = np.arange(T) / fps + 0.5 / fps  # frame centres

    # head speed with bucket centres
    ax = axes[0]
    centers = list((meta.get("speed_buckets") or {}).get("centers") or [])
    speed = d.get("speed")
    raw_speed = None
    if d.get("pose_raw") is not None and len(d["pose_raw"]) > 1:
        from ..pose import rotation_speed

        raw_speed = rotation_speed(d["pose_raw"])
        ax.plot(times[: len(raw_speed)], raw_speed, color="#999999", lw=0.9,
                label="per-frame pose (head_pose_raw.npy), unsmoothed")
    if speed is not None:
        ax.plot(times[: len(speed)], speed, color="#c44e52", lw=1.8, label="head speed w_f (smoothed, stored)")
        # the raw curve can spike: scale to the stored speed, let raw peaks leave the panel
        top = max(float(np.max(speed)) * 1.15, float(np.percentile(raw_speed, 90)) * 1.1 if raw_speed is not None else 0.0, 0.05)
        last_label = -np.inf
        for c in centers:
            if c <= top:
                ax.axhline(c, color="#777", lw=0.7, ls=":")
                if c - last_label >= 0.07 * top:  # no overlapping labels
                    ax.text(dur, c, f" c={c:g}", va="center", ha="left", fontsize=8, color="#555")
                    last_label = c
        ax.set_ylim(0, top)
        ax.legend(loc="upper left", fontsize=9)
    ax.set_ylabel("deg / frame")
    ax.set_title("Head rotation speed, smoothed (stored) and from the per-frame pose (dotted: speed-bucket centres c_i)",
                 fontsize=11, loc="left")

    # bucket encoding heat-map
    ax = axes[1]
    buckets = d.get("buckets")
    if buckets is not None and buckets.ndim == 2:
        im = ax.imshow(buckets.T, aspect="auto", origin="lower", cmap="coolwarm", vmin=-1, vmax=1,
                       extent=(0, len(buckets) / fps, -0.5, buckets.shape[1] - 0.5), interpolation="nearest")
        labels = [f"{c:g}" for c in centers] if len(centers) == buckets.shape[1] else [str(i) for i in range(buckets.shape[1])]
        ax.set_yticks(range(buckets.shape[1]), labels, fontsize=7)
        cb = fig.colorbar(im, ax=ax, pad=0.005, fraction=0.02)
        cb.set_label("s_i", fontsize=9)
    ax.set_ylabel("bucket c_i\n(deg/frame)")
    ax.set_title("Speed-bucket encoding s_i = tanh((w_f - c_i) / r_i * 3)", fontsize=11, loc="left")

    # waveform
    ax = axes[2]
    wav = d.get("wav")
    if wav is not None and len(wav):
        rate = d.get("sample_rate") or schema.SAMPLE_RATE
        step = max(1, len(wav) // 8000)
        tw = np.arange(0, len(wav), step) / rate
        ax.plot(tw, wav[::step], color="#4c72b0", lw=0.5)
        peak = float(np.max(np.abs(wav))) or 1.0
        ax.set_ylim(-peak * 1.05, peak * 1.05)
    ax.set_ylabel("amplitude")
    ax.set_title(f"Waveform ({d.get('sample_rate')} Hz)", fontsize=11, loc="left")

    # audio features
    ax = axes[3]
    emb = d.get("audio_emb")
    if has_emb and emb.ndim == 3:
        L, D = emb.shape[1], emb.shape[2]
        flat = emb.astype(np.float32).reshape(len(emb), L * D)
        lo, hi = np.percentile(flat, [2, 98])
        im = ax.imshow(flat.T, aspect="auto", origin="lower", cmap="magma", vmin=lo, vmax=hi,
                       extent=(0, len(emb) / fps, 0, L * D), interpolation="nearest")
        for layer in range(1, L):
            ax.axhline(layer * D, color="w", lw=0.6)
        ax.set_yticks([(layer + 0.5) * D for layer in range(L)], [f"L{layer}" for layer in range(L)], fontsize=7 if L < 16 else 5)
        cb = fig.colorbar(im, ax=ax, pad=0.005, fraction=0.02)
        cb.set_label("activation", fontsize=9)
        enc = (meta.get("audio_emb") or {}).get("encoder", "?")
        ax.set_title(f"Audio features {tuple(emb.shape)} [T, L, D] from {enc} (rows: layer x dim)", fontsize=11, loc="left")
        ax.set_ylabel("layer")
    else:
        ax.text(0.5, 0.5, "no audio features", ha="center", va="center", fontsize=14, color="#666", transform=ax.transAxes)
        ax.set_yticks([])
        ax.set_title("Audio features", fontsize=11, loc="left")
    ax.set_xlabel("time (s)")
    for a in axes:
        a.set_xlim(0, dur if dur > 0 else 1)
        for t in picks:
            a.axvline(t / fps + 0.5 / fps, color="k", lw=0.6, alpha=0.35)
        a.grid(alpha=0.2)
    for a in axes[:-1]:
        plt.setp(a.get_xticklabels(), visible=False)
    # keep the colour-bar-less panels as wide as the others
    fig.canvas.draw()
    ref = axes[1].get_position() if buckets is not None else axes[0].get_position()
    for a in axes:
        pos = a.get_position()
        a.set_position([pos.x0, pos.y0, ref.width, pos.height])
    legend = fig.add_subplot(gs[5, :])
    legend.axis("off")
    legend.text(0.0, 0.5, "Overlays:  green tint/outline = face-union mask   yellow = per-frame face box   "
                "red dots = landmarks   |   grey vertical lines = the frames shown above", fontsize=10, va="center")
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def overlay_video(d: dict[str, Any], out_mp4: str, crf: int = 20) -> str:
    """The clip with overlays drawn on every frame, its wav muxed in as AAC."""
    from emo_data.shards import write_mp4

    meta = d["meta"]
    wav = d.get("wav")
    write_mp4(
        out_mp4,
        (overlay(frame, t, d) for t, frame in enumerate(d["frames"])),
        fps=float(meta.get("fps") or 25.0),
        audio=wav if wav is not None and len(wav) else None,
        sample_rate=int(d.get("sample_rate") or schema.SAMPLE_RATE),
        crf=crf,
    )
    return out_mp4
