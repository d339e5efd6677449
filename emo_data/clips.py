"""The single video pass: scene cuts, faces, speech -> selected, cropped clips.

Frames stream through once. Each frame is judged (one face of sufficient size, speech active,
no scene cut); runs of good frames become clips of bounded length, runs of bad frames become
rejected spans with a reason. Only the frames of the clip being assembled are held, cropped to
a square around the face ("buffer region"), so memory is bounded by the clip length, not the
video length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np

from .config import BuildConfig
from .decode import DecodedFrame, iter_frames
from .scenes import SceneCutDetector
from .schema import encode_mp4
from .stage import Stage
from .types import AudioTrack, ClipCandidate, Face, ProbeInfo, RejectedSpan, Source, SpeechSegment

# Frame verdicts, in the order they are checked: a frame's reason is the first that applies.
NO_FACE = "no_face"
MULTI_FACE = "multi_face"
SMALL_FACE = "face_too_small"
NO_SPEECH = "no_speech"
TOO_SHORT = "too_short"


@dataclass
class VideoPassInput:
    source: Source
    probe: ProbeInfo
    audio: AudioTrack
    speech: list[SpeechSegment]


@dataclass
class VideoPassSummary:
    source_id: str
    frames: int = 0
    duration_s: float = 0.0
    speech_s: float = 0.0
    scene_cuts: int = 0
    clips: int = 0
    kept_s: float = 0.0
    rejected_s: dict[str, float] = field(default_factory=dict)

    def totals(self) -> dict[str, float]:
        """What a staged source's summary records."""
        return dict(frames=self.frames, scene_cuts=self.scene_cuts, speech_s=self.speech_s, clips=self.clips,
                    kept_s=self.kept_s)


VideoPassItem = Union[ClipCandidate, RejectedSpan, VideoPassSummary]


def speech_mask(segments: list[SpeechSegment], num_frames: int, fps: float, first_index: int = 0) -> np.ndarray:
    """Boolean per output frame (index ``first_index + i``): is speech active at its time?"""
    mask = np.zeros(num_frames, dtype=bool)
    for seg in segments:
        lo = max(int(np.ceil(seg.start_s * fps)) - first_index, 0)
        hi = min(int(np.floor(seg.end_s * fps)) - first_index + 1, num_frames)
        if hi > lo:
            mask[lo:hi] = True
    return mask


def _square_around(box: np.ndarray, side: float, width: int, height: int) -> np.ndarray:
    """A square of ``side`` centred on ``box``, shifted (not shrunk) to lie inside the frame."""
    side = float(min(side, width, height))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = min(max(cx - side / 2, 0.0), width - side)
    y0 = min(max(cy - side / 2, 0.0), height - side)
    return np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)


def _inside(box: np.ndarray, region: np.ndarray) -> bool:
    return bool(box[0] >= region[0] and box[1] >= region[1] and box[2] <= region[2] and box[3] <= region[3])


class _OpenClip:
    """Frames of the clip being assembled, cropped to the buffer region and downscaled."""

    def __init__(self, region: np.ndarray, store_side: int, first_index: int):
        self.region = region                      # square in source pixels
        self.store_side = store_side              # stored crops are store_side x store_side
        self.scale = store_side / float(region[2] - region[0])
        self.first_index = first_index
        self.images: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []         # source pixels
        self.landmarks: list[np.ndarray] = []     # source pixels
        self.poses: list[Optional[np.ndarray]] = []

    def add(self, image: np.ndarray, face: Face) -> None:
        import cv2

        x0, y0, x1, y1 = [int(round(v)) for v in self.region]
        crop = image[y0:y1, x0:x1]
        if crop.shape[0] != self.store_side:
            # INTER_AREA only pays off for strong reductions; it is several times slower
            interp = cv2.INTER_AREA if crop.shape[0] > 2 * self.store_side else cv2.INTER_LINEAR
            crop = cv2.resize(crop, (self.store_side, self.store_side), interpolation=interp)
        self.images.append(np.ascontiguousarray(crop))
        self.boxes.append(face.box.astype(np.float32))
        self.landmarks.append(face.landmarks.astype(np.float32))
        self.poses.append(face.pose)

    def __len__(self) -> int:
        return len(self.images)


class VideoPassStage(Stage[VideoPassInput, Iterator[VideoPassItem]]):
    """One streaming pass over a source's frames; yields clips, rejected spans, then a summary."""

    name = "video_pass"

    def __init__(self, config: Optional[BuildConfig] = None, face_backend=None):
        super().__init__()
        self.config = config or BuildConfig()
        self.backend = face_backend

    def setup(self) -> None:
        from .faces import make_face_backend

        if self.backend is None:
            self.backend = make_face_backend(self.config.face)
        self.backend.setup()

    # ------------------------------------------------------------------ per-frame verdict
    def _verdict(self, faces: list[Face], speaking: bool, width: int, height: int) -> Optional[str]:
        from .faces.base import min_face_side

        limit = min_face_side(self.config.face, width, height)
        sizes = [float(max(f.box[2] - f.box[0], f.box[3] - f.box[1])) for f in faces]
        # Faces far below the size limit (crowds in the background) do not count as a second face.
        relevant = [s for s in sizes if s >= 0.5 * limit]
        if not relevant:
            return NO_FACE
        if len(relevant) > 1:
            return MULTI_FACE
        if max(sizes) < limit:
            return SMALL_FACE
        if not speaking:
            return NO_SPEECH
        return None

    def process(self, item: VideoPassInput) -> Iterator[VideoPassItem]:
        from .faces import FaceTracker

        cfg = self.config
        fps = cfg.decode.fps
        source = item.source
        tracker = FaceTracker(self.backend, cfg.face)
        scenes = SceneCutDetector(cfg.scene)
        summary = VideoPassSummary(source_id=source.source_id)
        summary.speech_s = float(sum(s.end_s - s.start_s for s in item.speech))
        min_frames = int(round(cfg.clip.min_seconds * fps))
        max_frames = int(round(cfg.clip.max_seconds * fps))
        store_side = int(np.ceil(cfg.clip.crop_size * cfg.clip.buffer_scale / cfg.clip.crop_scale))

        clip: Optional[_OpenClip] = None
        clip_index = 0
        reject: Optional[list] = None  # [reason, first_index, last_index]
        speech_segments = sorted(item.speech, key=lambda s: s.start_s)

        def speaking_at(t: float) -> bool:
            # Segments are few; a linear scan per frame is cheap and keeps this streaming.
            for seg in speech_segments:
                if seg.start_s <= t <= seg.end_s:
                    return True
                if seg.start_s > t:
                    break
            return False

        def close_reject() -> Iterator[VideoPassItem]:
            nonlocal reject
            if reject is not None:
                reason, lo, hi = reject
                span = RejectedSpan(source.source_id, source.path, lo / fps, (hi + 1) / fps, reason)
                summary.rejected_s[reason] = summary.rejected_s.get(reason, 0.0) + span.end_s - span.start_s
                reject = None
                yield span

        def add_reject(reason: str, index: int) -> Iterator[VideoPassItem]:
            nonlocal reject
            if reject is not None and (reject[0] != reason or reject[2] != index - 1):
                yield from close_reject()
            if reject is None:
                reject = [reason, index, index]
            else:
                reject[2] = index

        def close_clip(ended_by: str) -> Iterator[VideoPassItem]:
            nonlocal clip, clip_index
            if clip is None:
                return
            finished, clip = clip, None
            if len(finished) >= min_frames:
                candidate = self._assemble(source, item.audio, finished, clip_index, (probe_w, probe_h))
                clip_index += 1
                summary.clips += 1
                summary.kept_s += candidate.num_frames / fps
                yield candidate
            else:
                lo = finished.first_index
                span = RejectedSpan(
                    source.source_id, source.path, lo / fps, (lo + len(finished)) / fps, TOO_SHORT,
                    detail=f"{len(finished)} good frames < {min_frames}; ended by {ended_by}",
                )
                summary.rejected_s[TOO_SHORT] = summary.rejected_s.get(TOO_SHORT, 0.0) + span.end_s - span.start_s
                yield span

        probe_w = probe_h = 0
        frame: Optional[DecodedFrame] = None
        for frame in iter_frames(source.path, fps=fps, threads=cfg.decode.threads):
            summary.frames += 1
            probe_w, probe_h = frame.size
            size = cfg.scene.analysis_size
            if scenes.update(frame.resized(size, size)):
                summary.scene_cuts += 1
                tracker.reset()
                yield from close_clip("scene_cut")
            speaking = speaking_at(frame.time_s)
            faces = tracker.update(frame, frame.index, need_landmarks=speaking or clip is not None)
            reason = self._verdict(faces, speaking, probe_w, probe_h)
            if reason is None:
                face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                image = frame.image
                if face.landmarks is None:
                    face.landmarks = self.backend.landmarks(image, [face.box])[0]
                if clip is not None and (len(clip) >= max_frames or not _inside(face.box, clip.region)):
                    yield from close_clip("max_length" if len(clip) >= max_frames else "face_left_crop")
                if clip is None:
                    yield from close_reject()
                    side = cfg.clip.buffer_scale * float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
                    region = _square_around(face.box, side, probe_w, probe_h)
                    clip = _OpenClip(region, min(store_side, int(region[2] - region[0])), frame.index)
                    if not _inside(face.box, region):  # face larger than the frame allows: clamp box
                        face.box = np.clip(face.box, [region[0], region[1], region[0], region[1]], [region[2], region[3], region[2], region[3]]).astype(np.float32)
                clip.add(image, face)
            else:
                yield from close_clip(reason)
                yield from add_reject(reason, frame.index)
        yield from close_clip("end_of_video")
        yield from close_reject()
        summary.duration_s = summary.frames / fps
        yield summary

    # ------------------------------------------------------------------ clip assembly
    def _assemble(self, source: Source, audio: AudioTrack, clip: _OpenClip, clip_index: int, source_size) -> ClipCandidate:
        import cv2

        cfg = self.config
        fps = cfg.decode.fps
        S = cfg.clip.crop_size
        boxes = np.stack(clip.boxes)
        union = np.array([boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()], np.float32)
        side = cfg.clip.crop_scale * float(max(union[2] - union[0], union[3] - union[1]))
        region = clip.region
        rw, rh = float(region[2] - region[0]), float(region[3] - region[1])
        # Final crop: a square around the union, inside the buffer region (in region-local pixels).
        local_union = union - np.array([region[0], region[1], region[0], region[1]], np.float32)
        local = _square_around(local_union, side, int(rw), int(rh))
        crop_box = local + np.array([region[0], region[1], region[0], region[1]], np.float32)
        s = clip.scale
        x0, y0, x1, y1 = [int(round(v * s)) for v in local]
        frames = []
        for img in clip.images:
            sub = img[y0:y1, x0:x1]
            interp = cv2.INTER_AREA if sub.shape[0] > 2 * S else cv2.INTER_LINEAR
            frames.append(cv2.resize(sub, (S, S), interpolation=interp))
        clip.images = []  # release the buffer before encoding more
        to_crop = S / float(crop_box[2] - crop_box[0])
        offset = np.array([crop_box[0], crop_box[1]], np.float32)
        crop_boxes = (boxes.reshape(-1, 2, 2) - offset).reshape(-1, 4) * to_crop
        crop_landmarks = (np.stack(clip.landmarks) - offset) * to_crop

        identity = None
        n = len(frames)
        picks = np.unique(np.linspace(0, n - 1, max(1, cfg.face.embed_frames)).round().astype(int))
        embeddings = []
        for i in picks:
            face = Face(box=crop_boxes[i].astype(np.float32), landmarks=crop_landmarks[i].astype(np.float32))
            try:
                embeddings.append(np.asarray(self.backend.embed(frames[i], face), np.float32))
            except Exception:  # noqa: BLE001 - an embedding failure leaves the clip without identity
                continue
        if embeddings:
            identity = np.mean(embeddings, axis=0).astype(np.float32)

        mp4 = encode_mp4(frames, fps, crf=cfg.clip.mp4_crf, preset=cfg.clip.mp4_preset)
        start_s = clip.first_index / fps
        samples = audio.segment(start_s, int(round(n * audio.sample_rate / fps)))
        poses = clip.poses
        backend_pose = np.stack(poses).astype(np.float32) if all(p is not None for p in poses) else None
        face_sizes = (crop_boxes[:, 2] - crop_boxes[:, 0]) / S
        return ClipCandidate(
            source=source,
            clip_index=clip_index,
            start_s=start_s,
            fps=fps,
            num_frames=n,
            mp4=mp4,
            face_boxes=crop_boxes.astype(np.float32),
            landmarks=crop_landmarks.astype(np.float32),
            crop_box=crop_box,
            source_size=tuple(int(v) for v in source_size),
            audio=samples,
            sample_rate=audio.sample_rate,
            identity_embedding=identity,
            backend_pose=backend_pose,
            scores={
                "face_size_mean": float(face_sizes.mean()),
                "crop_source_px": float(crop_box[2] - crop_box[0]),
                "upscale": float(to_crop),
            },
            face_backend=self.backend.name,
            landmark_format=self.backend.landmark_format,
        )
