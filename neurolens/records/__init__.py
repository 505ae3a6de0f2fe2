"""The cache records: ONE reader/writer per record kind, keyed by the weights fingerprint and the layer, and
readable without loading a model (a record's attrs name its layer and weights). Pipelines, engines, labels
and serve read and write records only through these modules; each kind string is written once, here.

    keys       the neurons' basis id, a basis as keys see it, the cache from a folder
    scan       scan, scan-chunk, scan-checkpoint (ScanResult, finding the newest finished scan of a layer)
    shards     dataset-listing (tar shards) and scan-shard (a Ray scan's finished shards and groups)
    text       text-embeddings, text-directions, text-rankings
    visualize  visualize (feature visualizations; file names `unit<U>_<key>` / `sae-<name>_feature<F>_<key>`)
    maps       top-maps (activation maps of every unit's top-k images)
    labels     labels-nudenet (a dataset's NudeNet scores), nudenet and fv-nsfw (the blur policy's per-image
               scores)
    sae        sae (trained SAEs in SAELens's layout, beside the cache)

Every record is one HDF5 file written whole or not at all, and every one is opened through
neurolens.storage.cache (`Cache.read`, `read_attrs`, `written_at`, all via `open_record`).
"""
