"""Validation videos during training: held-out samples through ``EMOPipeline``, mp4s + a contact sheet.

For each of a few test-split samples (the same ones every time, see
:func:`emo_model.train_data.load_validation_samples`): its first frame is the reference image, its
audio drives a short clip, its face-union mask is the face region and its mean head speed the
target speed; the same seed every time, so successive validations differ only by the weights.
Written to ``<out>/validation/step-<step>/``: ``<key>.mp4`` (generated frames + the sample's audio)
and ``contact_sheet.png`` (per sample: ground truth row with the reference first, generated row
with the face mask first, the same frame indices).
"""
from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)


def make_pipeline(emo, vae, audio_encoder, feature_extractor, scheduler_config: dict):
    from diffusers import DDIMScheduler

    from .pipeline import EMOPipeline

    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = EMOPipeline(vae=vae, emo=emo, audio_encoder=audio_encoder, feature_extractor=feature_extractor, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def contact_sheet(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]], columns: int = 6,
                  min_cell: int = 128) -> np.ndarray:
    """``rows``: (label, reference [S,S,3], mask [S,S], ground truth [F,S,S,3], generated [F,S,S,3]).

    Two image rows per sample: reference + ground-truth frames, mask-on-reference + generated
    frames at the same indices; cells upscaled (nearest) to at least ``min_cell`` pixels."""
    from PIL import Image, ImageDraw

    cells = []
    for label, ref, mask, gt, gen in rows:
        n = min(len(gt), len(gen))
        idx = np.unique(np.linspace(0, n - 1, min(columns, n)).round().astype(int))
        overlay = ref.astype(np.float32)
        overlay[mask > 127] = overlay[mask > 127] * 0.6 + np.array([255, 0, 0], np.float32) * 0.4
        cells.append((f"{label} ground truth (frames {', '.join(map(str, idx))})", [ref] + [gt[i] for i in idx]))
        cells.append((f"{label} generated", [overlay.astype(np.uint8)] + [gen[i] for i in idx]))
    size = max(min_cell, max(c[1][0].shape[0] for c in cells))
    ncol = max(len(c[1]) for c in cells)
    label_h = 14
    sheet = Image.new("RGB", (ncol * size, len(cells) * (size + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(cells):
        y = r * (size + label_h)
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        for c, img in enumerate(images):
            tile = Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (c * size, y + label_h))
    return np.asarray(sheet)


@torch.no_grad()
def run_validation(pipe, samples: list[dict], out_dir: str, *, num_frames: int, num_inference_steps: int,
                   guidance_scale: float, seed: int, autocast=None) -> dict:
    """Generate, write mp4s + ``contact_sheet.png`` into ``out_dir``; returns their paths and the sheet."""
    from PIL import Image

    from .media import SAMPLE_RATE, write_mp4

    os.makedirs(out_dir, exist_ok=True)
    rows, videos = [], []
    for sample in samples:
        generator = torch.Generator("cpu").manual_seed(seed)
        with autocast() if autocast is not None else contextlib.nullcontext():
            result = pipe(
                sample["reference"], sample["audio"], num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, speed=sample["speed"], face_mask=sample["mask"],
                face_box=tuple(float(v) for v in sample["face_box"]), crop="center", fps=sample["fps"],
                generator=generator, max_frames=min(num_frames, len(sample["frames"])), progress=False,
            )
        path = os.path.join(out_dir, f"{sample['key']}.mp4")
        n = len(result.frames)
        write_mp4(path, result.frames, fps=sample["fps"], audio=sample["audio"][: int(round(n / sample["fps"] * SAMPLE_RATE))])
        videos.append(path)
        rows.append((sample["key"], sample["reference"], sample["mask"], sample["frames"], result.frames))
    sheet = contact_sheet(rows)
    sheet_path = os.path.join(out_dir, "contact_sheet.png")
    Image.fromarray(sheet).save(sheet_path)
    return {"videos": videos, "contact_sheet": sheet_path, "sheet": sheet}


def log_sheet(accelerator, sheet: np.ndarray, step: int) -> None:
    """Send the contact sheet to trackers that take images (TensorBoard, wandb)."""
    for tracker in getattr(accelerator, "trackers", []):
        try:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/contact_sheet", sheet, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/contact_sheet": wandb.Image(sheet)}, step=step)
        except Exception as exc:  # noqa: BLE001 - a tracker failing must not stop training
            logger.warning("could not log the contact sheet to %s: %s", tracker.name, exc)


__all__ = ["make_pipeline", "run_validation", "contact_sheet", "log_sheet"]
