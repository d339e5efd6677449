"""Fault injection for the Ray build's tests: a worker that dies, a source that is slow.

``EMO_FAULT_CRASH_SOURCE=<source_id>[,after=<n>][,times=<k>,state=<dir>]`` (read by the driver, or
``ExecutorConfig.crash_on_source``): the video-pass worker calls ``os._exit(1)`` on that source
(after yielding ``n`` clips; only the first ``k`` times, counted by files in ``dir``), to exercise
the crash paths. ``EMO_FAULT_STALL_SOURCE=<source_id>:<s>``: it sleeps ``s`` seconds after each
clip of that source, so a test can kill a build while a source is half staged, or trip the
stall watchdog.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

FAULT_ENV = "EMO_FAULT_CRASH_SOURCE"
STALL_ENV = "EMO_FAULT_STALL_SOURCE"


@dataclass
class CrashFault:
    """FAULT INJECTION (tests only): ``<source_id>[,after=<n>][,times=<k>,state=<dir>]``."""

    source_id: str
    after_clips: int = 0
    times: Optional[int] = None
    state_dir: Optional[str] = None

    @classmethod
    def parse(cls, spec: Optional[str]) -> Optional["CrashFault"]:
        if not spec:
            return None
        source_id, *options = spec.split(",")
        values = dict(o.split("=", 1) for o in options)
        return cls(source_id, int(values.get("after", 0)), int(values["times"]) if "times" in values else None,
                   values.get("state"))

    def maybe_crash(self, source_id: str, clips_out: int) -> None:
        if source_id != self.source_id or clips_out != self.after_clips:
            return
        if self.times is not None and self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
            if len(os.listdir(self.state_dir)) >= self.times:
                return
            with open(os.path.join(self.state_dir, f"crash-{os.getpid()}-{time.time_ns()}"), "w"):
                pass
        os._exit(1)  # simulates a segfault in a native library


@dataclass
class StallFault:
    """``<source_id>:<seconds>``: the video worker sleeps after each clip of that source."""

    source_id: str
    seconds: float

    @classmethod
    def parse(cls, spec: Optional[str]) -> Optional["StallFault"]:
        if not spec:
            return None
        source_id, _, seconds = spec.rpartition(":")
        return cls(source_id, float(seconds or 0)) if float(seconds or 0) > 0 else None

    def after_clip(self, source_id: str) -> None:
        if source_id == self.source_id:
            time.sleep(self.seconds)
