"""The single video pass: scene cuts, faces, speech -> selected, cropped clips.

Frames stream through once. Each frame is judged (one face of sufficient size, speech active,
no scene cut); :class:`emo_data.segmenter.ClipSegmenter` turns the verdicts into clips of
bounded length and rejected spans with a reason. Only the frames of the clip being assembled
are held, cropped to a square around the face ("buffer region"), so memory is bounded by the
clip length, not the video length. Each clip leaves with what the per-clip gates need: the
source audio around it (for offset search and correction) and its mouth signals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np

from .config import BuildConfig
from .decode import iter_frames
from .scenes import SceneCutDetector
from .segmenter import TOO_SHORT, ClipClosed, ClipOpened, ClipSegmenter, FramesRejected
from .shards import encode_mp4
from .stage import Stage
from .types import AudioTrack, ClipCandidate, Face, ProbeInfo, RejectedSpan, Source, SpeechSegment

# Frame verdicts, in the order they are checked: a frame's reason is the first that applies.
NO_FACE = "no_face"
MULTI_FACE = "multi_face"
SMALL_FACE = "face_too_small"
NO_SPEECH = "no_speech"


@dataclass
class VideoPassInput:
    source: Source
    probe: ProbeInfo
    audio: AudioTrack
    speech: list[SpeechSegment]
    vocals: Optional[AudioTrack] = None    # the separated voice, when vocal separation ran
    vocals_info: Optional[dict] = None     # whether / why / with which weights (stored per sample)

    @classmethod
    def from_analysis(cls, analysed) -> "VideoPassInput":
        """From an :class:`emo_data.analysis.AnalysedSource`."""
        return cls(analysed.source, analysed.probe, analysed.audio, analysed.speech,
                   vocals=analysed.vocals, vocals_info=analysed.vocals_info)


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


def _window_around(box: np.ndarray, side: float, width: int, height: int) -> np.ndarray:
    """The buffer region of a clip: ``side`` x ``side`` centred on ``box``, narrowed on an axis
    to the frame's size there and shifted inside the frame. Not always square: in a portrait
    frame narrower than ``side`` it keeps the full height, so the clip's final square crop can be
    centred on where the face actually went (re-centring within the frame) instead of cutting the
    clip whenever the head moves out of a square as narrow as the frame."""
    w, h = float(min(side, width)), float(min(side, height))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = min(max(cx - w / 2, 0.0), width - w)
    y0 = min(max(cy - h / 2, 0.0), height - h)
    return np.array([x0, y0, x0 + w, y0 + h], dtype=np.float32)


def _long_side(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], box[3] - box[1]))


def _fits(box: np.ndarray, region: np.ndarray, width: int, height: int, tolerance: float = 1.0) -> bool:
    """Is the face inside the crop region, as far as the frame and the region let it be?

    A face cut by the frame border is judged by its visible part (the region cannot reach past
    the border either). On an axis where the visible face is larger than the region (a face
    filling a portrait frame), it fits while the region stays within the face: the crop is all
    face and the boxes are clamped to it, frame by frame."""
    lo = (max(float(box[0]), 0.0), max(float(box[1]), 0.0))
    hi = (min(float(box[2]), float(width)), min(float(box[3]), float(height)))
    for axis in (0, 1):
        r0, r1 = float(region[axis]), float(region[axis + 2])
        if hi[axis] - lo[axis] <= r1 - r0:
            if lo[axis] < r0 - tolerance or hi[axis] > r1 + tolerance:
                return False
        elif r0 < lo[axis] - tolerance or r1 > hi[axis] + tolerance:
            return False
    return True


class _SpeechLookup:
    """``lookup(t)``: is speech active at source time t? Frames arrive in time order, so a cursor
    walks the sorted segments once (streaming, O(frames + segments))."""

    def __init__(self, segments: list[SpeechSegment]):
        self.segments = sorted(segments, key=lambda s: s.start_s)
        self.cursor = 0

    def __call__(self, t: float) -> bool:
        segs = self.segments
        while self.cursor < len(segs) and segs[self.cursor].end_s < t:
            self.cursor += 1
        i = self.cursor
        while i < len(segs) and segs[i].start_s <= t:
            if t <= segs[i].end_s:
                return True
            i += 1
        return False


class _PassState:
    """What the video pass carries between frames for one source."""

    def __init__(self, source: Source, item: "VideoPassInput", summary: "VideoPassSummary", fps: float):
        self.source, self.item, self.summary, self.fps = source, item, summary, fps
        self.clip: Optional["_OpenClip"] = None
        self.clip_index = 0
        self.size = (0, 0)


class _OpenClip:
    """Frames of the clip being assembled, cropped to the buffer region and downscaled."""

    def __init__(self, region: np.ndarray, store_side: int, first_index: int):
        self.region = region                      # window in source pixels (square unless the frame is narrower)
        self.scale = min(1.0, store_side / float(max(region[2] - region[0], region[3] - region[1])))
        # stored crops: the region scaled so its long side is at most store_side
        self.store_size = (max(1, int(round((region[2] - region[0]) * self.scale))),
                           max(1, int(round((region[3] - region[1]) * self.scale))))
        self.first_index = first_index
        self.images: list[np.ndarray] = []
        self.boxes: list[np.ndarray] = []         # source pixels
        self.landmarks: list[np.ndarray] = []     # source pixels
        self.poses: list[Optional[np.ndarray]] = []

    def add(self, image: np.ndarray, face: Face) -> None:
        import cv2

        x0, y0, x1, y1 = [int(round(v)) for v in self.region]
        crop = image[y0:y1, x0:x1]
        if (crop.shape[1], crop.shape[0]) != self.store_size:
            # INTER_AREA only pays off for strong reductions; it is several times slower
            interp = cv2.INTER_AREA if crop.shape[1] > 2 * self.store_size[0] else cv2.INTER_LINEAR
            crop = cv2.resize(crop, self.store_size, interpolation=interp)
        self.images.append(np.ascontiguousarray(crop))
        # A face partly outside the frame (or larger than the region) is clamped to the region on
        # every frame, so boxes, mask and crop always agree.
        r = self.region
        self.boxes.append(np.clip(face.box, [r[0], r[1], r[0], r[1]], [r[2], r[3], r[2], r[3]]).astype(np.float32))
        self.landmarks.append(face.landmarks.astype(np.float32))
        self.poses.append(face.pose)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` frames (drop bridged frames no good frame followed)."""
        del self.images[length:], self.boxes[length:], self.landmarks[length:], self.poses[length:]

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
        from .quality import FaceQualityScorer, make_learned_iqa

        if self.backend is None:
            self.backend = make_face_backend(self.config.face)
        self.backend.setup()
        self.quality = FaceQualityScorer(self.config.quality)
        self.quality.setup()
        self.learned_quality = make_learned_iqa(self.config.quality)
        if self.learned_quality is not None:
            self.learned_quality.setup()

    def _quality(self, frames: list[np.ndarray], boxes: np.ndarray) -> dict[str, float]:
        """Face image-quality scores of the crop on a few frames (offline, plus MUSIQ if configured)."""
        from .stage import StageError

        scores: dict[str, float] = {}
        for scorer in (self.quality, self.learned_quality):
            if scorer is None:
                continue
            picks = scorer.pick_frames(len(frames))
            try:
                scores.update(scorer.score([frames[i] for i in picks], boxes, frame_indices=picks))
            except StageError as exc:   # no usable face box: the clip stays unscored, visibly
                scores[f"{scorer.name}_error"] = exc.reason
        return scores

    # ------------------------------------------------------------------ per-frame verdict
    def _verdict(self, faces: list[Face], speaking: bool, width: int, height: int,
                 seen: dict[int, int]) -> tuple[Optional[str], Optional[Face]]:
        """(reason or None, the one face). A face far below the size limit (a crowd in the
        background) is not a second person; neither is a detection that has not been confirmed
        by ``second_face_min_detections`` detections in a row or scores far below the main face."""
        from .faces.base import min_face_side

        limit = min_face_side(self.config.face, width, height)
        relevant = [f for f in faces if _long_side(f.box) >= 0.5 * limit]
        if not relevant:
            return NO_FACE, None
        # the most confident detection is the face (a large but weak detection on a badge or a
        # shirt pattern must not displace it); area breaks ties
        main = max(relevant, key=lambda f: (f.score, (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
        confirmed_after = max(int(self.config.face.detect_every), 1) * (int(self.config.clip.second_face_min_detections) - 1)
        ratio = float(self.config.clip.second_face_min_score_ratio)
        others = [f for f in relevant if f is not main and seen.get(f.track_id, 0) > confirmed_after
                  and f.score >= ratio * main.score]
        if others:
            return MULTI_FACE, None
        if _long_side(main.box) < limit:
            return SMALL_FACE, main
        if not speaking:
            return NO_SPEECH, main
        return None, main

    def process(self, item: VideoPassInput) -> Iterator[VideoPassItem]:
        from .faces import FaceTracker

        cfg = self.config
        fps = cfg.decode.fps
        source = item.source
        tracker = FaceTracker(self.backend, cfg.face)
        scenes = SceneCutDetector(cfg.scene)
        summary = VideoPassSummary(source_id=source.source_id)
        summary.speech_s = float(sum(s.end_s - s.start_s for s in item.speech))
        segmenter = ClipSegmenter(
            min_frames=int(round(cfg.clip.min_seconds * fps)), max_frames=int(round(cfg.clip.max_seconds * fps)),
            max_gap=cfg.clip.max_gap_frames, bridgeable=(SMALL_FACE, NO_SPEECH),
        )
        store_side = int(np.ceil(cfg.clip.crop_size * cfg.clip.buffer_scale / cfg.clip.crop_scale))
        speaking_at = _SpeechLookup(item.speech)
        seen: dict[int, int] = {}        # track id -> frames it has been visible (second-face persistence)
        state = _PassState(source, item, summary, fps)

        for frame in iter_frames(source.path, fps=fps, threads=cfg.decode.threads):
            summary.frames += 1
            width, height = state.size = frame.size
            size = cfg.scene.analysis_size
            if scenes.update(frame.resized(size, size)):
                summary.scene_cuts += 1
                tracker.reset()
                seen.clear()
                yield from self._apply(state, segmenter.cut())
            speaking = speaking_at(frame.time_s)
            faces = tracker.update(frame, frame.index, need_landmarks=speaking or segmenter.is_open)
            for f in faces:
                seen[f.track_id] = seen.get(f.track_id, 0) + 1
            reason, face = self._verdict(faces, speaking, width, height, seen)
            if face is not None and face.landmarks is None and (reason is None or segmenter.is_open):
                face.landmarks = self.backend.landmarks(frame.image, [face.box])[0]
            usable = face is not None and face.landmarks is not None
            fits = state.clip is None or face is None or _fits(face.box, state.clip.region, width, height)
            events, joins = segmenter.frame(frame.index, reason, fits=fits, usable=usable)
            yield from self._apply(state, events)
            if joins:
                if state.clip is None:   # the segmenter opened a clip on this frame
                    side = cfg.clip.buffer_scale * _long_side(face.box)
                    region = _window_around(face.box, side, width, height)
                    state.clip = _OpenClip(region, store_side, frame.index)
                state.clip.add(frame.image, face)
        yield from self._apply(state, segmenter.finish())
        summary.duration_s = summary.frames / fps
        yield summary

    def _apply(self, state: "_PassState", events) -> Iterator[VideoPassItem]:
        """Turn segmenter events into clips (assembled from the buffered frames) and spans."""
        fps = state.fps
        for event in events:
            if isinstance(event, ClipClosed):
                clip, state.clip = state.clip, None
                clip.truncate(event.length)
                candidate = self._assemble(state.source, state.item, clip, state.clip_index, state.size)
                state.clip_index += 1
                state.summary.clips += 1
                state.summary.kept_s += candidate.num_frames / fps
                yield candidate
            elif isinstance(event, FramesRejected):
                if state.clip is not None and event.reason == TOO_SHORT:
                    state.clip = None    # a clip that closed too short: drop its frames
                span = RejectedSpan(state.source.source_id, state.source.path, event.first / fps, (event.last + 1) / fps,
                                    event.reason, detail=event.detail)
                state.summary.rejected_s[event.reason] = state.summary.rejected_s.get(event.reason, 0.0) + span.end_s - span.start_s
                yield span
            elif isinstance(event, ClipOpened):
                state.clip = None        # the frame loop creates the buffer for the new clip

    # ------------------------------------------------------------------ clip assembly
    def _assemble(self, source: Source, item: VideoPassInput, clip: _OpenClip, clip_index: int, source_size) -> ClipCandidate:
        import cv2

        from .sync.signals import mouth_darkness, mouth_motion

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
        side_px = int(round((local[2] - local[0]) * s))
        x0 = min(int(round(local[0] * s)), clip.store_size[0] - side_px)
        y0 = min(int(round(local[1] * s)), clip.store_size[1] - side_px)
        x1, y1 = x0 + side_px, y0 + side_px
        frames = []
        for img in clip.images:
            sub = img[y0:y1, x0:x1]
            interp = cv2.INTER_AREA if sub.shape[0] > 2 * S else cv2.INTER_LINEAR
            frames.append(cv2.resize(sub, (S, S), interpolation=interp))
        clip.images = []  # release the buffer before encoding more
        to_crop = S / float(crop_box[2] - crop_box[0])
        offset = np.array([crop_box[0], crop_box[1]], np.float32)
        # a face larger than the square crop (a face filling a portrait frame) is clamped to it
        crop_boxes = np.clip((boxes.reshape(-1, 2, 2) - offset).reshape(-1, 4) * to_crop, 0.0, float(S))
        crop_landmarks = (np.stack(clip.landmarks) - offset) * to_crop

        identity = None
        n = len(frames)
        picks = np.unique(np.linspace(0, n - 1, max(1, cfg.face.embed_frames)).round().astype(int))
        embeddings = []
        embed_errors: list[str] = []
        for i in picks:
            face = Face(box=crop_boxes[i].astype(np.float32), landmarks=crop_landmarks[i].astype(np.float32))
            try:
                embeddings.append(np.asarray(self.backend.embed(frames[i], face), np.float32))
            except Exception as exc:  # noqa: BLE001 - recorded below: the clip then has no identity embedding
                embed_errors.append(f"{type(exc).__name__}: {exc}")
        if embeddings:
            identity = np.mean(embeddings, axis=0).astype(np.float32)

        fmt = self.backend.landmark_format
        quality = self._quality(frames, crop_boxes)
        motion = mouth_motion(frames, crop_landmarks, fmt, boxes=crop_boxes)
        darkness = mouth_darkness(frames, crop_landmarks, fmt)
        mp4 = encode_mp4(frames, fps, crf=cfg.clip.mp4_crf, preset=cfg.clip.mp4_preset)
        del frames
        start_s = clip.first_index / fps
        audio = item.audio
        per_frame = audio.sample_rate / fps
        samples = audio.segment(start_s, int(round(n * per_frame)))
        # The source's audio around the clip: the sync gate searches offsets in it and re-cuts
        # the clip's audio from it without going back to the file.
        pad = int(cfg.sync.max_offset) if cfg.sync.enabled else 0
        context_start = start_s - pad / fps
        context_len = int(round((n + 2 * pad) * per_frame))
        context = audio.segment(context_start, context_len)
        track_lo = int(round((audio.start_s - context_start) * audio.sample_rate))
        valid = (min(max(track_lo, 0), context_len), min(max(track_lo + len(audio.samples), 0), context_len))
        vocals = item.vocals.segment(context_start, context_len) if item.vocals is not None else None
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
                "identity_embed_failures": len(embed_errors),
            },
            face_backend=self.backend.name,
            landmark_format=self.backend.landmark_format,
            audio_context=context,
            audio_pad_frames=pad,
            audio_valid=valid,
            vocals_context=vocals,
            mouth_motion=motion,
            mouth_darkness=darkness,
            audio_source="vocals" if vocals is not None else "mix",
            vocals_info=item.vocals_info,
            quality=quality,
        )
