"""Every command's --json output on the demo, saved, then compared with a later run (for refactors).

    python scripts/json_snapshot.py --save scripts/json_snapshot            # run all, one file per command
    python scripts/json_snapshot.py --check scripts/json_snapshot --fresh   # a new demo, retrained; compare

It runs `neurolens demo` into OUT (--out, default outputs/json_snapshot; a finished demo there is reused), copies
the demo's cache records to OUT/work/cache (each run starts from the same cache), runs each command of COMMANDS
with --json against the demo's checkpoint and dataset, with this checkout's code (PYTHONPATH), and normalizes
the JSON (MASKED_KEYS, STRING_MASKS, paths under OUT/the checkout as <OUT>/<REPO>). Outputs are machine-specific
(the toy CLIP's training is not bit-identical across machines); a change that alters one on purpose saves the
snapshot again in the same commit. Standard library only: neurolens (and pyarrow in prepare()) run as
subprocesses.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "outputs" / "json_snapshot"
DEFAULT_DIR = "scripts/json_snapshot"
LAYER = "image_block_4_0"          # the demo's layer
MARKER = ".json_snapshot"          # marks OUT as this script's, so that --fresh may delete it

# name -> (arguments after `neurolens`, timeout in seconds). {out}: OUT, {work}: OUT/work, {cache}: OUT/work/cache,
# {ckpt}/{data}: the demo's checkpoint and dataset (3000 pairs), {subset}: its first 400 rows, {audit}: its
# captions as a TEXT/NSFW table. In this order: later commands see what earlier ones cached (sae list, the SAE).
COMMANDS = {
    "layers": ("layers --checkpoint {ckpt} --json", 300),
    # the demo again over its own (finished) output: every stage from the cache
    "demo": ("demo --out {out}/demo --cache {out}/cache --seed 0 --json", 600),
    "scan": (f"scan --checkpoint {{ckpt}} --layer {LAYER} --dataset {{subset}} --top-k 8 --cache {{cache}} --json",
             600),
    "samples": (f"samples --checkpoint {{ckpt}} --layer {LAYER} --unit 1 --dataset {{data}} --show 8 "
                "--out {work}/samples/unit1.png --cache {cache} --json", 600),
    "text": (f"text --checkpoint {{ckpt}} --layer {LAYER} --unit 1 --unit 2 --vocab {{data}}:caption --top-k 5 "
             "--dataset {data} --cache {cache} --json", 600),
    # --labels captions: the CLI's default `auto` adds NudeNet (60 ms per image; the demo leaves it out too)
    "sweep": (f"sweep --checkpoint {{ckpt}} --layer {LAYER} --dataset {{data}} --vocab {{data}}:caption "
              "--labels captions --out {work}/sweep --cache {cache} --json", 600),
    "visualize": (f"visualize --checkpoint {{ckpt}} --layer {LAYER} --unit 1 --unit 2 --steps 16 --seed 0 "
                  "--out {work}/visualize --cache {cache} --json", 600),
    "maps": (f"maps --checkpoint {{ckpt}} --layer {LAYER} --dataset {{subset}} --top-k 8 --cache {{cache}} --json",
             600),
    "site": (f"site --out {{work}}/site --layer {LAYER} --examples 4 --cache {{cache}} --json", 600),
    "similarity": ("similarity --checkpoint {ckpt} --image sample:astronaut --image sample:coffee --text "
                   "'xxx porn' --text 'two red circles on the left over a plain background' --json", 300),
    "similarity-matrix": ("similarity --checkpoint {ckpt} --matrix --out {work}/similarity.png --json", 300),
    "audit-captions": ("audit-captions {audit} --term porn --term xxx --term nude --term triangle "
                       "--term 'on the left' --threads 1 --json", 300),
    "sae-train": (f"sae train --checkpoint {{ckpt}} --layer {LAYER} --dataset {{subset}} --features 64 --k 4 "
                  "--epochs 1 --batch-size 256 --out snap --cache {cache} --json", 600),
    "sae-list": (f"sae list --checkpoint {{ckpt}} --layer {LAYER} --cache {{cache}} --json", 300),
    "train-toy": ("train-toy --dataset {subset} --epochs 1 --batch-size 50 --out {work}/toy.pt --json", 600),
}

# Keys whose values differ from run to run; their values become "<masked>" (the key stays).
MASKED_KEYS = {
    "seconds": "wall-clock time (demo: the report and each stage; train-toy; sae train)",
    "time": "a wall-clock time or timestamp, should a command add one (none does today)",
    "elapsed": "the same",
    "written_at": "the same",
}
TIMING_SUFFIXES = ("_s", "_seconds", "_time", "_elapsed")   # keys ending so are timings too (none today)
# Wall-clock times inside strings: (pattern, replacement, reason).
STRING_MASKS = [
    (re.compile(r"\(\d+(?:\.\d+)? s to train\)"), "(<seconds> s to train)",
     "demo: the train stage's detail quotes the training's wall-clock time"),
    (re.compile(r"/[0-9a-f]{20}\.h5\b"), "/<key>.h5",
     "maps: a cache record's file name hashes the dataset's identity, which holds its files' absolute paths and "
     "mtimes (a new demo writes new images); the record's folder (kind/fingerprint/layer) is kept"),
]
MASK = "<masked>"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def masked_key(key: str) -> bool:
    return key in MASKED_KEYS or key.endswith(TIMING_SUFFIXES)


def normalize(value, prefixes, path="", masked=None):
    """The value with timings masked and absolute paths made relative to <OUT>/<REPO>; masked paths are added
    to `masked`. Everything else (keys, list order, numbers, NaN or null) is kept as it is."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            where = f"{path}/{key}"
            if masked_key(str(key)) and item is not None:
                out[key] = MASK
                masked.append(where)
            else:
                out[key] = normalize(item, prefixes, where, masked)
        return out
    if isinstance(value, list):
        return [normalize(item, prefixes, f"{path}/{i}", masked) for i, item in enumerate(value)]
    if isinstance(value, str):
        for prefix, name in prefixes:
            value = value.replace(prefix, name)
        for pattern, replacement, _ in STRING_MASKS:
            value, count = pattern.subn(replacement, value)
            if count:
                masked.append(path)
        return value
    return value


def prepare(out: Path, python: str, env: dict) -> dict:
    """Run the demo if OUT has no finished one; make OUT/work afresh. Returns the placeholders of COMMANDS."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by scripts/json_snapshot.py\n")
    report = out / "demo" / "demo.json"
    done = _finished_demo(report)
    if done is None:
        log(f"demo: running `neurolens demo` into {out} (about 2 minutes on 2 cores)")
        started = time.monotonic()
        proc = subprocess.run([python, "-m", "neurolens", "demo", "--out", str(out / "demo"), "--cache",
                               str(out / "cache"), "--seed", "0"], env=env, cwd=out, timeout=3600,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        done = _finished_demo(report)
        if proc.returncode != 0 or done is None:
            sys.exit(f"the demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        log(f"demo: done in {time.monotonic() - started:.0f} s")
    else:
        log(f"demo: reusing the finished demo in {out / 'demo'}")
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    # the demo's cache records, without the toy data and model (those stay where the demo made them)
    shutil.copytree(out / "cache", work / "cache",
                    ignore=lambda folder, names: ["toy"] if Path(folder) == out / "cache" else [])
    places = {"out": str(out), "work": str(work), "cache": str(work / "cache"), "ckpt": done["checkpoint"],
              "data": done["dataset"], "subset": str(work / "subset.parquet"), "audit": str(work / "audit.parquet")}
    # a small table of the demo's first 400 pairs (absolute image paths) and its captions as TEXT/NSFW columns
    code = ("import os, sys, pyarrow as pa, pyarrow.parquet as pq\n"
            "src, subset, audit = sys.argv[1:4]\n"
            "t = pq.read_table(src); base = os.path.dirname(src); s = t.slice(0, 400)\n"
            "s = s.set_column(0, 'image', pa.array([os.path.join(base, p) for p in s.column('image').to_pylist()]))\n"
            "pq.write_table(s, subset)\n"
            "flags = ['NSFW' if p else 'UNLIKELY' for p in t.column('planted').to_pylist()]\n"
            "pq.write_table(pa.table({'TEXT': t.column('caption'), 'NSFW': pa.array(flags)}), audit)\n")
    subprocess.run([python, "-c", code, places["data"], places["subset"], places["audit"]], env=env, check=True,
                   timeout=300)
    return places


def _finished_demo(report: Path):
    try:
        done = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    # demo.json is written by the index stage itself, so it lists that stage as not run yet
    files = all(done.get(key) and Path(done[key]).is_file() for key in ("checkpoint", "dataset"))
    return done if files and set(done.get("failed") or ()) <= {"index"} else None


def run_command(name: str, python: str, env: dict, places: dict, prefixes) -> dict:
    template, timeout = COMMANDS[name]
    args = [part.format(**places) for part in shlex.split(template)]
    started = time.monotonic()
    try:
        proc = subprocess.run([python, "-m", "neurolens", *args], env=env, cwd=places["work"], timeout=timeout,
                              capture_output=True, text=True)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, stdout, stderr = "timeout", "", f"timed out after {timeout} s: {exc}"
    seconds = time.monotonic() - started
    try:
        output = json.loads(stdout)   # NaN stays NaN, null stays null
    except ValueError:
        output, code = {"stdout": stdout[-2000:]}, code or "no JSON on stdout"   # a failure too
    masked: list = []
    record = {"command": normalize(["neurolens", *args], prefixes, "", []), "exit_code": code,
              "json": normalize(output, prefixes, "", masked)}
    record["masked"] = masked   # where a value was masked: a masked key that appears or goes is a difference
    log(f"{name}: exit {code}, {seconds:.1f} s, {len(stdout)} bytes of JSON")
    if code != 0:
        log(f"{name}: stderr (last lines):\n" + "\n".join(stderr.strip().splitlines()[-15:]))
    return record


def differences(a, b, rtol: float, path: str = ""):
    """(path, saved, now) of every difference, depth first."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                yield f"{path}/{key}", a.get(key, "<absent>"), b.get(key, "<absent>")
            else:
                yield from differences(a[key], b[key], rtol, f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path or '/'} (length)", len(a), len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, rtol, f"{path}/{i}")
    elif type(a) is float and type(b) is float:
        same = (math.isnan(a) and math.isnan(b)) or a == b or (rtol > 0 and abs(a - b) <= rtol * max(abs(a), abs(b)))
        if not same:
            yield path, a, b
    elif type(a) is not type(b) or a != b:
        yield path, a, b


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def dump(record) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


def machine(python: str, env: dict) -> dict:
    code = "import json, torch; print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads()}))"
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    info = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version(), **info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="DIR", nargs="?", const=DEFAULT_DIR,
                      help=f"write one normalized JSON file per command into DIR (default {DEFAULT_DIR})")
    mode.add_argument("--check", metavar="DIR", nargs="?", const=DEFAULT_DIR,
                      help="run again and compare with DIR; exit 1 on any difference or failed command")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="working folder: the demo, its cache, OUT/work")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first: a new demo, retrained from scratch")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of floats (default: exact)")
    parser.add_argument("--only", action="append", choices=list(COMMANDS), help="only this command (repeatable)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs neurolens")
    args = parser.parse_args()

    out = Path(args.out).absolute()
    if args.fresh and out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            sys.exit(f"--fresh: {out} was not made by this script; delete it yourself or choose another --out")
        shutil.rmtree(out)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["NEUROLENS_CACHE"] = str(out / "work" / "cache")   # nothing reaches a default cache
    names = args.only or list(COMMANDS)
    started = time.monotonic()
    places = prepare(out, args.python, env)
    prefixes = [(p, "<OUT>") for p in dict.fromkeys([str(out.resolve()), str(out)])]
    prefixes += [(p, "<REPO>") for p in dict.fromkeys([str(REPO), str(REPO.resolve())])]
    records = {name: run_command(name, args.python, env, places, prefixes) for name in names}
    failed = [name for name, record in records.items() if record["exit_code"] != 0]
    seconds = round(time.monotonic() - started, 1)

    if args.save:
        folder = Path(args.save)
        if failed:
            log(f"not saved: {', '.join(failed)} failed")
            print(json.dumps({"mode": "save", "commands": len(records), "failed": failed, "seconds": seconds}))
            return 1
        folder.mkdir(parents=True, exist_ok=True)
        if not args.only:   # a full run: the folder holds exactly the commands of COMMANDS
            for stale in folder.glob("*.json"):
                if stale.stem not in records and stale.name != "_machine.json":
                    stale.unlink()
        for name, record in records.items():
            (folder / f"{name}.json").write_text(dump(record))
        (folder / "_machine.json").write_text(dump(machine(args.python, env)))
        log(f"saved {len(records)} commands to {folder}")
        print(json.dumps({"mode": "save", "commands": len(records), "saved": len(records), "failed": [],
                          "seconds": seconds}))
        return 0

    folder = Path(args.check)
    if (folder / "_machine.json").is_file() and json.loads((folder / "_machine.json").read_text()) != machine(
            args.python, env):
        log("note: the snapshot was saved on another machine or environment (_machine.json); training is not "
            "bit-identical across machines, so numbers may differ")
    same, different = [], []
    for name, record in records.items():
        try:
            saved = json.loads((folder / f"{name}.json").read_text())
        except (OSError, ValueError) as exc:
            different.append(name)
            log(f"{name}: no saved output ({exc})")
            continue
        now = json.loads(dump(record))   # as it would be saved
        found = list(differences(saved, now, args.rtol))
        if not found:
            same.append(name)
            log(f"{name}: same")
            continue
        different.append(name)
        log(f"{name}: {len(found)} difference(s)")
        for where, a, b in found[:8]:
            log(f"  {where or '/'}: saved {short(a)}  now {short(b)}")
    if not args.only:
        extra = sorted(p.stem for p in folder.glob("*.json") if p.stem not in records and p.name != "_machine.json")
        for name in extra:
            log(f"{name}: saved but no longer in COMMANDS")
        different += extra
    print(json.dumps({"mode": "check", "commands": len(records), "same": len(same), "different": different,
                      "failed": failed, "seconds": seconds}))
    return 1 if different or failed else 0


if __name__ == "__main__":
    sys.exit(main())
