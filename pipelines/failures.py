"""The failure-fraction check shared by both executors: a table of failed sources, and whether a
build failed more than ``max_failure_fraction`` of its sources (then ``emo-data build`` exits 1)."""
from __future__ import annotations

import os
from typing import Optional


def failure_table(out_dir: str, width: int = 60) -> str:
    """``source_id  stage  reason  detail`` for every failed source in ``manifest.parquet``."""
    import pandas as pd

    path = os.path.join(out_dir, "manifest.parquet")
    if not os.path.exists(path):
        return ""
    m = pd.read_parquet(path)
    failed = m[m.status == "failed"]
    if failed.empty:
        return ""
    rows = [("source_id", "stage", "reason", "detail")]
    for r in failed.itertuples():
        detail = (str(r.detail or "").strip().splitlines() or [""])[0]
        rows.append((str(r.source_id), str(r.stage or "-"), str(r.reason or "-"), detail[:width]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows)


def too_many_failures(sources: int, failed: int, max_fraction: Optional[float]) -> bool:
    if max_fraction is None or sources == 0:
        return False
    return failed / sources > max_fraction
