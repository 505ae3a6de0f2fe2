"""The cache records: ONE reader/writer per record kind, keyed by weights fingerprint + layer, readable
without a model (sweep.py: the sweep and sweep-fused records)."""
