"""Token shard formats, the memory-mapped dataset, sampler, batch loader and shard manager;
the `tplr shards` tools are in :mod:`tplr.data.tools`."""
