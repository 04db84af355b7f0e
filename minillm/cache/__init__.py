"""KV caches: keep each layer's keys and values so a decode step only computes the new token.

Contiguous per-sequence caches come first; paged caches (a block manager, block tables,
slot mapping, prefix caching) build on the same idea with fixed-size blocks.
"""
