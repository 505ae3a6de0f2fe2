"""The Ray engine: a scan (and fused sweep) spread over Ray Data decode tasks and model actors: session (options,
connecting, the pipeline), workers (decode tasks, model actor), merge (the driver's merge of their results),
shards (planning and the cache records of finished shards), fused (a sweep's labels in the same pass)."""
