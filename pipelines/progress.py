"""What a person sees of a Ray build while it runs: a bar of sealed sources, or (while Ray
Data's live per-stage display is on a terminal) one printed line per sealed source."""
from __future__ import annotations

import sys
from typing import Any


class SealProgress:
    """What the user sees of sealed sources: a tqdm bar, or (while Ray Data's per-stage display is
    live on a terminal) one printed line per sealed source."""

    def __init__(self, total: int, enabled: bool, stage_bars: bool):
        from tqdm import tqdm

        self.total, self.done, self.enabled, self.lines = total, 0, enabled, stage_bars
        self._bar = None if (stage_bars or not enabled) else tqdm(total=total, unit="video", desc="sources sealed", dynamic_ncols=True)

    def sealed(self, source_id: str, status: str, summary: dict[str, Any], totals: dict[str, float]) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix(clips=int(totals["clips"]), kept=f"{totals['kept_s']:.0f}s", failed=int(totals["failed"]))
            self._bar.update(1)
        elif self.enabled:
            clips = int(summary.get("clips", 0))
            what = f"{clips} clip{'' if clips == 1 else 's'}, {summary.get('kept_s', 0.0):.1f} s kept" if status == "ok" else "failed (see manifest)"
            print(f"sealed {self.done}/{self.total} {source_id}: {what}  (total {int(totals['clips'])} clips, "
                  f"{totals['kept_s']:.0f} s kept, {int(totals['failed'])} failed)", file=sys.stderr, flush=True)

    def __enter__(self) -> "SealProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
