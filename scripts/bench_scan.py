"""Benchmark of `neurolens scan`: prints ONE JSON line.

  scan_img_s     images/s of run_scan (decoding in DataLoader workers, all units, top-k, moments, mean map,
                 per-image maxima written to the cache), model already loaded, fresh cache
  forward_img_s  images/s of a bare no-grad forward to the same layer (forward_to) on the same images,
                 already decoded and preprocessed in memory, same batch size, same process
  ratio          scan_img_s / forward_img_s (goal >= 0.9)
  rss_n_mb, rss_10n_mb   peak RSS (ru_maxrss of the scanning process; DataLoader workers are separate processes,
                 their peak is rss_workers_*) of a scan of N and of 10N images, each in a fresh subprocess
                 (goal: within 15%)
  bf16_speedup   scan_img_s(bf16 autocast) / scan_img_s(fp32) on --bf16-n images of --bf16-model
  bf16_topk_overlap  mean over units of |top-k(bf16) & top-k(fp32)| / k (same images, same k)

Images are N synthetic JPEGs (smooth noise + shapes, --image-size px) written to a temp folder, so decoding
is real. Defaults: RN50x4 random weights (288 px input) on image_block_4_5, as in the issue; use the flags
to run it smaller.

  python scripts/bench_scan.py --n 32
  python scripts/bench_scan.py --model nl-toy-RN --layer image_block_3_0 --n 64   # seconds
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_jpegs(folder: Path, count: int, size: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = size, int(size * 0.8)
        base = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.float64) + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
            x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        image.save(folder / f"bench_{i:05d}.jpg", quality=90)


def timed_scan(clip, layer, dataset, args, precision, cache_dir):
    from neurolens.pipelines.scan import run_scan
    start = time.perf_counter()
    result = run_scan(clip, layer, dataset, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                      cache=cache_dir, force=True, precision=precision)
    return time.perf_counter() - start, result


def timed_forward(clip, spec, dataset, batch_size):
    import torch
    from neurolens.datasets.decode import preprocess_array
    from neurolens.activations.hooks import forward_to
    pixels = torch.from_numpy(np.stack([preprocess_array(dataset.load(i), clip.image_size)
                                        for i in range(len(dataset))]))
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(pixels), batch_size):
            images = pixels[first:first + batch_size].to(clip.device).float().div_(255.0)
            forward_to(clip.model, clip.normalize(images), [spec])
    if clip.device.type == "cuda":
        torch.cuda.synchronize()  # queued kernels belong to the timed forwards
    return time.perf_counter() - start


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
                 workers=args.workers, cache=cache, force=True)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mb": self_mb, "workers_mb": workers_mb}))


def measure_rss(args, folder: Path) -> dict:
    command = [sys.executable, __file__, "--rss-child", "--rss-folder", str(folder), "--rss-model", args.rss_model,
               "--rss-layer", args.rss_layer, "--pretrained", args.pretrained, "--device", args.device,
               "--top-k", str(args.top_k), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="RN50x4")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--layer", default="image_block_4_5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32, help="images for the speed part and rss_n")
    parser.add_argument("--image-size", type=int, default=400, help="width of the synthetic JPEGs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
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
    from neurolens.datasets.open import open_dataset
    from neurolens.models.build import load_clip
    from neurolens.models.layers import resolve_layer

    report = {"model": args.model, "layer": args.layer, "n": args.n, "batch_size": args.batch_size,
              "workers": args.workers, "top_k": args.top_k, "threads": torch.get_num_threads(), "device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "n", args.n, args.image_size)
        clip = load_clip(args.model, args.pretrained, device=args.device)
        spec = resolve_layer(clip, args.layer)
        dataset = open_dataset(str(tmp / "n"))
        from neurolens.activations.hooks import forward_to
        with torch.no_grad():  # warm-up: first-call allocations are not part of either timing
            forward_to(clip.model, clip.normalize(torch.rand(1, 3, clip.image_size, clip.image_size, device=clip.device)), [spec])
        scan_s, fp32 = timed_scan(clip, args.layer, dataset, args, "fp32", tmp / "cache32")
        forward_s = timed_forward(clip, spec, dataset, args.batch_size)
        report.update(scan_img_s=args.n / scan_s, forward_img_s=args.n / forward_s)
        report["ratio"] = report["scan_img_s"] / report["forward_img_s"]

        if not args.skip_bf16:
            bf16_model = args.bf16_model or args.model
            bf16_layer = args.bf16_layer or args.layer
            bf16_n = args.bf16_n or args.n
            if bf16_model != args.model or bf16_layer != args.layer or bf16_n != args.n:
                clip = load_clip(bf16_model, args.pretrained, device=args.device)
                write_jpegs(tmp / "b", bf16_n, args.image_size, seed=2)
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
            write_jpegs(tmp / "rss1", rss_n, args.image_size, seed=3)
            write_jpegs(tmp / "rss10", 10 * rss_n, args.image_size, seed=3)
            small, large = measure_rss(args, tmp / "rss1"), measure_rss(args, tmp / "rss10")
            report.update(rss_n_mb=small["self_mb"], rss_10n_mb=large["self_mb"],
                          rss_workers_n_mb=small["workers_mb"], rss_workers_10n_mb=large["workers_mb"],
                          rss_growth=large["self_mb"] / small["self_mb"] - 1, rss_model=args.rss_model,
                          rss_layer=args.rss_layer, rss_n=rss_n)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()}))


if __name__ == "__main__":
    main()
