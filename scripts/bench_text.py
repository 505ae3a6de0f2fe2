"""Benchmark of the text feature visualization (prints ONE JSON line).

full_s       encoding the vocabulary sample with open_clip's CLIP.encode_text (all 77 positions), in
             vocabulary order, batches of --batch-size
truncated_s  the same token ids with neurolens.text.encode.encode_tokens: sorted by length, each batch run only up
             to its longest end-of-text token (tokenization, common to both, is timed separately)
speedup      full_s / truncated_s
rank_all_units_s  with the embeddings in hand: every unit's direction of --layer (the Jacobian, D backward
             passes) plus the streamed top-k of all units over the sample; directions_s and topk_s split it,
             and topk_builtin_s is the top-k over as many random unit vectors as the builtin vocabulary has

Default: RN50x4 with random weights (the real architecture), 2000 entries spread evenly over the builtin
vocabulary (open_clip's full-length encoder is slow on CPU: ~70 ms a text here).

Example:  python scripts/bench_text.py --vocab-size 2000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50x4")
    parser.add_argument("--layer", default="image_block_4_5")
    parser.add_argument("--vocab-size", type=int, default=2000, help="entries of the builtin vocabulary to encode")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-rank", action="store_true", help="time the encoders only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from neurolens.models.build import load_clip
    from neurolens.models.layer_table import resolve_layer
    from neurolens.text.encode import encode_tokens, tokenize
    from neurolens.text.directions import top_k_texts, unit_directions
    from neurolens.text.vocab import builtin_vocab

    clip = load_clip(args.model, "none", device="cpu")
    entries = builtin_vocab().entries
    step = max(1, len(entries) // args.vocab_size)
    sample = entries[::step][: args.vocab_size]

    started = time.perf_counter()
    tokens = tokenize(clip, sample)
    tokenize_s = time.perf_counter() - started

    started = time.perf_counter()
    full = encode_tokens(clip, tokens, batch_size=args.batch_size, truncate=False)
    full_s = time.perf_counter() - started
    started = time.perf_counter()
    truncated = encode_tokens(clip, tokens, batch_size=args.batch_size, truncate=True)
    truncated_s = time.perf_counter() - started

    result = {"full_s": round(full_s, 2), "truncated_s": round(truncated_s, 2),
              "speedup": round(full_s / truncated_s, 1), "max_abs_diff": float(np.abs(full - truncated).max()),
              "tokenize_s": round(tokenize_s, 2), "texts": len(sample), "model": f"{args.model} (random weights)",
              "batch_size": args.batch_size, "threads": torch.get_num_threads(), "device": "cpu"}
    if not args.skip_rank:
        spec = resolve_layer(clip, args.layer)
        started = time.perf_counter()
        directions = unit_directions(clip, spec)
        directions_s = time.perf_counter() - started
        started = time.perf_counter()
        top_k_texts(directions, truncated, args.top_k)
        topk_s = time.perf_counter() - started
        generator = np.random.default_rng(0)
        fake = generator.standard_normal((len(entries), directions.shape[1])).astype(np.float32)
        fake /= np.linalg.norm(fake, axis=1, keepdims=True)
        started = time.perf_counter()
        top_k_texts(directions, fake, args.top_k)
        topk_builtin_s = time.perf_counter() - started
        result.update({"rank_all_units_s": round(directions_s + topk_s, 2), "directions_s": round(directions_s, 2),
                       "topk_s": round(topk_s, 2), "topk_builtin_s": round(topk_builtin_s, 2),
                       "builtin_entries": len(entries), "layer": spec.name, "units": spec.channels})
    try:
        result["load_average"] = round(os.getloadavg()[0], 1)
    except OSError:
        pass
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
