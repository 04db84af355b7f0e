"""KV caches: keep each layer's keys and values so a decode step only computes the new token.

Contiguous per-sequence caches come first (`kv_cache.py`); paged caches (a block manager,
block tables, slot mapping, prefix caching) build on the same idea with fixed-size blocks.
Every cache implements `KVCache`, the interface of the model's forward:
`model(input_ids, positions, cache)`.
"""

from minillm.cache.kv_cache import DynamicKVCache, KVCache, StaticKVCache

__all__ = ["DynamicKVCache", "KVCache", "StaticKVCache"]
