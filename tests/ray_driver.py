"""One Ray scan in a driver process of its own (the killed-driver and memory tests run it as a subprocess):
joins the Ray cluster the test started, scans, prints one JSON line."""
import argparse
import json
import resource

import torch

from neurolens.engines.ray.session import RayOptions
from neurolens.models.build import load_clip
from neurolens.pipelines.scan import run_ray_scan
from neurolens.storage.cache import Cache


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--address", "--dataset", "--cache", "--layer"):
        parser.add_argument(name, required=True)
    parser.add_argument("--model", default="nl-tiny-RN")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--batches-per-call", type=int, default=8)
    parser.add_argument("--compact-every", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = load_clip(args.model, "none", device="cpu")
    result = run_ray_scan(clip, args.layer, args.dataset, top_k=args.top_k, cache=Cache(args.cache),
                          ray=RayOptions(address=args.address, actors=args.actors, batch_size=args.batch_size,
                                         batches_per_call=args.batches_per_call, compact_every=args.compact_every,
                                         cpus_per_actor=0.5))
    attrs = Cache(args.cache).read(result.path).attrs
    print(json.dumps({"count": result.count, "forwarded": attrs["forwarded"],
                      "driver_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "actor_peak_rss": attrs["actor_peak_rss"]}), flush=True)


if __name__ == "__main__":
    main()
