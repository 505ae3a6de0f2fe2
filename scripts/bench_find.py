"""Benchmark of `neurolens find` from the cache: a concept name and a lexicon word, at 2,560 units (RN50x4's
image_block_4_5) and 20,480 SAE features (8 x), over 20,000 images with top-32 images per unit. Prints ONE JSON
line.

    python scripts/bench_find.py                                   # 2,560 units and 20,480 features
    python scripts/bench_find.py --images 2000 --units 256 --features 1024   # a quick check

The cache is synthetic and written once per setting under --work (default outputs/bench_find): a scan record
(top-k indices and captions: the part find reads), a concepts record of 5 concepts (each labelled by its caption
lexicon through the real label code, labels.sources.captions_source and labels.reliability.check_reliability;
random scores) and a descriptions record with text-direction scores of every concept name and term (random),
for the neurons and for the features of an SAE basis. Each query is timed two ways: `in_process_s` (locate +
find in this process, imports done: the median of --repeat runs) and `command_s` (the whole
`python -m neurolens find QUERY --json` process, interpreter start and imports included: the median of
--repeat runs); `torch_imported` says whether that process imported torch (it must not). The goal: every
`command_s` under 1 s on an idle machine (measure alone: the lead runs the final figures).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYER = "image_block_4_5"
FINGERPRINT = "b" * 32
WORDS = ["red", "blue", "dog", "cat", "car", "street", "beach", "house", "woman", "man", "child", "tree", "sky",
         "food", "table", "phone", "logo", "text", "night", "city"]
CONCEPTS = [{"name": "violence", "terms": ["gore", "blood", "weapon", "knife", "corpse"]},
            {"name": "drugs", "terms": ["cocaine", "syringe", "pills", "heroin", "meth"]},
            {"name": "animals", "terms": ["dog", "cat", "bird", "horse", "fish"], "match": "exact", "sensitive": False},
            {"name": "vehicles", "terms": ["car", "bus", "truck", "bike", "train"], "match": "exact", "sensitive": False},
            {"name": "text", "terms": ["logo", "sign", "poster", "text", "font"], "match": "exact", "sensitive": False}]


def build(args, root: Path, units: int, basis: str) -> None:
    """The synthetic records of one basis (module docstring)."""
    from neurolens.labels.concepts import concept_set_of
    from neurolens.labels.reliability import check_reliability
    from neurolens.labels.sources import captions_source
    from neurolens.labels.spec import parse_labels
    from neurolens.records import concepts as concept_records
    from neurolens.records import descriptions as description_records
    from neurolens.records import scan as scan_records
    from neurolens.scoring.flags import FlagRule
    from neurolens.storage.cache import Cache, Record
    rng = np.random.default_rng([args.seed, units])
    cache = Cache(root)
    extra = [t for c in CONCEPTS for t in c["terms"]]
    captions = [" ".join(rng.choice(WORDS + extra[:5 * (i % 3)], size=6)) for i in range(args.images)]
    keys = [f"img/{i:07d}.jpg" for i in range(args.images)]
    tag = "neurons" if basis == "neurons" else "features"
    scan_name = f"scan-{tag}"
    scan_records_path = scan_records.record_path(cache, FINGERPRINT, LAYER, scan_name)
    top = np.stack([rng.choice(args.images, size=args.top_k, replace=False) for _ in range(units)]).astype(np.int64)
    attrs = {"complete": True, "layer": LAYER, "channels": units, "top_k": args.top_k, "basis": basis,
             "fingerprint": FINGERPRINT, "model": "RN50x4", "pretrained": "openai", "dataset_identity": "synthetic",
             "chunks": [], "count": args.images}
    cache.write(scan_records_path, Record(arrays={"top_indices": top, "keys": np.asarray(keys, dtype=object),
                                                  "captions": np.asarray(captions, dtype=object)}, attrs=attrs))
    concept_set = concept_set_of(CONCEPTS, name="bench")
    spec = parse_labels(["captions"])[0][0]
    scores = []
    for concept in concept_set:
        label_set = check_reliability([captions_source(spec, keys, captions, list(concept.terms), concept.match)])
        arrays = {name: rng.random(units) for name in ("auc", "auprc", "p", "q", "correlation", "top_share")}
        flagged = arrays["auc"] > 0.99
        positive = int(np.nansum(label_set.labels))
        scores.append(concept_records.ConceptScores(concept, flagged=flagged, n_pos=positive,
                                                    n_neg=args.images - positive, labels=label_set, **arrays))
    result = concept_records.ConceptsResult(layer=LAYER, concept_set=concept_set, scores=scores, rule=FlagRule(),
                                            method="exact", basis=basis, basis_name="" if basis == "neurons" else "big",
                                            scan=SimpleNamespace(keys=keys, path=scan_records_path))
    clip = SimpleNamespace(name="RN50x4", pretrained="openai", fingerprint=FINGERPRINT)
    concepts_path = concept_records.concepts_path(cache, FINGERPRINT, LAYER, f"concepts-{tag}")
    cache.write(concepts_path, concept_records.to_record(result, clip))
    texts = [t for c in CONCEPTS for t in (c["name"], *c["terms"])]
    m = 5
    arrays = {"ngrams": ["red", "blue"], "ngram_index": np.zeros((units, m), np.int32) - 1,
              "top_images": np.full(units, args.top_k, np.int32), "base_images": np.full(units, 1000, np.int32),
              "query_texts": texts, "query_scores": rng.standard_normal((units, len(texts))).astype(np.float16)}
    for name in ("top_hits", "base_hits"):
        arrays[name] = np.full((units, m), -1, np.int32)
    for name in ("selection_z", "log_odds", "ci_low", "ci_high", "z"):
        arrays[name] = np.full((units, m), np.nan, np.float32)
    described = description_records.DescriptionsResult(layer=LAYER, concepts=result, arrays=arrays, settings={},
                                                       basis=basis, basis_name=result.basis_name)
    cache.write(description_records.descriptions_path(cache, FINGERPRINT, LAYER, f"descriptions-{tag}"),
                description_records.to_record(described, {"concepts_record": concepts_path.name,
                                                          "directions_record": None}))


def timed_in_process(args, root: Path, query: str, sae) -> float:
    from neurolens.pipelines.find import find, locate
    from neurolens.storage.cache import Cache
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        located = locate(Cache(root), LAYER, model="RN50x4", pretrained="openai", sae=sae)
        rows = find(located, query).rows
        times.append(time.perf_counter() - started)
        assert len(rows) == located.top_indices.shape[0]
    return statistics.median(times)


def timed_command(args, root: Path, query: str, sae) -> tuple:
    code = ("import sys, runpy; sys.argv = ['neurolens'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('neurolens', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "sys.stderr.write('TORCH=%d\\n' % ('torch' in sys.modules))\n")
    command = [sys.executable, "-c", code, "find", query, "--layer", LAYER, "--model", "RN50x4", "--pretrained",
               "openai", "--cache", str(root), "--json", "--top", "0"] + (["--sae", sae] if sae else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    times, torch_loaded = [], False
    for _ in range(args.repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        times.append(time.perf_counter() - started)
        if done.returncode != 0 or not done.stdout.startswith("["):
            raise SystemExit(f"find failed: {done.stderr[-2000:]}")
        torch_loaded |= "TORCH=1" in done.stderr
    return statistics.median(times), torch_loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--units", type=int, default=2560)
    parser.add_argument("--features", type=int, default=20480)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "outputs" / "bench_find"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    root = Path(args.work) / f"{args.images}-{args.units}-{args.features}-{args.top_k}-{args.seed}"
    if not (root / "descriptions").is_dir():
        build(args, root, args.units, "neurons")
        build(args, root, args.features, "sae-big-0123456789ab")
    out = {"images": args.images, "top_k": args.top_k, "repeat": args.repeat, "cpus": os.cpu_count(),
           "load": round(os.getloadavg()[0], 2), "results": []}
    for units, sae in ((args.units, None), (args.features, "big")):
        for query, kind in (("violence", "concept"), ("syringe", "lexicon")):
            command_s, torch_loaded = timed_command(args, root, query, sae)
            out["results"].append({"units": units, "basis": "sae" if sae else "neurons", "query": query, "kind": kind,
                                   "in_process_s": round(timed_in_process(args, root, query, sae), 4),
                                   "command_s": round(command_s, 4), "torch_imported": torch_loaded})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
