"""The Ray engine: a scan (and fused sweep) spread over Ray Data decode tasks and model actors."""
