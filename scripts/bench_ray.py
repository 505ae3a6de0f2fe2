"""Benchmark of `scan --engine ray` against the in-process scan: prints ONE JSON line.

For each model (a small one and RN50x4, random weights, at small N) on the same img2dataset shards
(photo-like JPEGs about --image-size px wide, bench_scan.write_shards; --shard-rows rows per shard):

  <m>_single_img_s        images/s of run_scan (DataLoader workers decode), model loaded, fresh cache
  <m>_ray1_img_s          images/s of run_ray_scan with 1 actor, wall clock from the call to the record
                          (Ray Data start-up, actor start and model shipping included; Ray itself already up)
  <m>_ray2_img_s          the same with 2 actors
  <m>_overhead_1_actor_wall   single_img_s / ray1_img_s - 1 (goal <= 0.15; start-up included, so it shrinks
                          as N grows)
  <m>_driver_peak_rss_mb_{single,ray1,ray2}   peak RSS of the process that called the scan
  <m>_actor_peak_rss_mb_{ray1,ray2}           the largest peak RSS a model actor reported
  <m>_laion400m_device_hours  413e6 / single_img_s / 3600: EXTRAPOLATED hours of LAION-400M on one device like
                          this run's (one GPU with --device cuda), from the MEASURED in-process rate, which is
                          what one actor runs on its device; divide by the number of devices (assumes linear
                          scaling and that decoding keeps up: see decode_img_s_per_core)
  <m>_decode_img_s_per_core   images/s one CPU core decodes and preprocesses to the model's input size
                          (datasets.decode.decode_item, process time, the same JPEGs): CPU cores a GPU needs =
                          single_img_s / this
  merge_ms                driver CPU time to merge one actor call's partial result of the large model's
                          layer (what caps the total rate at rows-per-call / merge_ms)

Each scan runs in a fresh subprocess (so peak RSS is its own); the Ray drivers join one local Ray started
here on loopback (--ray-cpus CPUs, GPUs as found). Single-process and actors get the same torch threads
(--threads; an actor reserves at most (CPUs - 1) / actors, so a CPU stays free for decode tasks) and batch
size; the in-process scan decodes with --workers processes, Ray with decode tasks on the CPUs the actors
leave free.

  python scripts/bench_ray.py --quick                                   # a minute or two on a laptop CPU
  python scripts/bench_ray.py --device cuda --large-n 4096 --small-n 8192 --batch-size 128 --threads 4
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
LAION_400M = 413_000_000

from bench_scan import write_shards  # noqa: E402  (the same photo-like JPEGs and shards as bench_scan.py)


def child(args) -> None:
    """One scan in this fresh process; prints {seconds, images, driver/actor peak RSS}."""
    import torch
    torch.set_num_threads(args.threads)
    from neurolens.models.build import load_clip
    from neurolens.storage.cache import Cache
    clip = load_clip(args.model, "none", device="cpu" if args.engine == "ray" else args.device)
    cache = Cache(args.cache)
    start = time.perf_counter()
    if args.engine == "process":
        from neurolens.pipelines.scan import run_scan
        result = run_scan(clip, args.layer, args.data, top_k=args.top_k, batch_size=args.batch_size,
                          workers=args.workers, cache=cache, force=True, decoder=args.decode)
    else:
        from neurolens.engines.ray.session import RayOptions
        from neurolens.pipelines.scan import run_ray_scan
        result = run_ray_scan(clip, args.layer, args.data, top_k=args.top_k, cache=cache, force=True,
                              device=args.device, decoder=args.decode,
                              ray=RayOptions(address=args.address, actors=args.actors, batch_size=args.batch_size,
                                             cpus_per_actor=float(args.cpus_per_actor)))
    seconds = time.perf_counter() - start
    attrs = cache.read(result.path).attrs
    print(json.dumps({"seconds": seconds, "images": result.count,
                      "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "actor_peak_rss_mb": attrs.get("actor_peak_rss", 0) / 2 ** 20}))


def cpus_per_actor(args, actors: int) -> float:
    """--threads CPUs, but at most (CPUs - 1) / actors: at least one CPU stays free for the decode tasks."""
    return min(float(args.threads), max(0.25, (args.cluster_cpus - 1) / actors))


def run_child(args, model: str, layer: str, data: Path, cache: Path, engine: str, actors: int = 1,
              address: str = "") -> dict:
    command = [sys.executable, __file__, "--child", "--model", model, "--layer", layer, "--data", str(data),
               "--cache", str(cache), "--engine", engine, "--actors", str(actors), "--address", address,
               "--device", args.device, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--top-k", str(args.top_k), "--decode", args.decode,
               "--cpus-per-actor", str(cpus_per_actor(args, actors))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{engine} scan of {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_rate(data: Path, image_size: int, items: int = 64) -> float:
    """Images/s of decode + preprocess on one core (process time of this single-threaded loop)."""
    from neurolens.datasets.tar import list_tar_shard
    from neurolens.datasets.decode import decode_item
    dataset = list_tar_shard(str(sorted(data.glob("*.tar"))[0])).dataset()
    count = min(items, len(dataset))
    start = time.process_time()
    for index in range(count):
        decode_item(dataset, index, image_size)
    return count / max(time.process_time() - start, 1e-9)


def merge_ms(model: str, layer: str, batch: int, top_k: int) -> float:
    """Driver CPU ms to load and merge one partial result (what merge.ShardMerger does per actor call)."""
    import pickle
    import torch
    from neurolens.models.build import load_clip
    from neurolens.models.layer_table import resolve_layer
    from neurolens.activations.stats import ScanStats
    torch.set_num_threads(1)
    spec = resolve_layer(load_clip(model, "none", device="cpu"), layer)
    part = ScanStats.empty(spec, top_k)
    part.add(torch.randn(batch, spec.channels, max(1, spec.height), max(1, spec.width)), torch.arange(batch))
    blob = pickle.dumps({"state": part.state_dict()}, protocol=pickle.HIGHEST_PROTOCOL)
    total = ScanStats.empty(spec, top_k)
    start = time.process_time()
    for _ in range(10):
        other = ScanStats.empty(spec, top_k)
        other.load_state_dict(pickle.loads(blob)["state"])
        total.merge(other)
    return (time.process_time() - start) / 10 * 1000


def measure(args, name: str, model: str, layer: str, n: int, tmp: Path, address: str) -> dict:
    from neurolens.models.build import load_clip
    data = tmp / f"data-{name}"
    write_shards(data, n, args.shard_rows, args.image_size)
    out = {f"{name}_model": model, f"{name}_layer": layer, f"{name}_n": n}
    size = load_clip(model, "none", device="cpu").image_size
    out[f"{name}_decode_img_s_per_core"] = decode_rate(data, size)
    single = run_child(args, model, layer, data, tmp / f"c-{name}-single", "process")
    out[f"{name}_single_img_s"] = single["images"] / single["seconds"]
    out[f"{name}_driver_peak_rss_mb_single"] = single["driver_peak_rss_mb"]
    for actors in (1, 2):
        ray_run = run_child(args, model, layer, data, tmp / f"c-{name}-ray{actors}", "ray", actors, address)
        out[f"{name}_ray{actors}_img_s"] = ray_run["images"] / ray_run["seconds"]
        out[f"{name}_driver_peak_rss_mb_ray{actors}"] = ray_run["driver_peak_rss_mb"]
        out[f"{name}_actor_peak_rss_mb_ray{actors}"] = ray_run["actor_peak_rss_mb"]
    out[f"{name}_overhead_1_actor_wall"] = out[f"{name}_single_img_s"] / out[f"{name}_ray1_img_s"] - 1
    out[f"{name}_laion400m_device_hours"] = LAION_400M / out[f"{name}_single_img_s"] / 3600
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-model", default="nl-toy-RN")
    parser.add_argument("--small-layer", default="image_block_3_0")
    parser.add_argument("--small-n", type=int, default=2048)
    parser.add_argument("--large-model", default="RN50x4")
    parser.add_argument("--large-layer", default="image_block_4_5")
    parser.add_argument("--large-n", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per img2dataset shard")
    parser.add_argument("--image-size", type=int, default=320, help="mean width of the synthetic JPEGs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (actors get a GPU each where found)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scan / CPUs per actor")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the in-process scan")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per scan")
    parser.add_argument("--decode", default="auto", help="auto, pil or torchvision (neurolens scan --decode)")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script end to end")
    parser.add_argument("--skip-large", action="store_true")
    for hidden in ("--child", "--engine", "--model", "--layer", "--data", "--cache", "--address", "--actors",
                   "--cpus-per-actor"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, **({"action": "store_true"} if hidden == "--child" else {}))
    args = parser.parse_args()
    if args.child:
        args.actors = int(args.actors)
        args.address = args.address or None
        child(args)
        return
    if args.quick:
        args.small_model, args.small_n, args.large_n, args.shard_rows = "nl-tiny-RN", 96, 8, 32
        args.image_size, args.batch_size = 128, 8

    from neurolens.engines.ray.session import loopback_only
    ray = loopback_only()
    context = ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="error")
    address = context.address_info["gcs_address"]
    args.cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    report = {"device": args.device, "threads": args.threads, "batch_size": args.batch_size,
              "cpus_per_actor_1": cpus_per_actor(args, 1), "cpus_per_actor_2": cpus_per_actor(args, 2),
              "workers": args.workers, "ray_cpus": int(ray.cluster_resources().get("CPU", 0)),
              "ray_gpus": int(ray.cluster_resources().get("GPU", 0)), "shard_rows": args.shard_rows,
              "image_size": args.image_size, "load_avg_1min": os.getloadavg()[0]}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            report.update(measure(args, "small", args.small_model, args.small_layer, args.small_n, tmp, address))
            if not args.skip_large:
                report.update(measure(args, "large", args.large_model, args.large_layer, args.large_n, tmp, address))
                report["merge_ms"] = merge_ms(args.large_model, args.large_layer, args.batch_size * 8, args.top_k)
    finally:
        ray.shutdown()
    report["load_avg_1min_end"] = os.getloadavg()[0]
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}))


if __name__ == "__main__":
    main()
