"""Per-source analysis before the video pass: probe, 16 kHz audio, speech activity.

One stage for both executors (the Ray build runs it as its ``Analyse`` actor pool). A failure in
any of the three steps is re-raised as :class:`SourceAnalysisError` naming the step, so the
manifest row says where the source failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import BuildConfig
from .decode import AudioDecodeStage, ProbeStage
from .speech import SpeechActivityStage
from .stage import Stage
from .types import AudioTrack, ProbeInfo, Source, SpeechSegment


@dataclass
class AnalysedSource:
    source: Source
    probe: ProbeInfo
    audio: AudioTrack
    speech: list[SpeechSegment]
    vocals: Optional[AudioTrack] = None   # the separated voice (emo_data.vocals), when separation ran


class SourceAnalysisError(Exception):
    """``cause`` raised in step ``stage``; ``duration_s`` is the probed length (0 if unknown)."""

    def __init__(self, stage: str, cause: BaseException, duration_s: float = 0.0):
        super().__init__(f"{stage}: {cause}")
        self.stage, self.cause, self.duration_s = stage, cause, duration_s


class SourceAnalysisStage(Stage[Source, AnalysedSource]):
    name = "analyse"

    def __init__(self, config: Optional[BuildConfig] = None):
        super().__init__()
        config = config or BuildConfig()
        self.probe = ProbeStage()
        self.audio = AudioDecodeStage(config.decode)
        self.speech = SpeechActivityStage(config.speech)

    def setup(self) -> None:
        for stage in (self.probe, self.audio, self.speech):
            stage.ensure_setup()

    def process(self, source: Source) -> AnalysedSource:
        step, duration = "probe", 0.0
        try:
            probe = self.probe(source)
            duration = probe.duration_s
            step = "audio_decode"
            audio = self.audio(source)
            step = "speech"
            speech = self.speech(audio)
        except Exception as exc:  # noqa: BLE001 - re-raised with the step that failed
            raise SourceAnalysisError(step, exc, duration) from exc
        return AnalysedSource(source, probe, audio, speech)
