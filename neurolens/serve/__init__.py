"""The Microscope in the browser: a local web app over the HDF5 cache (`neurolens serve`) and the same
pages as static files (`neurolens site`). Reads the cache through neurolens.storage.cache; only live probes
compute, and nothing here writes to the cache. Every image is blurred through neurolens.labels.policy."""
