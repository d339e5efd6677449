"""Frame runs -> clips and rejected spans: the pure decision logic of the video pass.

The video pass judges every frame (one usable face? speech? does the face still fit the open
clip's crop region?) and feeds the verdicts to :class:`ClipSegmenter`, which says when a clip
opens, when it closes (and whether it is long enough to keep) and which runs of frames are
rejected for which reason. No pixels, no models: it is tested on its own.

Rules:
- a good frame extends the open clip, or opens one;
- a clip closes at a bad frame (``ended_by`` = its reason), at a scene cut, at the end, when it
  reaches ``max_frames`` (``max_length``) or when the face leaves its crop region
  (``face_left_crop``); in the last two cases the next clip opens on the same frame;
- up to ``max_gap`` consecutive *bridgeable* bad frames (a face that is there but briefly too
  small, or a breath without speech) inside a clip stay in it if good frames follow;
- a closed clip shorter than ``min_frames`` becomes a ``too_short`` span;
- consecutive bad frames with the same reason form one rejected span.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

TOO_SHORT = "too_short"


@dataclass(frozen=True)
class ClipOpened:
    index: int                 # first frame of the new clip


@dataclass(frozen=True)
class ClipClosed:
    first: int                 # frames [first, last] form the clip
    last: int
    ended_by: str

    @property
    def length(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class FramesRejected:
    reason: str
    first: int
    last: int
    detail: str = ""


Event = Union[ClipOpened, ClipClosed, FramesRejected]


class ClipSegmenter:
    def __init__(self, min_frames: int, max_frames: int, max_gap: int = 0,
                 bridgeable: tuple[str, ...] = ()):
        if not 1 <= min_frames <= max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        self.min_frames, self.max_frames, self.max_gap = int(min_frames), int(max_frames), int(max_gap)
        self.bridgeable = tuple(bridgeable)
        self._first: Optional[int] = None         # open clip
        self._last_good = -1
        self._pending: list[tuple[int, str]] = []  # tolerated bad frames after _last_good
        self._run: Optional[list] = None            # [reason, first, last] of the open rejected run

    @property
    def is_open(self) -> bool:
        return self._first is not None

    @property
    def open_first(self) -> Optional[int]:
        return self._first

    # ------------------------------------------------------------------ inputs
    def frame(self, index: int, reason: Optional[str], fits: bool = True, usable: bool = False) -> tuple[list[Event], bool]:
        """One frame's verdict (``reason`` None = good). ``fits``: its face is inside the open
        clip's crop region; ``usable``: a bad frame that still has the one face with landmarks
        (it may be bridged). Returns the events and whether the frame joins the open clip."""
        events: list[Event] = []
        if reason is None:
            if self._first is not None:
                if not fits:
                    events += self._close("face_left_crop")
                elif index - self._first + 1 > self.max_frames:
                    events += self._close("max_length")
            if self._first is None:
                events += self._flush_run()
                self._first = index
                events.append(ClipOpened(index))
            self._pending = []
            self._last_good = index
            return events, True
        if (self._first is not None and usable and reason in self.bridgeable and len(self._pending) < self.max_gap
                and index - self._first + 1 <= self.max_frames):
            self._pending.append((index, reason))
            return events, True
        if self._first is not None:
            events += self._close(reason)
        events += self._reject(reason, index)
        return events, False

    def cut(self, ended_by: str = "scene_cut") -> list[Event]:
        """A scene cut before the next frame: the open clip ends here."""
        return self._close(ended_by) if self._first is not None else []

    def finish(self) -> list[Event]:
        events = self._close("end_of_video") if self._first is not None else []
        return events + self._flush_run()

    # ------------------------------------------------------------------ internals
    def _close(self, ended_by: str) -> list[Event]:
        assert self._first is not None, "no clip is open"
        first, last = self._first, self._last_good
        self._first = None
        events: list[Event] = []
        if last - first + 1 >= self.min_frames:
            events.append(ClipClosed(first, last, ended_by))
        else:
            events.append(FramesRejected(TOO_SHORT, first, last,
                                         f"{last - first + 1} good frames < {self.min_frames}; ended by {ended_by}"))
        pending, self._pending = self._pending, []
        for index, reason in pending:   # bridged frames that no good frame followed
            events += self._reject(reason, index)
        return events

    def _reject(self, reason: str, index: int) -> list[Event]:
        events: list[Event] = []
        run = self._run
        if run is not None and (run[0] != reason or run[2] != index - 1):
            events += self._flush_run()
            run = None
        if run is None:
            self._run = [reason, index, index]
        else:
            run[2] = index
        return events

    def _flush_run(self) -> list[Event]:
        if self._run is None:
            return []
        reason, first, last = self._run
        self._run = None
        return [FramesRejected(reason, first, last)]
