"""Benchmark of cached CLI answers (prints ONE JSON line): wall seconds of a cached `visualize`, `samples`,
`text` and `sweep`, each a fresh `python -m neurolens ... --json` process, answered from the model card
(no model loaded: neurolens.pipelines.model) against the same cached answer with the card removed first (the
model loaded to fingerprint its weights, as before model cards).

Set-up (once, in --work): the toy dataset (neurolens.toy.generate, --images pairs at 64 px, captions with the
planted words), a toy CLIP trained on it briefly (the demo's model, --epochs), or --checkpoint PATH; then
every command runs once to fill the cache. The vocabulary is the dataset's captions, as in the demo.

Reported per command: cached_s and loaded_s (median wall seconds of --runs runs each), cached_cpu_s and
loaded_cpu_s (median CPU seconds, user + system, of the process: steadier than wall time on a shared machine),
and whether the cached runs imported open_clip (they must not) and torch (cached_imported_torch: visualize,
samples and text on --device cpu import none; sweep still does). Also: python_torch_s / python_torch_cpu_s
(`python -c "import torch"`, the floor of any command that imports torch) and the load average before and
after.

Example:  python scripts/bench_cached.py --runs 5
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# runs the CLI in this interpreter and says on stderr, at exit, whether open_clip and torch were imported
RUNNER = ("import atexit, runpy, sys; "
          "atexit.register(lambda: sys.stderr.write('OPEN_CLIP_IMPORTED=%d TORCH_IMPORTED=%d\\n' "
          "% ('open_clip' in sys.modules, 'torch' in sys.modules))); "
          "sys.argv = ['neurolens'] + sys.argv[1:]; runpy.run_module('neurolens', run_name='__main__')")
LAYER = "image_block_4_0"


def prepare(work: Path, images: int, epochs: int, checkpoint: str | None) -> tuple:
    """(checkpoint, dataset parquet) of the toy model and data under work/."""
    from neurolens.toy.generate import ToySettings
    from neurolens.toy.settings import TrainSettings
    from neurolens.toy.store import toy_dataset, toy_model

    data = ToySettings(n=images, size=64)
    dataset = toy_dataset(work / "toy", settings=data)
    if checkpoint is None:
        checkpoint, _, _ = toy_model(work / "toy", dataset, data, TrainSettings(epochs=epochs), evaluate=False)
    return str(checkpoint), str(dataset)


def commands(checkpoint: str, dataset: str, cache: Path, out: Path) -> dict:
    model = ["--checkpoint", checkpoint, "--device", "cpu", "--cache", str(cache), "--layer", LAYER]
    vocab = ["--vocab", f"{dataset}:caption"]
    return {
        "visualize": ["visualize", *model, "--unit", "0", "--steps", "32", "--out", str(out / "visualize"), "--json"],
        "samples": ["samples", *model, "--unit", "0", "--dataset", dataset, "--out", str(out / "samples.png"),
                    "--json"],
        "text": ["text", *model, "--unit", "0", *vocab, "--json"],
        "sweep": ["sweep", *model, "--dataset", dataset, *vocab, "--out", str(out / "sweep"), "--json"],
    }


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list, env: dict) -> tuple:
    """(wall seconds, CPU seconds, open_clip imported?, torch imported?) of one CLI process; fails loudly on a
    non-zero exit."""
    cpu, started = children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, cpu, "OPEN_CLIP_IMPORTED=1" in done.stderr, "TORCH_IMPORTED=1" in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per command and mode (median reported)")
    parser.add_argument("--images", type=int, default=300, help="toy image-caption pairs")
    parser.add_argument("--epochs", type=int, default=1, help="toy training epochs")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead of training the toy")
    parser.add_argument("--work", default=None, help="folder for data, model and cache (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="neurolens-bench-cached-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load_before = os.getloadavg()
    checkpoint, dataset = prepare(work, args.images, args.epochs, args.checkpoint)
    cache, out = work / "cache", work / "out"
    chosen = commands(checkpoint, dataset, cache, out)
    for argv in chosen.values():         # fill the cache (and the model card)
        run(argv, env)

    cards = cache / "model-card"
    floors = [run_plain(["-c", "import torch"], env) for _ in range(args.runs)]
    result = {}
    for name, argv in chosen.items():
        cached = [run(argv, env) for _ in range(args.runs)]
        loaded = []
        for _ in range(args.runs):
            shutil.rmtree(cards, ignore_errors=True)      # no card: the model is loaded to fingerprint it
            loaded.append(run(argv, env))
        result[name] = {"cached_s": _median(cached, 0), "loaded_s": _median(loaded, 0),
                        "cached_cpu_s": _median(cached, 1), "loaded_cpu_s": _median(loaded, 1),
                        "cached_imported_open_clip": any(run[2] for run in cached),
                        "cached_imported_torch": any(run[3] for run in cached)}
    print(json.dumps({"commands": result, "runs": args.runs, "python_torch_s": _median(floors, 0),
                      "python_torch_cpu_s": _median(floors, 1),
                      "model": f"toy CLIP ({checkpoint})", "layer": LAYER, "images": args.images,
                      "cpus": os.cpu_count(), "load_before": [round(v, 2) for v in load_before],
                      "load_after": [round(v, 2) for v in os.getloadavg()]}))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def run_plain(args: list, env: dict) -> tuple:
    cpu, started = children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - started, children_cpu() - cpu


def _median(runs: list, field: int) -> float:
    return round(statistics.median(run[field] for run in runs), 2)


if __name__ == "__main__":
    main()
