"""Benchmark: audit-captions (DuckDB, one pass) against a plain per-row Python loop over the same parquet files.

Generates a LAION-400M-style metadata set (SAMPLE_ID, URL, TEXT, LICENSE, NSFW, similarity, WIDTH, HEIGHT)
of --rows rows in --files files, written chunk by chunk with pyarrow (generation memory stays bounded),
then, in this one process:
  1. neurolens.audit.captions.audit_captions(files, 3 terms)         -> neurolens_rows_s
  2. a pandas baseline: for each file, pandas.read_parquet(TEXT, URL, NSFW) and a Python loop over the
     rows doing the same string match                          -> pandas_rows_s
and checks that both give the same counts. Prints ONE JSON line:
  {rows, neurolens_rows_s, pandas_rows_s, speedup, peak_rss_mb, ...}
rows_s are rows / wall-clock seconds and speedup = pandas wall time / neurolens wall time. On a shared
machine wall time depends on the other load, so the line also has each side's CPU time (all threads of
this process, time.process_time) and cpu_speedup = pandas CPU / neurolens CPU, plus the 1-minute load.
peak_rss_mb is the peak resident set size of this process DURING the audit only: the kernel's high-water
mark (VmHWM) is reset (write '5' to /proc/self/clear_refs) right before the audit and read right after it,
so neither data generation nor the pandas baseline (which runs later) counts. It includes what the process
already holds (Python, pyarrow, and torch, which `import neurolens` loads): rss_before_audit_mb is that
resident size just before the audit. pandas_peak_rss_mb is the same measurement around the baseline. The data set is deleted afterwards unless --keep.

Usage:  python scripts/bench_audit.py [--rows 10000000] [--files 8] [--dir DIR] [--keep] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TERMS = ["desi", "nun", "latina"]
CHUNK_ROWS = 250_000

_WORDS = ("photo of a woman man girl boy dog cat house garden beach car red blue vintage poster wedding dress "
          "summer winter city street portrait art print canvas wall decor kitchen table chair shoes bag logo "
          "icon vector illustration stock image free download hd wallpaper background sunset mountain lake").split()
_RARE = TERMS + ["porn", "hot", "adult", "xxx", "sex", "fuck", "f.ck", "rape", "café", "Désirée", "NUN", "Latina"]
_DOMAINS = ["cdn.shop.example", "img.blog.example", "media.news.example", "static.photos.example",
            "i.pinimg.example", "assets.store.example", "pics.adult-site.example", "sexy.example"]


def _phrase_pool(rng: np.random.Generator, size: int) -> pa.Array:
    """Short phrases of common words; about 2% carry one of the search or NSFW words."""
    phrases = []
    for _ in range(size):
        words = list(rng.choice(_WORDS, size=int(rng.integers(2, 6))))
        if rng.random() < 0.02:
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(_RARE)))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        phrases.append(" ".join(words))
    return pa.array(phrases, pa.string())


def generate(directory: Path, rows: int, files: int, seed: int = 0) -> list[str]:
    """Write rows spread over `files` parquet files, CHUNK_ROWS at a time; captions are unique strings."""
    rng = np.random.default_rng(seed)
    phrases = _phrase_pool(rng, 20_000)
    domains = pa.array(_DOMAINS)
    paths_pool = pa.array([f"{w}-{i}" for i, w in enumerate(rng.choice(_WORDS + ["adult", "xxx"], size=2000))])
    flags = pa.array(["UNLIKELY", "UNSURE", "NSFW", None], pa.string())
    licenses = pa.array(["?", "cc-by", "cc0"], pa.string())
    schema = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
                        ("LICENSE", pa.string()), ("NSFW", pa.string()), ("similarity", pa.float64()),
                        ("WIDTH", pa.int32()), ("HEIGHT", pa.int32())])
    directory.mkdir(parents=True, exist_ok=True)
    written, out = 0, []
    per_file = -(-rows // files)
    for f in range(files):
        path = directory / f"part-{f:05d}.parquet"
        n_file = min(per_file, rows - written)
        if n_file <= 0:
            break
        with pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=["LICENSE", "NSFW"]) as writer:
            done = 0
            while done < n_file:
                n = min(CHUNK_ROWS, n_file - done)
                ids = pa.array(np.arange(written + done, written + done + n, dtype=np.int64))
                id_text = pc.cast(ids, pa.string())
                text = pc.binary_join_element_wise(
                    phrases.take(rng.integers(0, len(phrases), n)), phrases.take(rng.integers(0, len(phrases), n)),
                    id_text, " ")
                text = pc.if_else(pa.array(rng.random(n) < 0.001), pa.scalar(None, pa.string()), text)  # ~0.1% null
                url = pc.binary_join_element_wise(
                    pa.array(["https:/"] * n), domains.take(rng.integers(0, len(domains), n)),
                    paths_pool.take(rng.integers(0, len(paths_pool), n)), pc.binary_join_element_wise(id_text, ".jpg", ""), "/")
                flag = flags.take(rng.choice(4, size=n, p=[0.88, 0.07, 0.04, 0.01]))
                table = pa.Table.from_arrays([
                    ids, url, text, licenses.take(rng.integers(0, 3, n)), flag,
                    pa.array(rng.uniform(0.3, 0.45, n)), pa.array(rng.integers(64, 2048, n, dtype=np.int32)),
                    pa.array(rng.integers(64, 2048, n, dtype=np.int32))], schema=schema)
                writer.write_table(table, row_group_size=CHUNK_ROWS)
                done += n
        written += n_file
        out.append(str(path))
    return out


def pandas_baseline(files: list[str], terms: list[str], nsfw_terms: list[str]) -> dict:
    """The audit as a plain per-row Python loop, reading file by file with pandas."""
    import pandas as pd
    terms_l = [t.lower() for t in terms]
    nsfw_re = re.compile("|".join(".".join(re.escape(p) for p in t.lower().split("*")) for t in nsfw_terms))
    n_match = [0] * len(terms)
    n_nsfw = [0] * len(terms)
    for path in files:
        frame = pd.read_parquet(path, columns=["TEXT", "URL", "NSFW"])
        for text, url in zip(frame["TEXT"].tolist(), frame["URL"].tolist()):
            if not isinstance(text, str):  # None, or NaN with pandas' string dtype
                continue
            low = text.lower()
            hits = [i for i, term in enumerate(terms_l) if term in low]
            if not hits:
                continue
            nsfw = bool(nsfw_re.search(low)) or (isinstance(url, str) and bool(nsfw_re.search(url.lower())))
            for i in hits:
                n_match[i] += 1
                n_nsfw[i] += nsfw
        del frame
    return {t: (n_match[i], n_nsfw[i]) for i, t in enumerate(terms)}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _current_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--dir", default=None, help="where to write the data set (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--reuse", action="store_true", help="use the parquet files already in --dir")
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: neurolens's)")
    parser.add_argument("--memory-limit", default="1GB")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from neurolens.audit.captions import audit_captions
    from neurolens.labels.lexicon import default_terms as default_nsfw_terms

    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="neurolens-bench-audit-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        if args.reuse:
            files = sorted(str(p) for p in directory.glob("*.parquet"))
        else:
            files = generate(directory, args.rows, args.files)
        gen_s = time.perf_counter() - t0
        gc.collect()
        pa.default_memory_pool().release_unused()  # generation buffers must not count toward the audit's peak

        import duckdb  # noqa: F401  (imported before timing: both sides are timed without import costs)
        import pandas  # noqa: F401
        rss_before = _current_mb()
        exact_peak = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        result = audit_captions(files, TERMS, memory_limit=args.memory_limit, threads=args.threads)
        neurolens_s, neurolens_cpu = time.perf_counter() - t0, time.process_time() - c0
        audit_peak = _peak_mb()
        rows = result.rows

        gc.collect()
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        baseline = pandas_baseline(files, TERMS, default_nsfw_terms())
        pandas_s, pandas_cpu = time.perf_counter() - t0, time.process_time() - c0
        pandas_peak = _peak_mb()

        agree = all(baseline[t.term] == (t.n_match, t.n_nsfw) for t in result.terms)
        print(json.dumps({
            "rows": rows,
            "neurolens_rows_s": round(rows / neurolens_s),
            "pandas_rows_s": round(rows / pandas_s),
            "speedup": round(pandas_s / neurolens_s, 2),
            "peak_rss_mb": round(audit_peak, 1),
            "rss_before_audit_mb": round(rss_before, 1),
            "pandas_peak_rss_mb": round(pandas_peak, 1),
            "peak_rss_method": "VmHWM reset before the audit" if exact_peak else "ru_maxrss of the whole process",
            "neurolens_s": round(neurolens_s, 2), "pandas_s": round(pandas_s, 2),
            "neurolens_cpu_s": round(neurolens_cpu, 2), "pandas_cpu_s": round(pandas_cpu, 2),
            "cpu_speedup": round(pandas_cpu / neurolens_cpu, 2), "load_avg_1m": os.getloadavg()[0],
            "cores": os.cpu_count(), "generate_s": round(gen_s, 1),
            "files": len(files), "threads": args.threads or min(4, os.cpu_count() or 1),
            "memory_limit": args.memory_limit, "counts_agree": agree,
            "matches": {t.term: [t.n_match, t.n_nsfw] for t in result.terms},
        }))
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
