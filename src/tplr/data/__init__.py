"""Token shard formats, memory-mapped dataset, sampler, batch loader and shard manager."""
