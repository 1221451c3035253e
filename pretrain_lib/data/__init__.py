"""Data pipeline: corpus → clean/dedup → tokenizer → packing → token shards → loaders."""
