"""``tplr shards ...``: preparing token shards from text (sources, tokenizers, packing, atomic
writers), converting llm.c shards, inspecting and uploading a dataset folder."""
