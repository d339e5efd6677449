"""Scene-cut detection on the decoded frames (content difference, as PySceneDetect's ContentDetector).

Works incrementally on the stream: ``update(frame)`` says whether a cut lies between the
previous frame and this one. Frames are compared at ``analysis_size`` in HSV, so the cost per
frame is a resize and a subtraction.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .config import SceneConfig


class SceneCutDetector:
    def __init__(self, config: Optional[SceneConfig] = None):
        self.config = config or SceneConfig()
        self._prev: Optional[np.ndarray] = None
        self._since_cut = 0
        self._recent: list[float] = []
        self.last_score = 0.0

    def reset(self) -> None:
        self._prev = None
        self._since_cut = 0
        self._recent = []

    def _features(self, frame_rgb: np.ndarray) -> np.ndarray:
        import cv2

        size = self.config.analysis_size
        small = frame_rgb
        if small.shape[:2] != (size, size):
            small = cv2.resize(frame_rgb, (size, size), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] *= 255.0 / 180.0  # hue to the same 0..255 range as S and V
        edges = cv2.Canny(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), 100, 200).astype(np.float32)
        return np.concatenate([hsv, edges[..., None]], axis=-1)

    def score(self, a: np.ndarray, b: np.ndarray) -> float:
        # Mean absolute change of hue, saturation, value and edges, in 0..1.
        diff = np.abs(a - b).reshape(-1, 4).mean(axis=0) / 255.0
        return float(0.3 * diff[0] + 0.3 * diff[1] + 0.3 * diff[2] + 0.1 * diff[3])

    def update(self, frame_rgb: np.ndarray) -> bool:
        """``frame_rgb`` at any size; pass it already at ``analysis_size`` squared to skip a resize."""
        feats = self._features(frame_rgb)
        cut = False
        if self._prev is not None:
            self.last_score = self.score(self._prev, feats)
            self._since_cut += 1
            # Absolute threshold, and well above the recent level so that steady camera motion
            # (handheld footage) does not read as a cut.
            recent = float(np.median(self._recent)) if self._recent else 0.0
            if (
                self.last_score > self.config.threshold
                and self.last_score > self.config.adaptive_ratio * recent
                and self._since_cut >= self.config.min_scene_frames
            ):
                cut = True
                self._since_cut = 0
            self._recent = (self._recent + [self.last_score])[-self.config.adaptive_window :]
        self._prev = feats
        return cut
