"""Benchmark: neurolens' feature visualization against torch-lucent's render_vis, unit by unit. Prints ONE JSON line.

For every unit, both tools optimize the same objective (the mean over positions of the unit's channel at the
layer, e.g. image_block_4_5's pre-ReLU residual sum) on the same CLIP-normalized input, with the forward
stopped after the layer, from the same seed:

- lucent as users run it (torch-lucent 0.1.8 `render_vis` defaults): `param.image(size)` (Fourier,
  decorrelated colour), `transform.standard_transforms`, Adam lr 0.05, 512 steps (`--lucent-steps`);
- neurolens with the settings of `--quality` (default `fast`, the defaults of `neurolens visualize`).

Activations are measured the same way for both: the objective of the final image, fp32, full size, no
transforms. neurolens' image is evaluated every `--eval-every` steps; those evaluations are not counted
in its time. Per unit:

    lucent_s                      lucent's time for its 512 steps
    neurolens_s                   neurolens' time for all its steps
    time_to_lucent_activation_s   neurolens' time until its image first reaches lucent's final activation
    speedup                       lucent_s / time_to_lucent_activation_s (null: never reached)
    lucent_activation, neurolens_activation (full precision), activation_ratio (neurolens / lucent; null
                                  where lucent's activation is not positive)

and over all units: median_speedup and min_speedup (a unit that never reaches lucent counts as speedup 0),
all_reached, all_at_or_above_lucent (neurolens' final activation >= lucent's on every unit). `--clock wall`
(default) times with time.perf_counter; `--clock cpu` with time.process_time (steadier on a shared machine).

Units: `--units` of `--model`/`--layer` (random weights by default: `--pretrained none`), plus
`--toy-flagged N`: the first N units that the NSFW sweep flags on the trained toy CLIP (the demo's data,
training and sweep; trained once under `--work`), image_block_4_0. The units the defaults were tuned on
(TUNING_UNITS) are refused: report only units the defaults never saw.

Short budgets and the dataset's top-1: `--steps 64 128 256` runs neurolens once per step count (each with the
schedule that count gets: `neurolens.types.budget_settings`), and every unit's record also holds `unit_max` (the
unit's max over the cells of neurolens' image, as a scan measures a dataset image), `dataset_top1` (the unit's
top-1 in a scan of `--top1-dataset`, default the built-in images; the toy's own dataset for toy units) and
`above_top1`; the summary counts, per step count, the units whose visualization reaches the top-1
(`by_steps`). `--schedule earlier` runs the fast defaults as they were before the warm-up/decay/keep-best
schedule (EARLIER_DEFAULTS), `--schedule unbounded` the preset without the short-budget rule, for comparison;
`--no-lucent` skips lucent (its fields are null).

Resumable: every finished unit is appended to `--results` (JSON lines, default under `--work`); a rerun
with the same settings reuses those records and only runs the missing units.

    # the evaluation set (about an hour on a quiet 2-core machine):
    python scripts/bench_visualize.py --units 226 383 923 1670 1799 2123 --toy-flagged 6
    # a check of the script end to end in a minute or two (tiny random model, short runs, small toy):
    python scripts/bench_visualize.py --quick
    # short budgets against the dataset's top-1, the schedule now and before (no lucent):
    python scripts/bench_visualize.py --units 226 383 923 1670 1799 2123 --toy-flagged 6 --steps 64 128 256 --no-lucent
    python scripts/bench_visualize.py --units 226 383 923 1670 1799 2123 --toy-flagged 6 --steps 64 128 256 --no-lucent --schedule earlier
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from neurolens.activations.hooks import forward_to  # noqa: E402
from neurolens.models.build import load_clip  # noqa: E402
from neurolens.models.layer_table import resolve_layer  # noqa: E402
from neurolens.optvis.loop import evaluate, render  # noqa: E402
from neurolens.pipelines.scan import run_scan  # noqa: E402
from neurolens.storage.cache import Cache  # noqa: E402
from neurolens.types import RenderSettings, budget_settings, quality_settings  # noqa: E402

# The units the defaults were chosen on (see docs): never part of a reported evaluation.
TUNING_UNITS = {
    ("RN50x4", "image_block_4_5"): (1543, 100, 2000),
    ("toy", "image_block_4_0"): (84, 166, 50, 486),   # the toy's first four flagged units (demo settings, seed 0)
    ("RN50", "image_block_4_2"): (300,),              # issue 22's short-budget example (the budget rule)
}
TOY_LAYER = "image_block_4_0"
# The fast defaults before commit 56c52a0 (lr 0.35, half the steps at half resolution, a constant lr, the last
# image): `--schedule earlier` runs them to compare short budgets with the schedule now.
EARLIER_DEFAULTS = dict(lr=0.35, low_res_fraction=0.5, lr_warmup=0.0, lr_decay_start=1.0, lr_final=0.0, keep_best=0)


class StopAtLayer(torch.nn.Module):
    """What lucent optimizes: CLIP-normalize, run to the layer, keep its activation for the objective."""

    def __init__(self, clip, spec):
        super().__init__()
        self.clip, self.spec, self.inner, self.last = clip, spec, clip.model, None

    def forward(self, images):
        self.last = forward_to(self.clip.model, self.clip.normalize(images), [self.spec])[self.spec.name]
        return self.last


def remove_all_hooks(model: torch.nn.Module) -> None:
    """lucent's render_vis leaves a forward hook on every module; clear them before neurolens runs."""
    for module in model.modules():
        module._forward_hooks.clear()


class Clock:
    """Reads the time after waiting for queued CUDA work, so that GPU steps are charged to the part that
    launched them (neurolens' timed steps, not the untimed evaluations that follow)."""

    def __init__(self, kind: str):
        self.read = time.process_time if kind == "cpu" else time.perf_counter

    def now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.read()


def run_lucent(clip, spec, unit, size, steps, seed, clock):
    try:
        from lucent.optvis import objectives, param, render as lucent_render, transform
    except ImportError:
        raise SystemExit("this benchmark compares against torch-lucent: pip install 'neurolens[lucent]'") from None

    wrapper = StopAtLayer(clip, spec).eval()
    objective = objectives.Objective(lambda hook: -wrapper.last[:, unit].mean())
    torch.manual_seed(seed)
    started = clock.now()
    try:
        images = lucent_render.render_vis(
            wrapper, objective, param_f=lambda: param.image(size), transforms=transform.standard_transforms,
            thresholds=(steps,), preprocess=False, show_image=False, progress=False, fixed_image_size=size)
    finally:
        seconds = clock.now() - started
        remove_all_hooks(clip.model)
    final = torch.from_numpy(images[-1]).permute(0, 3, 1, 2).to(clip.device)
    return seconds, float(evaluate(clip, spec, "channel", [unit], final)[0])


def run_neurolens(clip, spec, unit, settings, target, eval_every, clock):
    excluded, reached = [0.0], [None]
    started = clock.now()

    def on_step(step, current_images):
        if (step + 1) % eval_every and step + 1 != settings.steps:
            return
        pause = clock.now()
        value = float(evaluate(clip, spec, "channel", [unit], current_images())[0])
        if reached[0] is None and value >= target:
            reached[0] = pause - started - excluded[0]
        excluded[0] += clock.now() - pause

    output = render(clip, spec, [unit], settings, on_step=on_step)
    seconds = clock.now() - started - excluded[0]
    return seconds, float(output.activations[0]), reached[0], float(output.maxima[0])


def toy_checkpoint_and_flagged(work: Path, quick: bool):
    """The trained toy CLIP (the demo's settings, or a small one with --quick) and its flagged units in rank order."""
    from neurolens.pipelines.demo import DemoSettings
    from neurolens.toy.store import toy_dataset, toy_model
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    from neurolens.toy.settings import TrainSettings

    settings = DemoSettings(images=400, train=TrainSettings(epochs=1)) if quick else DemoSettings()
    root = work / ("toy-quick" if quick else "toy")
    data = toy_dataset(root, settings=settings.data_settings())
    checkpoint, _, _ = toy_model(root, data, settings.data_settings(), settings.train_settings())
    clip = load_clip(checkpoint=str(checkpoint), device="cpu")
    sweep = run_sweep(clip, TOY_LAYER, str(data), vocab=f"{data}:caption", top_k=settings.top_k,
                      text_top_k=settings.text_top_k, cache=Cache(root / "cache"), out=root / "flags",
                      labels=list(settings.labels), detector=settings.detector)
    units = sweep.flagged_units or [int(u) for u in sweep.scores.ranking()]
    return checkpoint, units, bool(sweep.flagged_units), (str(data), Cache(root / "cache"), settings.top_k)


def schedule_settings(schedule: str, quality: str, steps: int, **fixed) -> RenderSettings:
    """The settings a run of `steps` gets: the preset with the short-budget rule, or the earlier defaults."""
    if schedule == "earlier":
        return RenderSettings(steps=steps, **EARLIER_DEFAULTS, **fixed)
    if schedule == "unbounded":
        return quality_settings(quality, steps=steps, **fixed)
    return budget_settings(quality_settings(quality, steps=steps, **fixed))


def record_key(entry: dict) -> str:
    return hashlib.sha1(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:20]


def load_results(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["key"]] = record
            except (ValueError, KeyError):
                continue  # a line cut by an interruption: that unit runs again
    return done


def summarize_top1(records: list) -> dict:
    """How many units' visualizations reach the dataset's top-1 (records of one step count)."""
    known = [r for r in records if r.get("dataset_top1") is not None and r.get("unit_max") is not None]
    ratios = [r["unit_max"] / r["dataset_top1"] for r in known if r["dataset_top1"] > 0]
    return {"units": len(records), "above_top1": sum(r["unit_max"] >= r["dataset_top1"] for r in known),
            "median_top1_ratio": round(statistics.median(ratios), 3) if ratios else None,
            "median_activation": round(statistics.median(r["neurolens_activation"] for r in records), 4)
            if records else None}


def summarize(records: list) -> dict:
    if not records or records[0]["lucent_activation"] is None:
        return {}
    speedups = [r["speedup"] or 0.0 for r in records]
    return {
        "median_speedup": round(statistics.median(speedups), 2) if speedups else None,
        "min_speedup": round(min(speedups), 2) if speedups else None,
        "all_reached": all(r["speedup"] is not None for r in records),
        "all_at_or_above_lucent": all(r["neurolens_activation"] >= r["lucent_activation"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="RN50x4")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--layer", default="image_block_4_5")
    parser.add_argument("--units", type=int, nargs="*", default=[])
    parser.add_argument("--toy-flagged", type=int, default=0, metavar="N",
                        help="add the toy CLIP's first N flagged units (tuning units skipped)")
    parser.add_argument("--size", type=int, default=0, help="0: the model's input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", default="fast", help="neurolens preset: fast | microscope")
    parser.add_argument("--lucent-steps", type=int, default=512)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--work", default="outputs/bench_visualize", help="toy model, sweep cache, results")
    parser.add_argument("--results", default=None, help="JSON-lines file of finished units (default: WORK/results.jsonl)")
    parser.add_argument("--quick", action="store_true",
                        help="check the script: nl-tiny-RN units 3 10, 16 lucent steps, a small toy, 2 flagged units")
    parser.add_argument("--steps", type=int, nargs="*", default=[],
                        help="neurolens step counts, one run each (default: the preset's)")
    parser.add_argument("--schedule", choices=("current", "earlier", "unbounded"), default="current",
                        help="earlier: the fast defaults before the warm-up/decay/keep-best schedule (EARLIER_DEFAULTS); "
                             "unbounded: the preset without the short-budget rule (types.budget_settings)")
    parser.add_argument("--no-lucent", action="store_true", help="neurolens only (lucent's fields are null)")
    parser.add_argument("--top1-dataset", default=None,
                        help="the dataset whose top-1 each --units unit is compared with (default: the built-in images)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else work / ("results-quick.jsonl" if args.quick else "results.jsonl")
    if args.quick:
        args.model, args.layer, args.units, args.lucent_steps = "nl-tiny-RN", "image_block_3_0", [3, 10], 16
        args.toy_flagged = args.toy_flagged or 2
    if args.schedule == "earlier" and args.quality != "fast":
        parser.error("--schedule earlier compares the fast preset's schedule; use it with --quality fast")
    budgets = args.steps or [16 if args.quick else quality_settings(args.quality).steps]
    lucent_steps = None if args.no_lucent else args.lucent_steps

    jobs = []  # (label, clip loader, layer, units, (top-1 dataset, its cache, top-k))
    if args.units:
        jobs.append((args.model, lambda: load_clip(args.model, args.pretrained, device=args.device), args.layer,
                     list(dict.fromkeys(args.units)), (args.top1_dataset, Cache(work / "cache"), 32)))
    if args.toy_flagged:
        checkpoint, flagged, any_flagged, toy_top1 = toy_checkpoint_and_flagged(work, args.quick)
        tuning = set(TUNING_UNITS.get(("toy", TOY_LAYER), ()))
        chosen = [u for u in flagged if u not in tuning][:args.toy_flagged]
        if not any_flagged:
            print(f"note: the toy sweep flagged no unit; using its top-ranked units {chosen}", file=sys.stderr)
        jobs.append(("toy", lambda: load_clip(checkpoint=str(checkpoint), device=args.device), TOY_LAYER, chosen,
                     toy_top1))
    if not jobs:
        parser.error("give --units and/or --toy-flagged N (or --quick)")

    done = load_results(results_path)
    records, shown_settings = [], {}
    for label, loader, layer, units, (top1_dataset, top1_cache, top1_k) in jobs:
        clip = loader()
        spec = resolve_layer(clip, layer)
        tuning = set(TUNING_UNITS.get((label, spec.name), ()))
        if tuning & set(units):
            parser.error(f"{label} {spec.name} units {sorted(tuning & set(units))} were used to tune the defaults; "
                         f"benchmark other units")
        size = args.size or clip.image_size
        scan = run_scan(clip, spec.name, top1_dataset, top_k=top1_k, cache=top1_cache)
        lucent = {}   # unit -> (seconds, activation): one lucent run per unit, whatever the budgets
        for steps in budgets:
            settings = schedule_settings(args.schedule, args.quality, steps, size=size, seeds=(args.seed,),
                                         precision=args.precision)
            shown_settings[steps] = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("size", "seeds")}
            for unit in units:
                records.append(run_unit(args, label, clip, spec, unit, size, settings, lucent_steps, lucent, scan,
                                        done, results_path))

    fields = ("model", "layer", "unit", "steps", "lucent_s", "neurolens_s", "time_to_lucent_activation_s", "speedup",
              "lucent_activation", "neurolens_activation", "activation_ratio", "unit_max", "dataset_top1",
              "above_top1")
    print(json.dumps({
        "benchmark": "visualize", "quality": args.quality, "schedule": args.schedule, **summarize(records),
        "by_steps": {str(steps): {**summarize_top1([r for r in records if r["steps"] == steps]),
                                  **summarize([r for r in records if r["steps"] == steps])} for steps in budgets},
        "units": [{k: r.get(k) for k in fields} for r in records],
        "per_model": {label: summarize([r for r in records if r["model"] == label]) for label, *_ in jobs},
        "top1_datasets": {label: top1 or "built-in images" for label, _, _, _, (top1, _, _) in jobs},
        "neurolens_settings": shown_settings[budgets[-1]] if len(budgets) == 1 else shown_settings,
        "lucent_steps": lucent_steps, "seed": args.seed,
        "clock": args.clock, "device": args.device, "threads": torch.get_num_threads(), "results": str(results_path),
        "torch": torch.__version__, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2),
    }))


def run_unit(args, label, clip, spec, unit, size, settings, lucent_steps, lucent, scan, done, results_path) -> dict:
    """One unit at one step count: from the results file, or run (lucent once per unit) and appended to it."""
    identity = {"model": label, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
                "layer": spec.name, "unit": unit, "size": size, "seed": args.seed,
                "lucent_steps": lucent_steps, "settings": dataclasses.asdict(settings),
                "eval_every": args.eval_every, "clock": args.clock, "device": str(clip.device),
                "threads": torch.get_num_threads()}
    key = record_key(identity)
    top1 = float(scan.top_values[unit, 0])
    if key in done:
        print(f"{label} unit {unit} ({settings.steps} steps): from {results_path}", file=sys.stderr)
        record = done[key]
        record.setdefault("steps", settings.steps)
        record["dataset_top1"] = top1
        if record.get("unit_max") is not None:
            record["above_top1"] = record["unit_max"] >= top1
        return record
    clock = Clock(args.clock)
    if lucent_steps is not None and unit not in lucent:
        lucent[unit] = run_lucent(clip, spec, unit, size, lucent_steps, args.seed, clock)
    lucent_s, lucent_activation = lucent.get(unit, (None, None))
    target = float("inf") if lucent_activation is None else lucent_activation
    neurolens_s, neurolens_activation, reached_s, unit_max = run_neurolens(
        clip, spec, unit, settings, target, args.eval_every, clock)
    record = dict(key=key, model=label, layer=spec.name, unit=unit, steps=settings.steps,
                  lucent_s=None if lucent_s is None else round(lucent_s, 3), neurolens_s=round(neurolens_s, 3),
                  time_to_lucent_activation_s=None if reached_s is None else round(reached_s, 3),
                  speedup=None if reached_s is None else round(lucent_s / reached_s, 3),
                  lucent_activation=lucent_activation, neurolens_activation=neurolens_activation,
                  activation_ratio=(neurolens_activation / lucent_activation
                                    if lucent_activation is not None and lucent_activation > 0 else None),
                  unit_max=unit_max, dataset_top1=top1, above_top1=unit_max >= top1,
                  load_avg=round(os.getloadavg()[0], 2), identity=identity)
    with results_path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    shown = "skipped" if lucent_s is None else f"{lucent_s:.1f} s -> {lucent_activation:.6g}"
    print(f"{label} unit {unit} ({settings.steps} steps): lucent {shown}; neurolens "
          f"{neurolens_s:.1f} s -> {neurolens_activation:.6g}, max {unit_max:.4g} vs top-1 {top1:.4g}; "
          f"speedup {record['speedup']}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
