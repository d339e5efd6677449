"""Small filesystem helpers every writer shares: atomic JSON (write a temporary file, optionally
fsync it, rename), so a crash never leaves a half-written marker, index or build summary."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np


def _json_default(obj: Any):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path: str, payload: Any, indent: Optional[int] = None, sort_keys: bool = False,
                      fsync: bool = False, newline: bool = False, default=_json_default,
                      tmp_path: Optional[str] = None) -> None:
    """Write ``payload`` as JSON to ``path`` through ``path + '.tmp'`` (or ``tmp_path``: one per
    process where two may write the same file) and a rename. ``fsync`` when the file is a
    durability point (a done marker written after the data it vouches for)."""
    tmp = tmp_path or path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=indent, sort_keys=sort_keys, default=default)
        if newline:
            fh.write("\n")
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def update_json_atomic(path: str, key: str, value: Any, indent: Optional[int] = 1) -> bool:
    """Set one top-level key of an existing JSON file, atomically; False if the file is absent
    or unreadable (nothing is written then)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    data[key] = value
    write_json_atomic(path, data, indent=indent)
    return True
