"""Data: exact format readers, the synthetic generator, storage, shards and the shard loader."""
