"""One module per peer server; each runs as its own process (``python -m benchmarks.servers.X``)."""
