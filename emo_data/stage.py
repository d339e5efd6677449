"""Stage protocol shared by every step of the corpus build.

A stage is a small object with a typed input and output: ``setup()`` loads models once per
worker, ``process(item)`` handles one item. Executors (``pipelines/``) only wire stages; they
never hold stage logic. A stage reports a bad input by raising :class:`StageError`, which the
executor turns into a manifest row (source, stage, reason) instead of crashing the build.
"""
from __future__ import annotations

from typing import Generic, TypeVar

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")


class StageError(Exception):
    """A per-item failure that belongs in the manifest, not in a traceback.

    ``reason`` is a short machine-readable code (e.g. ``no_video_stream``); the message is for
    people.
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


class Stage(Generic[InputT, OutputT]):
    name: str = "stage"

    def __init__(self) -> None:
        self._is_setup = False

    def setup(self) -> None:
        """Load models and other per-worker state. Called once before the first item."""

    def ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()
            self._is_setup = True

    def process(self, item: InputT) -> OutputT:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, item: InputT) -> OutputT:
        self.ensure_setup()
        return self.process(item)
