"""Moved to :mod:`emo_data.shards` (the shard contract, codecs, I/O and validator). This name stays
so that code written against it (``from emo_data.schema import decode_sample``) keeps working."""
from .shards import *  # noqa: F403
from .shards import __all__  # noqa: F401
