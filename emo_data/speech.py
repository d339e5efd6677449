"""Speech activity: which spans of a source's audio hold (single-speaker) speech.

:class:`SpeechActivityStage` turns an :class:`~emo_data.types.AudioTrack` (16 kHz mono float32,
in memory) into :class:`~emo_data.types.SpeechSegment` s on the SOURCE timeline
(``audio.start_s`` is added). Backends (``SpeechConfig.backend``):

``silero``
    Silero VAD, offline: the weights ship inside the ``silero-vad`` wheel. Default.
``pyannote``
    Speaker diarization with a ``pyannote.audio`` pipeline (a local directory / ``config.yaml``
    or a hub id in ``SpeechConfig.pyannote_pipeline``). Only single-speaker speech is kept:
    every part of a speaker turn that overlaps another speaker's turn is cut away, and segments
    carry the speaker label. Optional extra, imported lazily (see ``docs/diarization.md``).
``none``
    The whole track is speech (footage known to be all speech).

All backends share one post-processing step, :func:`postprocess_spans`:

1. pauses shorter than ``min_silence_s`` between two spans of the same speaker are bridged
   (never across another speaker's turn), so a clip may hold a breath;
2. spans shorter than ``min_speech_s`` are dropped;
3. each span is padded by ``pad_s`` on both sides, clipped to the track and never padded into
   another speaker's turn; spans of one speaker that then touch are merged.

Waveforms are always passed in memory (a tensor), never as file paths, so no backend needs an
audio decoder of its own (torchaudio / torchcodec / system FFmpeg are not used for decoding).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .config import SpeechConfig
from .shards.contract import SAMPLE_RATE
from .stage import Stage, StageError
from .types import AudioTrack, SpeechSegment

__all__ = [
    "SpeechActivityStage",
    "SpeechBackendUnavailable",
    "Span",
    "postprocess_spans",
    "single_speaker_spans",
    "annotation_to_turns",
]

BACKENDS = ("silero", "pyannote", "none")


class SpeechBackendUnavailable(RuntimeError):
    """The configured speech backend cannot be imported or its model cannot be loaded."""


@dataclass(frozen=True)
class Span:
    """A time span on the track's own timeline (0 = first sample), optionally with a speaker."""

    start: float
    end: float
    speaker: Optional[str] = None

    @property
    def duration(self) -> float:
        return self.end - self.start


# --------------------------------------------------------------------------------------------
# backend-independent span logic (pure python, unit-tested on hand-made input)
# --------------------------------------------------------------------------------------------


def _subtract(span: tuple[float, float], holes: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """``span`` minus the union of ``holes`` (all half-open intervals)."""
    pieces = [span]
    for h0, h1 in holes:
        nxt = []
        for a, b in pieces:
            if h1 <= a or h0 >= b:
                nxt.append((a, b))
                continue
            if h0 > a:
                nxt.append((a, h0))
            if h1 < b:
                nxt.append((h1, b))
        pieces = nxt
    return [(a, b) for a, b in pieces if b > a]


def single_speaker_spans(turns: Iterable[Span]) -> list[Span]:
    """Parts of speaker turns during which nobody else speaks.

    Each turn loses every part that overlaps a turn of a *different* speaker (overlapped speech
    is useless for lip-sync training data: the visible face may not be the one talking). Turns of
    the same speaker are merged first. Result is sorted by start time.
    """
    by_speaker: dict[Optional[str], list[tuple[float, float]]] = {}
    for t in turns:
        if t.end > t.start:
            by_speaker.setdefault(t.speaker, []).append((float(t.start), float(t.end)))
    merged: dict[Optional[str], list[tuple[float, float]]] = {}
    for spk, ivs in by_speaker.items():
        ivs.sort()
        out: list[list[float]] = []
        for a, b in ivs:
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        merged[spk] = [(a, b) for a, b in out]
    result: list[Span] = []
    for spk, ivs in merged.items():
        others = sorted(iv for s, o in merged.items() if s != spk for iv in o)
        for iv in ivs:
            for a, b in _subtract(iv, others):
                result.append(Span(a, b, spk))
    result.sort(key=lambda s: (s.start, s.end, str(s.speaker)))
    return result


def _blocked(a: float, b: float, speaker: Optional[str], blockers: Sequence[Span]) -> bool:
    return any(t.speaker != speaker and t.start < b and t.end > a for t in blockers)


def postprocess_spans(
    spans: Iterable[Span],
    *,
    duration_s: float,
    min_speech_s: float,
    min_silence_s: float,
    pad_s: float,
    blockers: Sequence[Span] = (),
) -> list[Span]:
    """Bridge short pauses, drop short spans, pad; see the module docstring.

    ``blockers`` are the raw turns of all speakers: a pause is never bridged, and a span never
    padded, across a turn of a different speaker. With one (``None``) speaker it has no effect.
    """
    items = sorted(
        (Span(max(0.0, s.start), min(duration_s, s.end), s.speaker) for s in spans),
        key=lambda s: (s.start, s.end),
    )
    items = [s for s in items if s.end > s.start]

    # 1. bridge pauses < min_silence_s within one speaker (per speaker, in time order)
    bridged: list[Span] = []
    last_of: dict[Optional[str], int] = {}
    for s in items:
        i = last_of.get(s.speaker)
        if i is not None:
            prev = bridged[i]
            gap = s.start - prev.end
            if gap <= 0 or (gap < min_silence_s and not _blocked(prev.end, s.start, s.speaker, blockers)):
                bridged[i] = Span(prev.start, max(prev.end, s.end), s.speaker)
                continue
        last_of[s.speaker] = len(bridged)
        bridged.append(s)

    # 2. drop short spans (measured before padding: it is speech that must last)
    kept = [s for s in bridged if s.duration >= min_speech_s]

    # 3. pad, clip to the track and to other speakers' turns
    padded: list[Span] = []
    for s in kept:
        lo, hi = max(0.0, s.start - pad_s), min(duration_s, s.end + pad_s)
        for t in blockers:
            if t.speaker == s.speaker:
                continue
            if lo < t.end <= s.start:
                lo = t.end
            if s.end <= t.start < hi:
                hi = t.start
        padded.append(Span(lo, hi, s.speaker))
    padded.sort(key=lambda s: (s.start, s.end))

    # 4. merge spans of one speaker that now touch or overlap
    out: list[Span] = []
    last_of = {}
    for s in padded:
        i = last_of.get(s.speaker)
        if i is not None and s.start <= out[i].end:
            out[i] = Span(out[i].start, max(out[i].end, s.end), s.speaker)
            continue
        last_of[s.speaker] = len(out)
        out.append(s)
    out.sort(key=lambda s: (s.start, s.end))
    return out


def annotation_to_turns(diarization: Any) -> list[Span]:
    """Speaker turns from a pyannote ``Annotation`` or a pyannote 4 ``DiarizeOutput``.

    For a ``DiarizeOutput`` the full (overlap-aware) ``speaker_diarization`` is used, not the
    ``exclusive_speaker_diarization``: overlap must be seen to be removed.
    """
    annotation = getattr(diarization, "speaker_diarization", diarization)
    turns = []
    for segment, _track, label in annotation.itertracks(yield_label=True):
        turns.append(Span(float(segment.start), float(segment.end), str(label)))
    return turns


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def _to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:  # [C, N] or [N, C]: downmix
        samples = samples.mean(axis=0 if samples.shape[0] < samples.shape[1] else 1)
    if sample_rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(sample_rate), SAMPLE_RATE)
    return resample_poly(samples, SAMPLE_RATE // g, int(sample_rate) // g).astype(np.float32)


class SpeechActivityStage(Stage[AudioTrack, list[SpeechSegment]]):
    """AudioTrack -> speech segments in source time. See the module docstring."""

    name = "speech_activity"

    def __init__(self, config: Optional[SpeechConfig] = None):
        super().__init__()
        self.config = config or SpeechConfig()
        if self.config.backend not in BACKENDS:
            raise ValueError(f"unknown speech backend {self.config.backend!r}; expected one of {BACKENDS}")
        self._model: Any = None
        self._get_speech_timestamps: Any = None
        self.backend_info: dict[str, Any] = {"backend": self.config.backend}

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        backend = self.config.backend
        if backend == "silero":
            self._setup_silero()
        elif backend == "pyannote":
            self._setup_pyannote()

    def _setup_silero(self) -> None:
        try:
            from silero_vad import get_speech_timestamps, load_silero_vad
        except Exception as exc:  # pragma: no cover - silero-vad is a core dependency
            raise SpeechBackendUnavailable(
                f"speech backend 'silero' needs the silero-vad package (pip install silero-vad): {exc}"
            ) from exc
        self._model = load_silero_vad()
        self._get_speech_timestamps = get_speech_timestamps
        try:
            from importlib.metadata import version

            self.backend_info["silero_vad"] = version("silero-vad")
        except Exception:  # pragma: no cover
            pass

    def _setup_pyannote(self) -> None:
        cfg = self.config
        where = cfg.pyannote_pipeline
        if not where:
            raise SpeechBackendUnavailable(
                "speech backend 'pyannote' needs SpeechConfig.pyannote_pipeline: a local directory "
                "holding a pyannote pipeline config.yaml (and the models it names), the path of that "
                "config.yaml, or a hub id such as 'pyannote/speaker-diarization-community-1' "
                "(hub ids need network access and usually a token). See docs/diarization.md."
            )
        expanded = os.path.expanduser(str(where))
        if (os.path.isabs(expanded) or str(where).startswith((".", "~"))) and not os.path.exists(expanded):
            raise SpeechBackendUnavailable(
                f"pyannote pipeline path {expanded!r} does not exist. Point SpeechConfig.pyannote_pipeline "
                "at a local directory holding a pipeline config.yaml (or at that file); see "
                "docs/diarization.md."
            )
        if os.path.exists(expanded):
            where = expanded
        # pyannote.audio >= 4 sends usage telemetry by default; a corpus build must stay offline.
        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
        try:
            from pyannote.audio import Pipeline
        except Exception as exc:
            raise SpeechBackendUnavailable(
                "speech backend 'pyannote' could not import pyannote.audio "
                f"({type(exc).__name__}: {exc}). Install it beside a torch build that its "
                "torchaudio/torchcodec wheels match, e.g. `pip install torch==2.14.1 "
                "pyannote.audio==4.0.7` (see docs/diarization.md), or use --speech-backend silero."
            ) from exc
        # Tokens come from the environment (never from a stored config: to_dict() drops them).
        token = cfg.pyannote_token or os.environ.get("PYANNOTE_TOKEN") or os.environ.get("HF_TOKEN") or None
        try:
            pipeline = Pipeline.from_pretrained(where, token=token)
        except Exception as exc:
            raise SpeechBackendUnavailable(
                f"could not load the pyannote pipeline {where!r} ({type(exc).__name__}: {exc}). "
                "Offline, point SpeechConfig.pyannote_pipeline at a local directory with a pipeline "
                "config.yaml whose models are local too (e.g. a downloaded copy of "
                "pyannote/speaker-diarization-community-1); see docs/diarization.md."
            ) from exc
        if pipeline is None:  # from_pretrained returns None when the hub download fails softly
            raise SpeechBackendUnavailable(
                f"could not load the pyannote pipeline {where!r}: not a local path and not "
                "downloadable (offline, gated or no token). Point SpeechConfig.pyannote_pipeline at "
                "a local pipeline directory; see docs/diarization.md."
            )
        self._model = pipeline
        try:
            import pyannote.audio

            self.backend_info["pyannote_audio"] = pyannote.audio.__version__
        except Exception:  # pragma: no cover
            pass
        self.backend_info["pyannote_pipeline"] = str(where)

    # ---------------------------------------------------------------- raw detection
    def to(self, device: str) -> "SpeechActivityStage":
        """Run the diarization pipeline on ``device`` (e.g. the GPU a Ray actor was given);
        silero stays on the CPU, where it is fast enough."""
        self.ensure_setup()
        if self.config.backend == "pyannote" and self._model is not None:
            import torch

            self._model.to(torch.device(device))
        return self

    def detect(self, samples: np.ndarray) -> tuple[list[Span], list[Span]]:
        """Raw spans on the track timeline: ``(speech spans, blocking turns)``.

        ``samples`` is 16 kHz mono float32. For pyannote the speech spans are the single-speaker
        parts of the turns and the blockers are all raw turns; for the other backends the
        blockers are empty.
        """
        self.ensure_setup()
        duration = len(samples) / SAMPLE_RATE
        backend = self.config.backend
        if backend == "none":
            return ([Span(0.0, duration)] if duration > 0 else []), []
        if len(samples) < 512:  # shorter than one silero window / any useful speech
            return [], []
        import torch

        wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        if backend == "silero":
            stamps = self._get_speech_timestamps(
                wav,
                self._model,
                threshold=self.config.threshold,
                sampling_rate=SAMPLE_RATE,
                min_speech_duration_ms=0,  # our own post-processing does the filtering,
                min_silence_duration_ms=100,  # bridging and padding, identically for all backends
                speech_pad_ms=0,
                return_seconds=True,
                time_resolution=3,
            )
            return [Span(float(s["start"]), float(s["end"])) for s in stamps], []
        # pyannote
        diarization = self._model({"waveform": wav[None, :], "sample_rate": SAMPLE_RATE})
        # pyannote pads the last chunk: turns may run past the end of the track
        turns = [
            Span(max(0.0, t.start), min(duration, t.end), t.speaker)
            for t in annotation_to_turns(diarization)
            if min(duration, t.end) > max(0.0, t.start)
        ]
        return single_speaker_spans(turns), turns

    # ---------------------------------------------------------------- process
    def process(self, audio: AudioTrack) -> list[SpeechSegment]:
        samples = _to_16k(audio.samples, int(audio.sample_rate))
        if not np.all(np.isfinite(samples)):
            raise StageError("bad_audio", "audio holds NaN or inf samples")
        duration = len(samples) / SAMPLE_RATE
        spans, blockers = self.detect(samples)
        if self.config.backend == "none":
            final = spans
        else:
            final = postprocess_spans(
                spans,
                duration_s=duration,
                min_speech_s=self.config.min_speech_s,
                min_silence_s=self.config.min_silence_s,
                pad_s=self.config.pad_s,
                blockers=blockers,
            )
        off = float(audio.start_s)
        return [SpeechSegment(start_s=off + s.start, end_s=off + s.end, speaker=s.speaker) for s in final]
