"""Audio / image input and mp4 output (PyAV: libx264 + AAC; no system FFmpeg needed)."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from emo_data.shards.codecs import write_mp4  # noqa: F401 - re-exported: the pipeline writes its mp4 with it
from emo_data.shards.contract import CROP_SCALE, SAMPLE_RATE

logger = logging.getLogger(__name__)


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio (or video-with-audio) file -> float32 mono samples at ``sample_rate``."""
    import av

    chunks = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        raise ValueError(f"{path}: audio stream decodes to nothing")
    return np.concatenate(chunks).astype(np.float32)


def load_image(image) -> np.ndarray:
    """Path / PIL image / array -> uint8 RGB ``[H, W, 3]``."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])
    if not isinstance(image, Image.Image):
        image = Image.open(str(image))
    return np.asarray(image.convert("RGB"))


def square_crop_box(shape: Sequence[int], face_box=None, scale: float = CROP_SCALE) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop: centred on ``face_box`` with side ``scale`` x its long
    side (the shard contract's ``CROP_SCALE``, the data side's crop), else the centred largest square; clipped to the image."""
    h, w = shape[:2]
    if face_box is None:
        side = min(h, w)
        return (w - side) // 2, (h - side) // 2, side
    x0, y0, x1, y1 = [float(v) for v in face_box]
    side = int(round(min(max(x1 - x0, y1 - y0) * scale, h, w)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, side


def crop_resize(image: np.ndarray, crop: tuple[int, int, int], size: int) -> np.ndarray:
    from PIL import Image

    x0, y0, side = crop
    patch = image[y0 : y0 + side, x0 : x0 + side]
    if patch.shape[0] != size:
        patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))
    return np.ascontiguousarray(patch)


def detect_face_box(image: np.ndarray) -> tuple[Optional[np.ndarray], str]:
    """Largest face box (x0, y0, x1, y1) in pixels via the data side's backend (imported lazily).

    Returns ``(box or None, how)``; ``how`` says which backend answered or why none did.
    """
    try:
        from emo_data.config import FaceConfig
        from emo_data.faces import make_face_backend
    except Exception as exc:  # the data side is optional for sampling
        return None, f"face backend not importable ({type(exc).__name__}: {exc})"
    try:
        cfg = FaceConfig()
        backend = make_face_backend(cfg)
        faces = backend.detect(np.ascontiguousarray(image))
    except Exception as exc:
        return None, f"face backend failed ({type(exc).__name__}: {exc})"
    if not faces:
        return None, f"no face found by {cfg.backend}"
    best = max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    return np.asarray(best.box, dtype=np.float32), f"detected ({cfg.backend})"


