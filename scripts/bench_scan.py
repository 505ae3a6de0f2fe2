"""Benchmark of `neurolens scan`: prints ONE JSON line.

  scan_img_s     images/s of run_scan (decoding in DataLoader workers, all units, top-k, moments, mean map,
                 per-image maxima written to the cache), model already loaded, fresh cache
  forward_img_s  images/s of a bare no-grad forward to the same layer (forward_to) on the same images,
                 already decoded and preprocessed in memory, same batch size, same process
  ratio          scan_img_s / forward_img_s (goal >= 0.9)
  wall_s         seconds of that scan (scan_img_s = n / wall_s)
  stages         busy seconds per stage of that scan (neurolens.engines.timing): decode, resize, collate (in the
                 DataLoader workers, timed there and shipped back with each batch; with --decode torchvision on
                 a GPU, decode and resize run on the device), h2d (copy to the device), forward, stats (top-k,
                 moments, mean map of every unit), writes (chunk records and checkpoints; includes the wait at the
                 once-per-chunk copy to the host). CUDA events time device work, perf_counter host work.
                 Stages OVERLAP (workers decode while the model runs; copies run one batch ahead), so they add
                 up to more than wall_s: the largest one names the bottleneck
  decode         the decoder the scan used (--decode resolved: pil or torchvision)
  null_img_s     (--null-model) images/s of the same run_scan with the forward replaced by a no-op returning zeros
                 of the layer's shape: everything else (decode, resize, collate, copies, statistics, writes) runs,
                 so this is the input pipeline's ceiling; null_stages are its busy seconds per stage
  null_img_s_per_worker   null_img_s / --workers: the ceiling one decode worker gives (the CPU cores a GPU
                 needs = forward_img_s / this)
  rss_n_mb, rss_10n_mb   peak RSS (ru_maxrss of the scanning process; DataLoader workers are separate processes,
                 their peak is rss_workers_*) of a scan of N and of 10N images, each in a fresh subprocess
                 (goal: within 15%)
  bf16_speedup   scan_img_s(bf16 autocast) / scan_img_s(fp32) on --bf16-n images of --bf16-model
  bf16_topk_overlap  mean over units of |top-k(bf16) & top-k(fp32)| / k (same images, same k)
  load_avg       the 1-minute load average when the line is printed

Images are N synthetic photo-like JPEGs (quality 90; LAION-like sizes: widths around --image-size, common aspect
ratios; smooth gradients, texture, grain and soft shapes) written to a temp folder (--input folder) or to
img2dataset-style shards (--input tar: NNNNN.tar with KEY.jpg/.txt/.json and NNNNN.parquet), so decoding is
real. Defaults: RN50x4 random weights (288 px input) on image_block_4_5, as in the issue; use the flags to run it
smaller.

  python scripts/bench_scan.py --n 32
  python scripts/bench_scan.py --model nl-toy-RN --layer image_block_3_0 --n 64   # seconds
  python scripts/bench_scan.py --device cuda --n 4096 --batch-size 256 --workers 15 --null-model --skip-rss \\
         --skip-bf16 --decode torchvision
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np

ASPECTS = (4 / 3, 3 / 2, 1.0, 3 / 4, 16 / 9, 2 / 3, 5 / 4)      # width / height, the common photo ratios


def photo_jpeg(seed: int, width: int) -> bytes:
    """One photo-like JPEG (quality 90) about `width` px wide (LAION-like: +-20 %, a common aspect ratio)."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    width = max(16, int(width * rng.uniform(0.8, 1.2)))
    height = max(16, int(width / ASPECTS[int(rng.integers(len(ASPECTS)))]))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (x / (width - 1))[..., None], (y / (height - 1))[..., None]
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    pixels = (corners[0, 0] * (1 - u) * (1 - v) + corners[0, 1] * u * (1 - v) + corners[1, 0] * (1 - u) * v
              + corners[1, 1] * u * v)
    coarse = rng.normal(0, 40, (height // 24 + 2, width // 24 + 2, 3))
    texture = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels += np.asarray(texture, np.float32) - 128 + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(0.8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _jpeg_job(job):
    return photo_jpeg(*job)


def make_jpegs(count: int, size: int, seed: int = 0, workers: int = 0):
    """`count` photo-like JPEGs, made by `workers` processes (0: all CPUs)."""
    jobs = [(seed * 1_000_003 + i, size) for i in range(count)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or count < 64:
        return [_jpeg_job(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_jpeg_job, jobs, chunksize=32))


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0, workers: int = 0) -> None:
    """A folder of `count` photo-like JPEGs about `size` px wide."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(make_jpegs(count, size, seed, workers)):
        (folder / f"bench_{i:05d}.jpg").write_bytes(data)


def write_shards(folder: Path, count: int, rows: int, size: int, seed: int = 0, workers: int = 0) -> None:
    """img2dataset-style shards of the same JPEGs: NNNNN.tar with KEY.jpg, KEY.txt and KEY.json per sample, and
    NNNNN.parquet with key, status and caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs(count, size, seed, workers)
    for shard, first in enumerate(range(0, count, rows)):
        keys = [f"{shard:05d}{row:04d}" for row in range(min(rows, count - first))]
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for key, data in zip(keys, jpegs[first:first + rows]):
                members = ((f"{key}.jpg", data), (f"{key}.txt", b"a synthetic picture"),
                           (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode()))
                for name, blob in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    archive.addfile(info, io.BytesIO(blob))
        pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys),
                                 "caption": ["a synthetic picture"] * len(keys)}), folder / f"{shard:05d}.parquet")


def write_input(folder: Path, count: int, args, seed: int = 0) -> Path:
    if args.input == "tar":
        write_shards(folder, count, args.shard_rows, args.image_size, seed, args.gen_workers)
    else:
        write_jpegs(folder, count, args.image_size, seed, args.gen_workers)
    return folder


def timed_scan(clip, layer, dataset, args, precision, cache_dir, clock=None):
    from neurolens.engines.timing import NO_CLOCK
    from neurolens.pipelines.scan import run_scan
    start = time.perf_counter()
    result = run_scan(clip, layer, dataset, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                      cache=cache_dir, force=True, precision=precision, decoder=args.decode,
                      clock=clock if clock is not None else NO_CLOCK)
    if clip.device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def timed_forward(clip, spec, dataset, batch_size, workers):
    import torch
    from neurolens.activations.hooks import forward_to
    from neurolens.engines.local import batches
    # decoded and preprocessed first (PIL, in DataLoader workers; not timed)
    pixels = torch.cat([batch.pixels for batch in batches(dataset, clip.image_size, 0, len(dataset), 256, workers)
                        if batch.pixels is not None])
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(pixels), batch_size):
            images = pixels[first:first + batch_size].to(clip.device).float().div_(255.0)
            forward_to(clip.model, clip.normalize(images), [spec])
    if clip.device.type == "cuda":
        torch.cuda.synchronize()  # queued kernels belong to the timed forwards
    return time.perf_counter() - start


def null_forward(clip, spec):
    """A stand-in for activations.forward.layer_forward that computes nothing: zeros of the layer's output shape
    (and of the embedding's), on the images' device."""
    import torch
    from neurolens.activations.forward import layer_forward
    probe = torch.zeros(1, 3, clip.image_size, clip.image_size, device=clip.device)
    acts, emb = layer_forward(clip, spec, probe, embeddings=True)
    shape, width = tuple(acts.shape[1:]), int(emb.shape[1])

    def forward(clip, spec, images01, precision="fp32", embeddings=False, pad_to=None):
        count = int(images01.shape[0])
        return images01.new_zeros((count, *shape)), (images01.new_zeros((count, width)) if embeddings else None)
    return forward


def stage_seconds(clock) -> dict:
    return {name: round(value, 3) for name, value in clock.totals().items()}


def rss_child(args) -> None:
    """In a fresh process: scan args.rss_folder and print peak RSS in MB (self and DataLoader workers)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from neurolens.models.build import load_clip
    from neurolens.pipelines.scan import run_scan
    clip = load_clip(args.rss_model, args.pretrained, device=args.device)
    with tempfile.TemporaryDirectory() as cache:
        run_scan(clip, args.rss_layer, args.rss_folder, top_k=args.top_k, batch_size=args.batch_size,
                 workers=args.workers, cache=cache, force=True, decoder=args.decode)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mb": self_mb, "workers_mb": workers_mb}))


def measure_rss(args, folder: Path) -> dict:
    command = [sys.executable, __file__, "--rss-child", "--rss-folder", str(folder), "--rss-model", args.rss_model,
               "--rss-layer", args.rss_layer, "--pretrained", args.pretrained, "--device", args.device,
               "--top-k", str(args.top_k), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--threads", str(args.threads), "--decode", args.decode]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="RN50x4")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--layer", default="image_block_4_5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32, help="images for the speed part and rss_n")
    parser.add_argument("--data", default=None, help="scan this existing dataset (e.g. an earlier run's "
                        "--keep-data folder) instead of generating --n images")
    parser.add_argument("--keep-data", default=None, help="write the generated images here and keep them")
    parser.add_argument("--image-size", type=int, default=500, help="mean width of the synthetic JPEGs")
    parser.add_argument("--input", choices=("folder", "tar"), default="folder",
                        help="a folder of JPEGs, or img2dataset-style tar shards of them")
    parser.add_argument("--shard-rows", type=int, default=1000, help="images per tar shard (--input tar)")
    parser.add_argument("--decode", default="auto", help="auto, pil or torchvision (neurolens scan --decode)")
    parser.add_argument("--null-model", action="store_true",
                        help="also run the scan with a no-op forward: null_img_s, the input pipeline's ceiling")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gen-workers", type=int, default=0, help="processes making the JPEGs (0: all CPUs)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rss-model", default=None, help="model of the RSS part (default --model)")
    parser.add_argument("--rss-layer", default=None, help="layer of the RSS part (default --layer)")
    parser.add_argument("--rss-n", type=int, default=None, help="N of the RSS part (default --n; 10N is also scanned)")
    parser.add_argument("--bf16-model", default=None, help="model of the bf16 part (default --model)")
    parser.add_argument("--bf16-layer", default=None)
    parser.add_argument("--bf16-n", type=int, default=None, help="images of the bf16 part (default --n)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rss-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rss_model = args.rss_model or args.model
    args.rss_layer = args.rss_layer or args.layer
    if args.rss_child:
        rss_child(args)
        return

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from neurolens.datasets.decode import resolve_decoder
    from neurolens.datasets.open import open_dataset
    from neurolens.engines import local
    from neurolens.engines.timing import StageClock
    from neurolens.models.build import load_clip
    from neurolens.models.layer_table import resolve_layer

    report = {"model": args.model, "layer": args.layer, "n": args.n, "batch_size": args.batch_size,
              "workers": args.workers, "top_k": args.top_k, "threads": torch.get_num_threads(), "device": args.device,
              "input": args.input}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data is None:
            args.data = str(write_input(Path(args.keep_data) if args.keep_data else tmp / "n", args.n, args))
        clip = load_clip(args.model, args.pretrained, device=args.device)
        spec = resolve_layer(clip, args.layer)
        dataset = open_dataset(args.data)
        args.n = report["n"] = len(dataset)
        from neurolens.activations.hooks import forward_to
        with torch.no_grad():  # warm-up: first-call allocations are not part of either timing
            forward_to(clip.model, clip.normalize(torch.rand(1, 3, clip.image_size, clip.image_size, device=clip.device)), [spec])
        clock = StageClock(clip.device)
        scan_s, fp32 = timed_scan(clip, args.layer, dataset, args, "fp32", tmp / "cache32", clock)
        forward_s = timed_forward(clip, spec, dataset, args.batch_size, args.workers)
        report.update(scan_img_s=args.n / scan_s, forward_img_s=args.n / forward_s)
        report["ratio"] = report["scan_img_s"] / report["forward_img_s"]
        report.update(decode=resolve_decoder(args.decode, clip.device), wall_s=scan_s, stages=stage_seconds(clock),
                      stages_note="busy seconds per stage, summed over the decode workers and the device's "
                                  "streams; stages overlap, so they add up to more than wall_s")
        if args.null_model:
            null_clock = StageClock(clip.device)
            with mock.patch.object(local, "layer_forward", null_forward(clip, spec)):
                null_s, _ = timed_scan(clip, args.layer, dataset, args, "fp32", tmp / "cache-null", null_clock)
            report.update(null_img_s=args.n / null_s, null_img_s_per_worker=args.n / null_s / max(1, args.workers),
                          null_stages=stage_seconds(null_clock))

        if not args.skip_bf16:
            bf16_model = args.bf16_model or args.model
            bf16_layer = args.bf16_layer or args.layer
            bf16_n = args.bf16_n or args.n
            if bf16_model != args.model or bf16_layer != args.layer or bf16_n != args.n:
                clip = load_clip(bf16_model, args.pretrained, device=args.device)
                write_input(tmp / "b", bf16_n, args, seed=2)
                bdata = open_dataset(str(tmp / "b"))
                base_s, fp32 = timed_scan(clip, bf16_layer, bdata, args, "fp32", tmp / "cacheb32")
            else:
                bdata, base_s = dataset, scan_s
            bf16_s, bf16 = timed_scan(clip, bf16_layer, bdata, args, "bf16", tmp / "cache16")
            k = min(args.top_k, bf16_n)
            overlap = [len(set(a[:k]) & set(b[:k])) / k for a, b in zip(fp32.top_indices.tolist(), bf16.top_indices.tolist())]
            report.update(bf16_speedup=base_s / bf16_s, bf16_topk_overlap=float(np.mean(overlap)),
                          bf16_model=bf16_model, bf16_layer=bf16_layer, bf16_n=bf16_n)

        if not args.skip_rss:
            rss_n = args.rss_n or args.n
            write_input(tmp / "rss1", rss_n, args, seed=3)
            write_input(tmp / "rss10", 10 * rss_n, args, seed=3)
            small, large = measure_rss(args, tmp / "rss1"), measure_rss(args, tmp / "rss10")
            report.update(rss_n_mb=small["self_mb"], rss_10n_mb=large["self_mb"],
                          rss_workers_n_mb=small["workers_mb"], rss_workers_10n_mb=large["workers_mb"],
                          rss_growth=large["self_mb"] / small["self_mb"] - 1, rss_model=args.rss_model,
                          rss_layer=args.rss_layer, rss_n=rss_n)
    report["load_avg"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}))


if __name__ == "__main__":
    main()
