"""Benchmark of the web app on a layer of RN50x4's shape (image_block_4_5: 2560 units, 9 x 9 maps, top 32):
time to first render of the layer page in headless Chromium, and the server's latency for cached thumbnails
under concurrent clients; and the same layer's features of an 8x TopK SAE (20480 features, issue 13): the
feature layer page's first render, and the server time of feature and neuron unit pages (the first of each
loads and hashes the SAE's weights for the feature <-> neuron links). Prints ONE JSON line.

The cache is synthetic (no model needed): generated JPEG images, scan / scan-chunk / text-ranking / sweep
records with the layout the real jobs write, through neurolens.storage.cache, and for the features a random SAE in
the registry (SAELens layout) with records keyed by its basis id. Traffic goes to 127.0.0.1 only, and
every loop is bounded in count and time.

    python scripts/bench_serve.py                       # 2560 units + 20480 features, 1000 images, 20 clients x 200
    python scripts/bench_serve.py --quick               # 300 images, 5120 features, 20 x 25 requests, 2 page loads
    python scripts/bench_serve.py --features 0          # neurons only (the figures before SAE features)
    python scripts/bench_serve.py --keep outputs/bench-serve-cache    # keep the synthetic cache

Goal (issue 11): the layer page renders in 1 s or less, and thumbnails stay at p95 <= 50 ms.
"""
import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import serve_fixture  # noqa: E402  (start_server / stop_server)

from neurolens.storage.cache import Cache, Record  # noqa: E402

FINGERPRINT = "bench0123456789abcdef0123456789ab"
LAYER = "image_block_4_5"
SAE_NAME = "bench8x"
WORDS = ("beach dog portrait street night forest car bridge kitchen flower mountain crowd river snow church "
         "train market boat garden library desert stadium castle lake museum").split()


def make_images(folder: Path, count: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(count):
        base = rng.integers(0, 255, 3)
        image = Image.new("RGB", (size + 32, size), tuple(int(v) for v in base))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, size, 2)
            r = int(rng.integers(10, size // 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=88)
        keys.append(str(path.resolve()))
    return keys


def make_cache(root: Path, images: int, units: int, top_k: int, seed: int, features: int = 0):
    """A cache whose layer looks like RN50x4's image_block_4_5 after scan, text and sweep; with features > 0,
    also an SAE of that many features on it and the same records of its features. Returns (cache root, the
    features' basis id or None)."""
    rng = np.random.default_rng(seed)
    cache = Cache(root / "cache")
    keys = make_images(root / "images", images, 288, seed)
    maxima = rng.gamma(2.0, 0.5, size=(images, units)).astype(np.float32)
    write_layer_records(cache, rng, keys, maxima, top_k, tag="bench", basis={})
    if features <= 0:
        return cache.root, None
    basis_id = make_sae(cache, units, features, seed)
    active = rng.random((images, features)) < 0.05          # a feature fires on few images
    feature_maxima = (rng.gamma(2.0, 0.5, size=(images, features)) * active).astype(np.float32)
    write_layer_records(cache, rng, keys, feature_maxima, top_k, tag="benchsae",
                        basis={"basis": basis_id, "basis_name": SAE_NAME,
                               "basis_info": {"basis": basis_id, "kind": "sae", "name": SAE_NAME, "units": features}})
    return cache.root, basis_id


def make_sae(cache: Cache, units: int, features: int, seed: int) -> str:
    """A random TopK SAE (unit-norm decoder rows) saved in the registry; returns its basis id."""
    import torch
    from neurolens.sae.basis import weights_digest
    from neurolens.sae.io import save_sae
    from neurolens.sae.model import SaeConfig, SparseAutoencoder
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=units, d_sae=features, k=32))
    with torch.no_grad():
        decoder = torch.randn(features, units, generator=generator)
        sae.W_dec.copy_(decoder / decoder.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
    save_sae(sae, cache.folder("sae", FINGERPRINT, LAYER) / SAE_NAME)
    return f"sae-{SAE_NAME}-{weights_digest(sae)[:12]}"


def write_layer_records(cache: Cache, rng, keys, maxima: np.ndarray, top_k: int, tag: str, basis: dict) -> None:
    """Scan, scan chunk, text ranking, text directions and sweep records of one basis of the layer (basis: the
    attrs that name an SAE's features; {} for the neurons)."""
    images, units = maxima.shape
    grid = (9, 9)
    order = np.argsort(-maxima, axis=0, kind="stable")[:top_k].T            # (U, k) best first
    top_values = np.take_along_axis(maxima.T, order, axis=1).astype(np.float32)
    cells = rng.integers(0, 9, size=(units, top_k, 2)).astype(np.int32)
    key = f"{tag}scan"
    chunk = f"{key}-{0:010d}"
    cache.write(cache.path("scan-chunk", FINGERPRINT, LAYER, chunk),
                Record(arrays={"indices": np.arange(images, dtype=np.int64), "maxima": maxima},
                       attrs={"first": 0, "stop": images, **basis}))
    scan_arrays = {"top_values": top_values, "top_indices": order.astype(np.int64), "top_cells": cells,
                   "mean": maxima.mean(0).astype(np.float64), "var": maxima.var(0).astype(np.float64),
                   "m2": (maxima.var(0) * images).astype(np.float64),
                   "mean_map": rng.random((units, *grid), dtype=np.float32),
                   "keys": np.asarray(keys, dtype=object), "skipped_indices": np.zeros(0, np.int64)}
    scan_attrs = {"complete": True, "layer": LAYER, "channels": units, "top_k": top_k, "count": images,
                  "items": images, "skipped": 0, "grid": list(grid), "image_size": 288,
                  "mean_rgb": [0.48, 0.46, 0.41], "std_rgb": [0.27, 0.26, 0.28], "precision": "fp32",
                  "embeddings": True, "chunks": [chunk], "resumed_from": [], "dataset": f"synthetic ({images} images)",
                  "dataset_identity": "bench", "model": "RN50x4", "pretrained": "synthetic", "fingerprint": FINGERPRINT,
                  **basis}
    scan_path = cache.write(cache.path("scan", FINGERPRINT, LAYER, key), Record(scan_arrays, scan_attrs))
    text_k = 30
    texts = np.asarray([[" ".join(rng.choice(WORDS, 2)) for _ in range(text_k)] for _ in range(units)], dtype=object)
    cache.write(cache.path("text-rankings", FINGERPRINT, LAYER, f"{tag}text"),
                Record(arrays={"top_indices": rng.integers(0, 5000, (units, text_k)),
                               "top_scores": np.sort(rng.random((units, text_k), dtype=np.float32))[:, ::-1].copy(),
                               "texts": texts},
                       attrs={"layer": LAYER, "reference": f"scan-mean-{tag}", "vocab_source": "synthetic words",
                              "top_k": text_k, **basis}))
    cache.write(cache.path("text-directions", FINGERPRINT, LAYER, f"{tag}dir"),
                Record(arrays={"directions": rng.normal(size=(units, 640)).astype(np.float32)},
                       attrs={"layer": LAYER, "reference": f"scan-mean-{tag}", **basis}))
    correlation = np.clip(rng.normal(0.0, 0.12, units), -1, 1).astype(np.float32)
    flagged = correlation >= np.quantile(correlation, 0.97)
    cache.write(cache.path("sweep", FINGERPRINT, LAYER, f"{tag}sweep"),
                Record(arrays={"correlation": correlation, "top_nsfw_share": rng.random(units, dtype=np.float32),
                               "text_nsfw_share": rng.random(units, dtype=np.float32), "flagged": flagged,
                               "image_scores": rng.random(images, dtype=np.float32),
                               "clip_scores": rng.random(images, dtype=np.float32),
                               "caption_match": np.zeros(images, bool),
                               "text_scores": rng.random((units, text_k), dtype=np.float32),
                               "text_nsfw": rng.random((units, text_k)) < 0.05},
                       attrs={"layer": LAYER, "rule": {"min_correlation": 0.2, "min_top_share": 0.5,
                                                       "min_text_share": 0.3, "noise_z": 3.0, "text_k": 10},
                              "n_images": images, "correlation_bar": 0.2, "scan_record": str(scan_path),
                              "model": "RN50x4", "pretrained": "synthetic", "fingerprint": FINGERPRINT, **basis}))


def get(port: int, path: str, connection=None):
    """(status, seconds, connection) of one GET over a kept-alive connection."""
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    return response.status, time.perf_counter() - started, connection


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), a measure the machine's other load hardly moves."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else float("nan")


def unit_page_times(port: int, layer_id: str, units: int, count: int, deadline: float):
    """Seconds to GET `count` distinct unit pages of a layer id, spread over its units (the first is cold)."""
    times, connection = [], None
    for unit in np.linspace(0, units - 1, count).astype(int):
        if time.monotonic() > deadline:
            break
        status, seconds, connection = get(port, f"/L/{layer_id}/u/{int(unit)}.html", connection)
        if status != 200:
            raise SystemExit(f"unit page {layer_id}/{unit} answered {status}")
        times.append(seconds)
    if connection is not None:
        connection.close()
    return times


def page_renders(url: str, loads: int, deadline: float, wait_thumbs: bool = True):
    """[(first tiles in the DOM, first contentful paint, first screenful of thumbnails loaded)] in ms
    (wait_thumbs=False: the last is the time the tiles were in the DOM, thumbnails not awaited)."""
    from playwright.sync_api import sync_playwright
    results = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                             args=["--no-sandbox"])
        for _ in range(loads):
            if time.monotonic() > deadline:
                break
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("() => window.__firstRender !== undefined", timeout=30_000)
            first = page.evaluate("() => window.__firstRender")
            paint = page.evaluate("() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime")
            if wait_thumbs:
                page.wait_for_function("""() => [...document.querySelectorAll('#grid .tile img')].filter(i => {
                    const r = i.getBoundingClientRect(); return r.top < innerHeight; }).every(i => i.complete)""",
                                       timeout=60_000)
            screenful = page.evaluate("() => performance.now()")
            tiles = page.evaluate("() => +document.getElementById('grid').dataset.total")
            results.append((first, paint, screenful, tiles))
            context.close()
        browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--units", type=int, default=2560)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200, help="thumbnail requests per client")
    parser.add_argument("--loads", type=int, default=6, help="layer page loads (the first is cold)")
    parser.add_argument("--features", type=int, default=20480, help="SAE features on the layer (0: neurons only)")
    parser.add_argument("--unit-pages", type=int, default=20, help="unit pages timed per basis (distinct units)")
    parser.add_argument("--seconds", type=float, default=600, help="time bound of the whole benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", default=None, help="build the synthetic cache here and keep it")
    args = parser.parse_args()
    if args.quick:
        args.images, args.requests, args.loads = 300, 25, 2
        args.features, args.unit_pages = min(args.features, 5120), min(args.unit_pages, 6)
    deadline = time.monotonic() + args.seconds
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-serve-"))
    started = time.perf_counter()
    cache_root, basis_id = make_cache(root, args.images, args.units, args.top_k, seed=0, features=args.features)
    build_s = time.perf_counter() - started
    server = serve_fixture.start_server(cache_root)
    try:
        layer_id = f"{FINGERPRINT[:16]}-{LAYER}"
        port = server.port
        # the layer page in Chromium: the first load is cold (the server builds the page), the rest warm
        renders = page_renders(f"{server.base}/L/{layer_id}/index.html", args.loads, deadline)
        # every thumbnail once (the server makes and keeps it), then the measured load on cached thumbnails
        cold = []
        connection = None
        for unit in range(args.units):
            if time.monotonic() > deadline:
                break
            status, seconds, connection = get(port, f"/img/{layer_id}/tile/{unit}.jpg", connection)
            cold.append(seconds)
        connection.close()
        latencies, failures = [], []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            own, bad, conn = [], 0, None
            for _ in range(args.requests):
                if time.monotonic() > deadline:
                    break
                try:
                    status, seconds, conn = get(port, f"/img/{layer_id}/tile/{int(rng.integers(args.units))}.jpg", conn)
                except (OSError, http.client.HTTPException):
                    bad, conn = bad + 1, None
                    continue
                own.append(seconds)
                bad += status != 200
            if conn is not None:
                conn.close()
            with lock:
                latencies.extend(own)
                failures.append(bad)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
        cpu_before = cpu_seconds(server.process.pid)
        load_started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        load_s = time.perf_counter() - load_started
        server_cpu_s = cpu_seconds(server.process.pid) - cpu_before
        # unit pages (each built once, then kept by the server: distinct units, the first of a basis is cold)
        unit_pages = {"neurons": unit_page_times(port, layer_id, args.units, args.unit_pages, deadline)}
        feature_renders = []
        if basis_id is not None:
            feature_id = f"{layer_id}~{basis_id}"
            unit_pages["features"] = unit_page_times(port, feature_id, args.features, args.unit_pages, deadline)
            feature_renders = page_renders(f"{server.base}/L/{feature_id}/index.html", args.loads, deadline,
                                           wait_thumbs=False)
    finally:
        serve_fixture.stop_server(server)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    warm = renders[1:] or renders
    ms = 1000.0
    print(json.dumps({
        "benchmark": "serve", "units": args.units, "images": args.images, "top_k": args.top_k,
        "layer_page_cold_first_render_ms": round(renders[0][0], 1) if renders else None,
        "layer_page_first_render_ms": round(statistics.median(r[0] for r in warm), 1) if warm else None,
        "layer_page_first_paint_ms": round(statistics.median(r[1] or 0 for r in warm), 1) if warm else None,
        "layer_page_screenful_loaded_ms": round(statistics.median(r[2] for r in warm), 1) if warm else None,
        "page_loads": len(renders), "tiles_listed": renders[0][3] if renders else None,
        "thumb_cold_p50_ms": round(percentile(cold, 0.5) * ms, 2), "thumb_cold_p95_ms": round(percentile(cold, 0.95) * ms, 2),
        "clients": args.clients, "thumb_requests": len(latencies), "thumb_failures": int(sum(failures)),
        "thumb_p50_ms": round(percentile(latencies, 0.5) * ms, 2), "thumb_p95_ms": round(percentile(latencies, 0.95) * ms, 2),
        "thumb_per_s": round(len(latencies) / load_s, 1) if load_s > 0 else None,
        "server_cpu_ms_per_thumb": round(1000 * server_cpu_s / max(len(latencies), 1), 3),
        "features": args.features if basis_id is not None else 0,
        "feature_layer_page_cold_first_render_ms": round(feature_renders[0][0], 1) if feature_renders else None,
        "feature_layer_page_first_render_ms": (round(statistics.median(r[0] for r in (feature_renders[1:] or
                                                                                       feature_renders)), 1)
                                               if feature_renders else None),
        "feature_tiles_listed": feature_renders[0][3] if feature_renders else None,
        **{f"{name}_unit_page_first_ms": round(times[0] * ms, 1) for name, times in unit_pages.items() if times},
        **{f"{name}_unit_page_p50_ms": round(statistics.median(times[1:]) * ms, 1)
           for name, times in unit_pages.items() if len(times) > 1},
        "cache_build_s": round(build_s, 1), "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2),
        "machine": platform.machine(), "client": "python http.client threads, keep-alive, same machine"}))


if __name__ == "__main__":
    main()
