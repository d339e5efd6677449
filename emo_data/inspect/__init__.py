"""Inspection helpers behind ``emo-shards``: shard access, statistics, rendering."""
