"""Cache-or-compute jobs that tie the library together (one module per job)."""
