"""Image datasets: folders, tables, tar shards and the built-in samples, with safe decoding."""
