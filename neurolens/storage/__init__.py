"""Bytes on disk: whole-or-nothing file writes and the HDF5 cache store."""
