"""Optical-flow-guided stabilisation of a face track's rigid landmarks.

Landmark detectors answer each frame on its own: on a still face dlib's 68 points jitter by
about a pixel, which solvePnP turns into ~0.2 degrees of roll and ~1 degree of yaw and pitch
between frames -- more than the slow head speeds EMO conditions on. Pyramidal Lucas-Kanade
optical flow follows the same points from frame to frame with a small fraction of that jitter,
but it is not right about everything: the nose and eye corners sit on depth edges, their flow
windows mix nose and cheek, and the *relative* motion of the points under a yaw or pitch turn
(the parallax that carries those angles) comes out 10-40 % too small (docs/pose.md). The motion
of the points *together* -- shift, in-plane turn, scale -- it gets right.

So the stabiliser is a complementary filter whose gain depends on what kind of disagreement it
sees. Per frame, with ``flow`` the points carried from the last frame and ``e = detected -
flow`` the innovation, ``e`` is split into its best-fitting similarity (shift + in-plane
rotation + scale about the points' centre) and the rest (the shape change), and::

    p_f = flow + blend * similarity(e) + shape_blend * (e - similarity(e))

A small ``blend`` keeps position, roll and scale as steady as the flow; a larger
``shape_blend`` lets the detector carry yaw and pitch with little lag, at some of its jitter. A
point whose flow fails or lands farther than ``max_disagreement`` eye spans from its detection is
reset to the detection; when most points disagree (a new face, a cut) the track restarts; a
systematic similarity disagreement (the median over points) well above the detector's noise
pulls back faster (``drift_ref``).

Only the points that are rigid on the head are stabilised (the nose and the eye corners,
``emo_data.pose.IBUG68_INDICES``): mouth, jaw, lids and brows move by themselves and stay as
detected.
"""
from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

from emo_data.pose import IBUG68_INDICES

# Measured (docs/pose.md): flow on patches shrunk to a 64-px eye span was as good on in-plane
# motion but lost more of the yaw / pitch parallax than at full resolution; very large faces are
# still shrunk (the flow's cost grows with the patch area).
PATCH_MARGIN = 0.3     # patch = the rigid points' box plus this fraction of its size on each side
MAX_SPAN_PX = 128.0
_LK_PARAMS = dict(winSize=(21, 21), maxLevel=2,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.01))


def eye_span(points68: np.ndarray) -> float:
    """Distance between the outer eye corners (ibug-68 points 36 and 45)."""
    return math.hypot(float(points68[45][0]) - float(points68[36][0]), float(points68[45][1]) - float(points68[36][1]))


def roll_of(points68: np.ndarray) -> float:
    """In-plane angle (degrees, clockwise on screen positive) of the outer eye-corner line."""
    return math.degrees(math.atan2(float(points68[45][1]) - float(points68[36][1]),
                                   float(points68[45][0]) - float(points68[36][0])))


class LandmarkStabilizer:
    def __init__(self, blend: float = 0.02, shape_blend: float = 0.05, max_disagreement: float = 0.12,
                 indices: np.ndarray = IBUG68_INDICES, drift_ref: float = 0.015):
        if not (0.0 < blend <= 1.0 and 0.0 < shape_blend <= 1.0):
            raise ValueError("blend and shape_blend must be in (0, 1]")
        self.blend = float(blend)
        self.shape_blend = float(shape_blend)
        self.max_disagreement = float(max_disagreement)
        self.drift_ref = float(drift_ref)
        self.last_blend = self.blend
        self.indices = np.asarray(indices, np.int64)
        self.resets = 0          # times the track (re)started from the detections alone
        self.reset()

    def reset(self) -> None:
        self._gray: Optional[np.ndarray] = None     # previous frame's grey patch
        self._origin = np.zeros(2, np.float64)       # its top-left corner in frame pixels
        self._points: Optional[np.ndarray] = None    # previous stabilised rigid points, frame pixels
        self._scale = 1.0                            # patch pixels per frame pixel
        self._size = (0, 0)                          # (w, h) of the patch's frame region

    def _patch(self, frame_rgb: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grey patch around ``points`` (margin: half their extent), clipped to the frame, shrunk so
        the eye span is at most ``max_span_px`` (flow cost grows with the patch area)."""
        h, w = frame_rgb.shape[:2]
        span = max(float(np.ptp(points[:, 0])), float(np.ptp(points[:, 1])), 8.0)
        lo = np.floor(points.min(axis=0) - PATCH_MARGIN * span).astype(int)
        hi = np.ceil(points.max(axis=0) + PATCH_MARGIN * span).astype(int)
        x0, y0 = max(lo[0], 0), max(lo[1], 0)
        x1, y1 = min(hi[0], w), min(hi[1], h)
        self._scale = min(1.0, MAX_SPAN_PX / max(float(np.ptp(points[:, 0])), 1.0))
        return self._grey(frame_rgb[y0:y1, x0:x1]), np.array([x0, y0], np.float64)

    def _grey(self, region: np.ndarray) -> np.ndarray:
        gray = cv2.cvtColor(np.ascontiguousarray(region), cv2.COLOR_RGB2GRAY)
        if self._scale < 1.0:
            gray = cv2.resize(gray, None, fx=self._scale, fy=self._scale, interpolation=cv2.INTER_LINEAR)
        return gray

    def update(self, frame_rgb: np.ndarray, points68: np.ndarray) -> np.ndarray:
        """The landmarks with their rigid points stabilised (a float32 copy)."""
        out = np.array(points68, dtype=np.float32, copy=True)
        measured = out[self.indices].astype(np.float64)
        if not np.all(np.isfinite(measured)):
            self.reset()
            return out
        if self._points is None or self._gray is None:
            self._gray, self._origin = self._patch(frame_rgb, measured)
            self._size = self._region_size()
            self._points = measured
            self.resets += 1
            return out
        # the current frame, cut at the previous patch's place so both share coordinates
        w, h = self._size
        x0, y0 = int(self._origin[0]), int(self._origin[1])
        region = frame_rgb[y0:y0 + h, x0:x0 + w]
        if region.shape[:2] != (h, w):  # frame size changed: start over
            self.reset()
            return self.update(frame_rgb, points68)
        prev = ((self._points - self._origin) * self._scale).astype(np.float32).reshape(-1, 1, 2)
        gray = self._grey(region)
        nxt, status, _err = cv2.calcOpticalFlowPyrLK(self._gray, gray, prev, None, **_LK_PARAMS)
        flowed = nxt.reshape(-1, 2).astype(np.float64) / self._scale + self._origin
        diff = measured - flowed
        dist = np.hypot(diff[:, 0], diff[:, 1])
        span = max(eye_span(out), 1.0)
        ok = (status.reshape(-1) == 1) & (dist <= self.max_disagreement * span)  # NaN compares False
        n_ok = int(ok.sum())
        if n_ok < len(ok) // 2:  # most points lost: a different face or a cut
            self.reset()
            return self.update(frame_rgb, points68)
        # the innovation's similarity part, fitted by least squares over the points that flowed
        # (as complex numbers: shift + c * (p - centre), c = scale and in-plane turn)
        z = flowed[:, 0] + 1j * flowed[:, 1]
        e = diff[:, 0] + 1j * diff[:, 1]
        q = z - z[ok].mean()
        shift = e[ok].mean()
        c = np.vdot(q[ok], e[ok] - shift) / max(float(np.vdot(q[ok], q[ok]).real), 1e-9)
        similar = shift + c * q
        blend = self.blend
        if self.drift_ref > 0:
            # a systematic disagreement (the median over points, not one point's jitter) well
            # above the detector's noise means the flow has drifted: pull back faster
            typical = float(np.median(np.abs(similar[ok]))) / span
            blend = min(1.0, blend * max(1.0, (typical / self.drift_ref) ** 2))
        self.last_blend = blend
        step = blend * similar + self.shape_blend * (e - similar)
        fused = np.where(ok[:, None], flowed + np.c_[step.real, step.imag], measured)
        out[self.indices] = fused
        self._points = fused
        # keep this patch for the next frame unless the points come near its border
        lo, hi = fused.min(axis=0), fused.max(axis=0)
        margin = 0.5 * PATCH_MARGIN * max(float(hi[0] - lo[0]), 8.0)
        if (lo - self._origin >= margin).all() and (self._origin + np.array([w, h]) - hi >= margin).all():
            self._gray = gray
        else:
            self._gray, self._origin = self._patch(frame_rgb, fused)
            self._size = self._region_size()
        return out

    def _region_size(self) -> tuple[int, int]:
        h, w = self._gray.shape
        return (int(round(w / self._scale)), int(round(h / self._scale)))
