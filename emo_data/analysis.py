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
    vocals_info: Optional[dict] = None    # whether / why / with which weights the voice was separated


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
        self.config = config
        self.probe = ProbeStage()
        self.audio = AudioDecodeStage(config.decode)
        self.speech = SpeechActivityStage(config.speech)
        self.separator = None

    def setup(self) -> None:
        from .vocals import make_vocal_separator

        for stage in (self.probe, self.audio, self.speech):
            stage.ensure_setup()
        self.separator = make_vocal_separator(self.config.vocals)   # None: no source can be separated
        if self.separator is not None:
            self.separator.setup()


    def process(self, source: Source) -> AnalysedSource:
        step, duration = "probe", 0.0
        try:
            probe = self.probe(source)
            duration = probe.duration_s
            step = "audio_decode"
            audio = self.audio(source)
            step = "vocals"
            vocals, vocals_info = self._separate(source, audio)
            step = "speech"
            # speech activity hears the voice without the music under it, when there is one
            speech = self.speech(vocals if vocals is not None else audio)
        except Exception as exc:  # noqa: BLE001 - re-raised with the step that failed
            raise SourceAnalysisError(step, exc, duration) from exc
        return AnalysedSource(source, probe, audio, speech, vocals=vocals, vocals_info=vocals_info)

    def _separate(self, source: Source, audio: AudioTrack) -> tuple[Optional[AudioTrack], dict]:
        decision = self.config.vocals.decide(source.kind)
        info = decision.to_dict()
        if not decision.separate or self.separator is None:
            return None, info
        voice = self.separator.separate(audio.samples, audio.sample_rate)
        info.update(self.separator.describe())
        return AudioTrack(samples=voice, sample_rate=audio.sample_rate, start_s=audio.start_s), info
