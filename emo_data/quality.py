"""Per-clip image quality of the face crop: sharpness and exposure, offline, in a few milliseconds.

A talking-head model learns the texture it is shown: blurry, upscaled or badly exposed faces
teach it blur and clipped skin. Like LatentSync (which keeps segments whose HyperIQA score on the
first, middle and last frame is high enough), the clip is judged on a few frames:
:func:`pick_frames` says which; :class:`FaceQualityScorer` scores the face box in each and stores
the mean over them, plus the worst frame's combined score.

Scores (all stored; ``[0,1]`` ones are higher = better unless said otherwise):

=====================  ======  =============================================================
name                   range   meaning
=====================  ======  =============================================================
``sharpness``          [0,1]   ``lapvar / (lapvar + 50)``: on the faces of the shared samples lapvar
                               runs from 7 (a soft 844-px source) to 185 (HDTF), median 44, so
                               about 0.5 is typical; a 1-pixel Gaussian blur roughly halves it
``sharpness_lapvar``   luma²   variance of the 4-neighbour Laplacian of the face's luma (0..255)
                               with the face box resized to a 256 x 256 canonical face, so a small
                               face upscaled into the crop and a large one are compared at the same
                               scale; depends on contrast too (a darker face scores lower)
``blur_effect``        [0,1]   Crete-Roffet et al. 2007 no-reference blur (as
                               ``skimage.measure.blur_effect``, box re-blur of 11 px) on the same
                               canonical face: 0 = sharp, 1 = blurry; independent of gain
``brightness``         [0,1]   mean luma / 255 of the face box
``contrast``           [0,0.5] standard deviation of the luma / 255
``dark_clipped``       [0,1]   fraction of face pixels with luma <= 10 (crushed shadows)
``bright_clipped``     [0,1]   fraction of face pixels with luma >= 245 (blown highlights)
``exposure``           [0,1]   ``(1 - dark_clipped - bright_clipped) * min(1, brightness / 0.25,
                               (1 - brightness) / 0.25)``: 1 for mid-tone faces without clipping
``noise_sigma``        luma    Immerkaer 1996 fast noise estimate (std of white noise, 0..255
                               units) at the face's own resolution: 0.3..1.6 on the samples,
                               5.4 after adding Gaussian noise of std 8
``face_quality``       [0,1]   ``sharpness * exposure``
``face_quality_min``   [0,1]   the lowest ``face_quality`` of the frames scored
``quality_frames``     count   frames that had a usable face box
=====================  ======  =============================================================

Frames are 8-bit RGB (the 512 x 512 crop); face boxes are ``(x0, y0, x1, y1)`` in the same
pixels. Luma is BT.601 (OpenCV's RGB2GRAY). Nothing here is learned.

Optional learned score: :class:`MusiqFaceScorer` runs MUSIQ (Ke et al. 2021) through pyiqa's
architecture class on the same face boxes, with weights from a local file, and stores
``iqa_musiq`` (mean over the frames; KonIQ-10k weights give a mean opinion score of about
0..100) and ``iqa_musiq_min``. pyiqa is not a dependency: ``pip install pyiqa`` pulls
``opencv-python-headless`` (unpinned, 5.x, which replaces this project's ``cv2`` 4.x), bitsandbytes,
timm, datasets and developer tools, and its own loaders download weights and unpickle with
``weights_only=False``; this module only uses its MUSIQ class and loads the state dict itself
(``torch.load(weights_only=True)`` or safetensors). HyperIQA is not offered: pyiqa's ``HyperNet``
downloads an ImageNet ResNet-50 from the hub whenever it is constructed, so it cannot be built
offline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .config import QualityConfig  # noqa: F401 - re-exported
from .stage import StageError

CANONICAL_FACE_PX = 256        # faces are compared at this size (the face in a 512 crop is ~280 px)
SHARPNESS_HALF_LAPVAR = 50.0   # lapvar that maps to sharpness 0.5 (the samples' faces: median 44)
DARK_LUMA, BRIGHT_LUMA = 10, 245
MID_TONE_MARGIN = 0.25         # exposure falls linearly when mean luma is within this of black or white
MIN_FACE_PX = 16               # boxes smaller than this (after clipping to the frame) are skipped
BLUR_EFFECT_WINDOW = 11

SCORE_NAMES = ("sharpness", "sharpness_lapvar", "blur_effect", "brightness", "contrast", "dark_clipped",
               "bright_clipped", "exposure", "noise_sigma", "face_quality")


MUSIQ_WEIGHTS_HELP = (
    "MUSIQ needs weights on local disk: pyiqa's KonIQ-10k checkpoint "
    "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/musiq_koniq_ckpt-e95806b9.pth "
    "(a plain state dict). Point QualityConfig.iqa_weights at the file."
)


class QualityWeightsError(ValueError):
    """The learned IQA model cannot be loaded (package missing, file missing or unsafe)."""


def pick_frames(num_frames: int, count: int = 3) -> list[int]:
    """Indices of the frames to score: evenly spread from first to last (first, middle, last
    for ``count=3``), without repeats for short clips."""
    if num_frames <= 0:
        return []
    if count <= 1:
        return [(num_frames - 1) // 2]
    picks = np.linspace(0, num_frames - 1, count).round().astype(int)
    return sorted({int(i) for i in picks})


class FaceQualityScorer:
    """Offline face image quality. ``setup()`` once per worker; ``score()`` per clip."""

    name = "face_quality_offline"

    def __init__(self, config: Optional[QualityConfig] = None):
        self.config = config or QualityConfig()
        self._noise_kernel: Optional[np.ndarray] = None

    def setup(self) -> None:
        # Nothing to load; kept so the executors treat every scorer alike.
        self._noise_kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)

    def pick_frames(self, num_frames: int) -> list[int]:
        return pick_frames(num_frames, int(self.config.frames))

    def score(self, frames: Sequence[np.ndarray], face_boxes: np.ndarray,
              frame_indices: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Scores of one clip.

        ``frames``: the frames to score (usually those of :meth:`pick_frames`), H x W x 3 uint8 RGB.
        ``face_boxes``: one box per frame in ``frames``, or, with ``frame_indices``, the whole
        clip's ``[T, 4]`` boxes and the index of each given frame in the clip.
        Raises :class:`StageError` ``no_face_quality`` when no frame has a usable face box.
        """
        if self._noise_kernel is None:
            self.setup()
        boxes = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
        if frame_indices is not None:
            boxes = boxes[np.asarray(list(frame_indices), dtype=int)]
        if len(boxes) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(boxes)} face boxes")
        per_frame = [s for s in (self._score_frame(f, b) for f, b in zip(frames, boxes)) if s is not None]
        if not per_frame:
            raise StageError("no_face_quality", "no scored frame had a usable face box")
        out = {name: round(float(np.mean([s[name] for s in per_frame])), 6) for name in SCORE_NAMES}
        out["face_quality_min"] = round(float(min(s["face_quality"] for s in per_frame)), 6)
        out["quality_frames"] = float(len(per_frame))
        return out

    def passes(self, scores: dict[str, float]) -> bool:
        """The optional gate: True when no threshold is set or the clip meets it."""
        limit = self.config.min_face_quality
        return limit is None or scores["face_quality"] >= limit

    # ------------------------------------------------------------------------------------------
    def _score_frame(self, frame: np.ndarray, box: np.ndarray) -> Optional[dict[str, float]]:
        import cv2

        image = np.asarray(frame)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"frames must be H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        face = _face_region(image, box)   # None: not tracked in this frame, or too small
        if face is None:
            return None
        luma = cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_RGB2GRAY)

        brightness = float(luma.mean()) / 255.0
        contrast = float(luma.std()) / 255.0
        dark = float(np.count_nonzero(luma <= DARK_LUMA)) / luma.size
        bright = float(np.count_nonzero(luma >= BRIGHT_LUMA)) / luma.size
        mid_tone = min(1.0, brightness / MID_TONE_MARGIN, (1.0 - brightness) / MID_TONE_MARGIN)
        exposure = max(0.0, 1.0 - dark - bright) * max(0.0, mid_tone)

        # Noise at the face's own resolution: resizing would average it away.
        residual = cv2.filter2D(luma.astype(np.float32), -1, self._noise_kernel, borderType=cv2.BORDER_REFLECT)
        noise_sigma = float(np.sqrt(np.pi / 2.0) / 6.0 * np.abs(residual[1:-1, 1:-1]).mean())

        side = CANONICAL_FACE_PX
        interp = cv2.INTER_AREA if max(luma.shape) > side else cv2.INTER_LINEAR
        canonical = cv2.resize(luma, (side, side), interpolation=interp).astype(np.float32)
        lapvar = float(cv2.Laplacian(canonical, cv2.CV_32F, ksize=1).var())
        sharpness = lapvar / (lapvar + SHARPNESS_HALF_LAPVAR)

        return {"sharpness": sharpness, "sharpness_lapvar": lapvar, "blur_effect": _blur_effect(canonical),
                "brightness": brightness, "contrast": contrast, "dark_clipped": dark, "bright_clipped": bright,
                "exposure": exposure, "noise_sigma": noise_sigma, "face_quality": sharpness * exposure}


def _blur_effect(luma: np.ndarray, window: int = BLUR_EFFECT_WINDOW) -> float:
    """Crete-Roffet et al. 2007: how little an extra box blur changes the image's neighbour
    differences, per axis, worst axis: 0 for a sharp image, 1 for a blurry one."""
    import cv2

    margin = window // 2
    worst = 0.0
    for axis, ksize in ((0, (1, window)), (1, (window, 1))):
        reblurred = cv2.blur(luma, ksize, borderType=cv2.BORDER_REFLECT)
        diff = np.abs(np.diff(luma, axis=axis))[margin:-margin, margin:-margin]
        diff_blur = np.abs(np.diff(reblurred, axis=axis))[margin:-margin, margin:-margin]
        total = float(diff.sum())
        if total <= 0.0:
            return 1.0   # a flat patch: no detail at all
        lost = float(np.maximum(0.0, diff - diff_blur).sum())
        worst = max(worst, (total - lost) / total)
    return worst


# ---------------------------------------------------------------------------------------------
# Optional learned score: MUSIQ through pyiqa's architecture, weights loaded here
# ---------------------------------------------------------------------------------------------


def make_learned_iqa(config: QualityConfig) -> Optional["MusiqFaceScorer"]:
    """The learned scorer ``config`` asks for, or None. Call ``setup()`` once per worker."""
    if config.iqa_backend is None:
        return None
    return MusiqFaceScorer(str(config.iqa_weights), device=config.iqa_device, frames=int(config.frames))


class MusiqFaceScorer:
    """MUSIQ on the face box of a few frames; same ``pick_frames`` / ``score`` contract as
    :class:`FaceQualityScorer`. Scores: ``iqa_musiq`` (mean over frames), ``iqa_musiq_min``."""

    name = "face_quality_musiq"

    def __init__(self, weights: str, device: str = "cpu", frames: int = 3):
        self.weights = weights
        self.device = device
        self.frames = frames
        self._model = None

    def pick_frames(self, num_frames: int) -> list[int]:
        return pick_frames(num_frames, self.frames)

    def setup(self) -> None:
        if self._model is not None:
            return
        import os

        if not os.path.isfile(self.weights):
            raise QualityWeightsError(f"{self.weights}: no such file. " + MUSIQ_WEIGHTS_HELP)
        try:
            from pyiqa.archs.musiq_arch import MUSIQ
        except ImportError as exc:
            raise QualityWeightsError(
                "the 'musiq' image-quality backend needs pyiqa's MUSIQ architecture: pip install pyiqa "
                "'opencv-python-headless<5' (pyiqa pulls opencv-python-headless, whose 5.x would replace "
                f"this project's cv2 4.x) ({exc})") from exc
        state = load_state_dict_safely(self.weights)
        # A softmax head over 10 bins (AVA weights) or a single score (KonIQ, SPAQ, PaQ-2-PiQ).
        head = state.get("head.0.weight", state.get("head.weight"))
        num_class = int(head.shape[0]) if head is not None else 1
        model = MUSIQ(pretrained=False, num_class=num_class)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise QualityWeightsError(f"{self.weights}: not a MUSIQ state dict ({exc})") from exc
        import torch

        self._torch = torch
        self._model = model.to(torch.device(self.device)).eval()

    def score(self, frames: Sequence[np.ndarray], face_boxes: np.ndarray,
              frame_indices: Optional[Sequence[int]] = None) -> dict[str, float]:
        self.setup()
        torch = self._torch
        boxes = np.asarray(face_boxes, dtype=np.float64).reshape(-1, 4)
        if frame_indices is not None:
            boxes = boxes[np.asarray(list(frame_indices), dtype=int)]
        if len(boxes) != len(frames):
            raise ValueError(f"{len(frames)} frames but {len(boxes)} face boxes")
        values = []
        for frame, box in zip(frames, boxes):
            face = _face_region(np.asarray(frame), box)
            if face is None:
                continue
            x = torch.from_numpy(np.ascontiguousarray(face)).permute(2, 0, 1)[None].float().div(255.0)
            with torch.inference_mode():
                values.append(float(self._model(x.to(self._model.conv_root.weight.device)).reshape(-1)[0]))
        if not values:
            raise StageError("no_face_quality", "no scored frame had a usable face box")
        return {"iqa_musiq": round(float(np.mean(values)), 6), "iqa_musiq_min": round(float(min(values)), 6)}


def _face_region(image: np.ndarray, box: np.ndarray) -> Optional[np.ndarray]:
    if not np.all(np.isfinite(box)):
        return None
    h, w = image.shape[:2]
    x0, y0 = int(np.floor(max(box[0], 0))), int(np.floor(max(box[1], 0)))
    x1, y1 = int(np.ceil(min(box[2], w))), int(np.ceil(min(box[3], h)))
    if x1 - x0 < MIN_FACE_PX or y1 - y0 < MIN_FACE_PX:
        return None
    return image[y0:y1, x0:x1]


def load_state_dict_safely(path: str) -> dict:
    """A flat ``name -> tensor`` dict from ``.safetensors`` or a torch file, never running code
    from the file (``weights_only=True``: only tensors and plain containers unpickle)."""
    import pickle

    import torch

    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise QualityWeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise QualityWeightsError(f"refusing to load {path}: it holds objects other than tensors, which "
                                      f"could run code when loaded ({exc})") from exc
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise QualityWeightsError(f"{path}: not a readable torch file ({exc})") from exc
    for key in ("params", "state_dict", "model"):   # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QualityWeightsError(f"{path}: not a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
