"""Moved to :mod:`emo_data.shards.codecs` (the one H.264 writer). This name stays for code
written against it."""
from .shards.codecs import write_mp4  # noqa: F401
from .shards.contract import SAMPLE_RATE  # noqa: F401
