"""How a scan runs: in this process (neurolens.engines.local, today's engine) or on Ray Data (`engines.ray`).
Every engine produces the same mergeable statistics and the same cache records, so everything that
reads a scan (samples, text, sweep, figure, grid, serve) works whatever engine made it."""
