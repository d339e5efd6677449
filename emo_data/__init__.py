"""EMO corpus building: stages and the shard schema (no Ray inside)."""
__version__ = "0.1.0"
