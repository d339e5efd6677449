"""A source's outcome, collected from whatever order its pieces come back in, and sealed once.

Both executors produce the same typed items for a source: its clips go through the per-clip
steps (:mod:`emo_data.clip_steps`) and come back as :class:`ClipResult` rows (``written``,
``gated`` by a per-clip gate, or ``failed``); the video pass ends with a :class:`SourceEnd`
listing every clip key it cut, its rejected spans and its summary (or a failure). A
:class:`SourceLedger` seals a source (rows, then the done marker) only when its end and every
key it lists are back, so a marker always means "all parts are on disk". The in-process
executor feeds it in order; the Ray build feeds it in whatever order the operators deliver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .manifest import ManifestRow
from .staging import clear_source, is_done, seal_source
from .types import Source

# What travels between operators, per row: (source_id, kind, item)
ANALYSED = "analysed"   # item: emo_data.analysis.AnalysedSource
CLIP = "clip"           # item: emo_data.clip_work.ClipInFlight (between per-clip steps)
END = "end"             # item: SourceEnd
WRITTEN = "written"     # item: ClipResult (the clip is staged)
GATED = "gated"         # item: ClipResult (a per-clip gate rejected the clip: its row)
FAILED = "failed"       # item: ClipResult (a per-clip step failed: the source fails)


@dataclass
class ClipResult:
    key: str
    row: dict[str, Any]          # the clip's manifest row


@dataclass
class SourceEnd:
    """What the video pass knows once a source's last frame is read."""

    keys: list[str]                                  # every clip it cut, in order
    rows: list[dict[str, Any]]                       # rejected spans
    summary: dict[str, Any]                          # frames, duration, scene cuts, speech, ...
    failure: Optional[dict[str, Any]] = None         # a failed row: the source failed


@dataclass
class SourceOutcome:
    source_id: str
    status: str                  # ok | failed
    summary: dict[str, Any]


@dataclass
class _Pending:
    source: Source
    end: Optional[SourceEnd] = None
    results: dict[str, dict[str, ClipResult]] = field(default_factory=lambda: {WRITTEN: {}, GATED: {}, FAILED: {}})

    def back(self) -> set[str]:
        return set().union(*(set(v) for v in self.results.values()))


class SourceLedger:
    """Driver bookkeeping: collects each source's items and seals it once all of them are back."""

    def __init__(self, sources: Iterable[Source], out_dir: str, fingerprints: Optional[dict[str, dict]] = None):
        self.out_dir = out_dir
        self.fingerprints = fingerprints or {}   # source_id -> what the source is made from (emo_data.resume)
        self.pending = {s.source_id: _Pending(s) for s in sources}
        self.sealed: list[SourceOutcome] = []

    def restart(self, source_ids: Iterable[str]) -> None:
        """Forget what came back for these sources (a new round redoes them from scratch)."""
        for source_id in source_ids:
            self.pending[source_id] = _Pending(self.pending[source_id].source)

    def add(self, source_id: str, kind: str, item: Any) -> Optional[SourceOutcome]:
        """Record one item; returns the source's outcome when this item completed it (and it is
        sealed). Items of a sealed source (a retried block repeating it) are ignored."""
        st = self.pending.get(source_id)
        if st is None or is_done(self.out_dir, source_id):
            return None
        if kind == END:
            st.end = item
        elif kind in st.results:
            st.results[kind][item.key] = item
        else:
            raise ValueError(f"unknown ledger item kind {kind!r}")
        if st.end is None or not set(st.end.keys) <= st.back():
            return None
        return self._seal(source_id, st)

    def _seal(self, source_id: str, st: _Pending) -> SourceOutcome:
        from .clip_work import order_rows, staged_totals

        end = st.end
        assert end is not None, "sealed before the source's end came back"
        failed = st.results[FAILED]
        failure = end.failure or next((failed[k].row for k in end.keys if k in failed), None)
        fingerprint = self.fingerprints.get(source_id)
        if failure is not None:
            summary = {"duration_s": end.summary.get("duration_s", 0.0)}
            seal_source(self.out_dir, source_id, [failure], summary, "failed", fingerprint)
            outcome = SourceOutcome(source_id, "failed", summary)
        else:
            clip_rows = [st.results[kind][k].row for k in end.keys for kind in (WRITTEN, GATED) if k in st.results[kind]]
            rows = order_rows(clip_rows + list(end.rows))
            summary = {**end.summary, **staged_totals(rows)}   # what the per-clip gates kept
            seal_source(self.out_dir, source_id, rows, summary, "ok", fingerprint)
            outcome = SourceOutcome(source_id, "ok", summary)
        self.sealed.append(outcome)
        return outcome


def seal_unfinished(source: Source, out_dir: str, reason: str, detail: str, fingerprint: Optional[dict] = None) -> None:
    """Seal a source that never finished (its worker died, the build stalled) as a failed row."""
    row = ManifestRow(
        status="failed", source_id=source.source_id, path=source.path, kind=source.kind, language=source.language,
        licence=source.licence, reason=reason, stage="worker", detail=detail,
    ).to_dict()
    clear_source(out_dir, source.source_id)
    seal_source(out_dir, source.source_id, [row], {"duration_s": 0.0}, "failed", fingerprint)
