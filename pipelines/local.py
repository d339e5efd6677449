"""In-process executor: the same stages as the Ray build, one source after another.

For tests, debugging and small corpora. It only wires stages from ``emo_data``; every per-item
failure becomes a manifest row and the build goes on.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from emo_data.config import BuildConfig
from emo_data.finalize import CorpusSummary, check_resplit, finalize_corpus
from emo_data.manifest import check_sources, read_sources
from emo_data.resume import ResumePlan, plan_resume
from emo_data.stage import StageError
from emo_data.staging import clear_source, staged_paths
from emo_data.types import ClipCandidate, RejectedSpan, Source

log = logging.getLogger("emo.build")


class SourcePipeline:
    """All per-source stages, each set up once; ``run(source)`` stages one source completely.

    The same stages as the Ray build, called in a row: analysis, the video pass, then the
    per-clip steps of :mod:`emo_data.clip_steps`; a :class:`emo_data.ledger.SourceLedger` seals
    each source exactly as the Ray driver does."""

    def __init__(self, config: BuildConfig, face_backend=None):
        from emo_data.analysis import SourceAnalysisStage
        from emo_data.clips import VideoPassStage

        self.config = config
        self.analyse = SourceAnalysisStage(config)
        self.video = VideoPassStage(config, face_backend=face_backend)
        self._steps: Optional[tuple[str, list]] = None   # (out_dir, [(name, fn)]) built on first use

    def setup(self) -> None:
        for stage in (self.analyse, self.video):
            stage.ensure_setup()

    def steps(self, out_dir: str) -> list:
        from emo_data.clip_steps import clip_steps

        if self._steps is None or self._steps[0] != out_dir:
            device = "cpu"
            self._steps = (out_dir, [(step.name, step.make(self.config, device, out_dir)) for step in clip_steps(self.config)])
        return self._steps[1]

    def run(self, source: Source, out_dir: str, on_clip: Optional[Callable[[float], None]] = None,
            fingerprint: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Stage one source (sealed with ``fingerprint``, see emo_data.resume); returns its
        summary. Never raises for a bad source."""
        from emo_data.analysis import SourceAnalysisError
        from emo_data.clip_work import ClipInFlight, failed_row, rejected_row
        from emo_data.clips import VideoPassInput, VideoPassSummary
        from emo_data.ledger import CLIP, END, FAILED, WRITTEN, ClipResult, SourceEnd, SourceLedger

        self.setup()
        steps = self.steps(out_dir)
        clear_source(out_dir, source.source_id)      # leftovers of an interrupted attempt
        ledger = SourceLedger([source], out_dir, {source.source_id: fingerprint} if fingerprint else None)
        try:
            analysed = self.analyse(source)
        except SourceAnalysisError as exc:
            end = SourceEnd([], [], {"duration_s": exc.duration_s}, failed_row(source, exc.stage, exc.cause))
            return ledger.add(source.source_id, END, end).summary
        end = SourceEnd([], [], {"duration_s": analysed.probe.duration_s})
        stage = "video_pass"
        try:
            for item in self.video(VideoPassInput.from_analysis(analysed)):
                if isinstance(item, ClipCandidate):
                    end.keys.append(item.key)
                    kind, payload = CLIP, ClipInFlight(item)
                    for stage, fn in steps:  # noqa: B007 - ``stage`` names the step in a failure row
                        kind, payload = fn(payload)
                        if kind != CLIP:
                            break
                    stage = "video_pass"
                    ledger.add(source.source_id, kind, payload)
                    if kind == WRITTEN and on_clip:
                        on_clip(payload.row["duration_s"])
                elif isinstance(item, RejectedSpan):
                    end.rows.append(rejected_row(source, item))
                elif isinstance(item, VideoPassSummary):
                    end.summary.update(item.totals())
        except Exception as exc:  # noqa: BLE001 - a bad file or a bug on one source must not stop the corpus
            if not isinstance(exc, StageError):
                log.warning("%s failed in %s: %s", source.path, stage, exc)
            if stage == "video_pass":
                end.failure = failed_row(source, stage, exc)
            else:   # a per-clip step failed: the source fails, as in the Ray build
                key = end.keys[-1]
                ledger.add(source.source_id, FAILED, ClipResult(key, failed_row(source, stage, exc)))
                end.keys = [k for k in end.keys if k in ledger.pending[source.source_id].back()]
        return ledger.add(source.source_id, END, end).summary


@dataclass
class BuildResult:
    summary: CorpusSummary
    out_dir: str
    processed: int
    skipped: int
    plan: Optional[ResumePlan] = None   # what was redone and why


def prepare_sources(sources: Iterable[Source] | str, out_dir: str, config: BuildConfig,
                    resplit: bool = False) -> tuple[list[Source], ResumePlan]:
    """Read the sources (keeping ids already staged in ``out_dir``), refuse a split-changing
    config without ``resplit``, and plan which sources to (re)do. Shared by both executors."""
    os.makedirs(out_dir, exist_ok=True)
    sources = (read_sources(sources, previous_ids=staged_paths(out_dir)) if isinstance(sources, str)
               else check_sources(list(sources)))
    check_resplit(out_dir, config, resplit)
    plan = plan_resume(out_dir, sources, config)
    if plan.redo:
        log.warning("redoing %d source(s) that changed since they were staged, e.g. %s", len(plan.redo), plan.describe(1)[0])
    if plan.todo and config.audio_features.enabled:
        from emo_data.audio_features import check_audio_encoder

        check_audio_encoder(config.audio_features)  # fail before any work, with a how-to
    if plan.todo and config.sync.enabled:
        from emo_data.sync.gate import check_sync_backend

        check_sync_backend(config.sync)               # SyncNet weights that load, or a how-to
    if plan.todo and config.vocals.mode != "never":
        from emo_data.vocals import make_vocal_separator

        separator = make_vocal_separator(config.vocals)   # weights that load, or a how-to
        if separator is not None:
            separator.setup()
    for source in plan.todo:  # a changed source's old marker must not make it look done
        clear_source(out_dir, source.source_id)
    return sources, plan


def build_corpus(
    sources: Iterable[Source] | str,
    out_dir: str,
    config: Optional[BuildConfig] = None,
    progress: bool = True,
    face_backend=None,
    resplit: bool = False,
) -> BuildResult:
    """Build a corpus in-process: stage every new, unfinished or changed source (see
    emo_data.resume), then finalise splits and shards."""
    from tqdm import tqdm

    config = config or BuildConfig()
    sources, plan = prepare_sources(sources, out_dir, config, resplit)
    todo = plan.todo
    start = time.time()
    pipeline = SourcePipeline(config, face_backend=face_backend)
    with tqdm(total=len(todo), unit="video", disable=not progress, desc="build", dynamic_ncols=True) as bar:
        kept = [0.0, 0]

        def on_clip(seconds: float) -> None:
            kept[0] += seconds
            kept[1] += 1
            bar.set_postfix(clips=kept[1], kept=f"{kept[0]:.0f}s")

        for source in todo:
            bar.set_description(f"build {source.source_id[:24]}")
            pipeline.run(source, out_dir, on_clip, plan.fingerprints[source.source_id])
            bar.update(1)
    summary = finalize_corpus(out_dir, sources, config, wall_s=time.time() - start if todo else 0.0,
                              processed=[s.source_id for s in todo], resplit=resplit)
    return BuildResult(summary=summary, out_dir=out_dir, processed=len(todo), skipped=len(sources) - len(todo), plan=plan)
