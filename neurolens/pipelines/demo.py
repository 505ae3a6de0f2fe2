"""The offline end-to-end demo: a generated dataset with a planted concept, a toy CLIP trained on it, and every
job of neurolens run on that model, with an index of what was made.

Stages, in order: data (generate, cached by settings), train (or reuse the cached checkpoint, keyed by the
data and training settings and the torch version), scan, text, sweep, visualize, figure, grid, index.
A stage that fails (a missing module included) is recorded as failed with its reason, stages that need its
result are recorded as not run, and the report's `failed` lists them: nothing is skipped silently.

Cache layout (under the cache root): the toy dataset and checkpoint of neurolens.toy.store
(toy/data/<key>/, toy/models/<key>.pt) and the usual scan/, text/, sweep/, render/ records of the other jobs.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ..datasets.open import open_dataset
from ..labels.policy import BlurPolicy
from ..models.build import load_clip
from ..records.index import layer_id
from ..records.keys import as_cache
from ..serve.site import write_site
from ..storage.cache import Cache
from ..storage.files import WriteError, ensure_folder, write_text
from ..toy.concepts import planted_words
from ..toy.evaluate import flag_quality
from ..toy.generate import ToySettings
from ..toy.settings import TrainSettings
from ..toy.store import toy_dataset, toy_model
from ..types import RenderSettings
from .figures import run_figure, run_grid
from .scan import run_scan
from .sweep import run_sweep
from .text import run_text
from .topmaps import run_top_maps
from .visualize import run_visualize

StageProgress = Optional[Callable[[str, int, int], None]]
STAGES = ("data", "train", "scan", "text", "sweep", "visualize", "figure", "grid", "maps", "site", "index")
INDEX_FLAGGED_ROWS = 30   # rows of the flagged-units table in index.md; the rest are named in flags.csv


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    images: int = 3000
    size: int = 64
    planted_share: float = 0.15
    train: TrainSettings = TrainSettings()
    layer: str = "image_block_4_0"          # the toy's last residual block (its Microscope-style analogue of 4_5)
    # "captions": the dataset's own captions (a toy text tower knows only its ~60 training words, so a
    # 47k-entry vocabulary mostly ranks words it never saw); or any load_vocab spec, e.g. "builtin".
    vocab: str = "captions"
    top_k: int = 32
    text_top_k: int = 30
    figure_units: int = 3                   # unit panels for the top flagged units
    visualize_units: int = 6                # feature visualizations for the top flagged units
    grid_units: int = 16
    render: RenderSettings = RenderSettings(seeds=(0, 1))   # the fast preset, two seeds
    site_examples: int = 8                  # dataset examples per unit page of the static site
    device: str = "cpu"
    labels: Tuple[str, ...] = ("auto",)     # the sweep's label sources (--labels)
    # NudeNet in `auto`: off, because it finds nothing in abstract generated images (its agreement with the
    # captions would be about 0.5 and it would be dropped) and costs ~60 ms of CPU per image
    detector: bool = False

    def data_settings(self) -> ToySettings:
        return ToySettings(n=self.images, size=self.size, planted_share=self.planted_share, seed=self.seed)

    def train_settings(self) -> TrainSettings:
        values = asdict(self.train)
        values["seed"] = self.seed
        return TrainSettings(**values)


@dataclass
class Stage:
    name: str
    status: str = "not run"                 # ok | failed | not run
    seconds: float = 0.0
    detail: str = ""
    outputs: List[str] = field(default_factory=list)


@dataclass
class DemoReport:
    out: Path
    index: Optional[Path] = None
    stages: Dict[str, Stage] = field(default_factory=dict)
    dataset: Optional[str] = None
    checkpoint: Optional[str] = None
    trained: bool = False                   # False: the cached checkpoint was reused
    zero_shot: Optional[dict] = None
    flagged: List[dict] = field(default_factory=list)   # per flagged unit: unit, auc, q, planted_auc, planted_top_share, top_texts
    labels: List[str] = field(default_factory=list)     # the sweep's label lines (sources, agreement, used)
    label_sources: List[dict] = field(default_factory=list)   # per source: name, counts, agreement, kept
    quality: Optional[dict] = None                      # flags against the generator's truth (toy.evaluate.FlagQuality)
    flagged_without_planted: Optional[float] = None     # share of flagged units with no planted image in their top-k
    fv_nsfw_scores: Dict[int, List[float]] = field(default_factory=dict)   # per visualized unit, per seed
    figures: List[dict] = field(default_factory=list)   # per unit panel: path, unit, crops, planted, planted_blurred
    seconds: float = 0.0
    serve_command: str = ""                             # opens the same cache in the web app

    @property
    def failed(self) -> List[str]:
        return [s.name for s in self.stages.values() if s.status != "ok"]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["index"] = str(self.index) if self.index else None
        data["failed"] = self.failed
        return data

    def summary(self) -> str:
        lines = [f"demo written to {self.out} in {self.seconds:.0f} s; index: {self.index}"]
        for stage in self.stages.values():
            lines.append(f"  {stage.name:<10} {stage.status:<8} {stage.seconds:6.1f} s  {stage.detail}")
        if self.serve_command:
            lines.append(f"browse every unit in the web app: {self.serve_command}")
        return "\n".join(lines)


def run_demo(out: str | Path = "outputs/demo", settings: DemoSettings = DemoSettings(), cache=None,
             retrain: bool = False, progress: StageProgress = None) -> DemoReport:
    """Run every stage (see the module docstring) and write OUT/index.md; returns the report."""
    started = time.perf_counter()
    out = Path(out)
    ensure_folder(out)
    cache = as_cache(cache)
    report = DemoReport(out=out, stages={name: Stage(name) for name in STAGES})
    state: dict = {}

    def stage_progress(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    def run(name: str, needs: tuple, job: Callable[[Stage], None]) -> None:
        stage = report.stages[name]
        missing = [n for n in needs if report.stages[n].status != "ok"]
        if missing:
            stage.detail = f"needs {', '.join(missing)}"
            return
        begun = time.perf_counter()
        try:
            job(stage)
            stage.status = "ok"
        except WriteError:
            raise   # a full or read-only disk stops the demo with one line; a rerun resumes from the cache
        except ImportError as exc:
            stage.status, stage.detail = "failed", f"module missing: {exc}"
        except Exception as exc:  # recorded and shown in the index, never swallowed
            stage.status = "failed"
            stage.detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            write_text(out / f"{name}_error.txt", traceback.format_exc())
        stage.seconds = time.perf_counter() - begun

    def data(stage: Stage) -> None:
        path = toy_dataset(cache.root, settings=settings.data_settings(), progress=stage_progress("data"))
        report.dataset = str(path)
        state["vocab"] = f"{path}:caption" if settings.vocab == "captions" else settings.vocab
        state["dataset"] = open_dataset(str(path))
        state["planted"] = np.asarray(pq.read_table(path, columns=["planted"]).column("planted").to_pylist(), bool)
        stage.detail = f"{len(state['dataset'])} pairs, {int(state['planted'].sum())} planted"
        stage.outputs.append(str(path))

    def train(stage: Stage) -> None:
        checkpoint, summary, trained = toy_model(cache.root, Path(report.dataset), settings.data_settings(),
                                                 settings.train_settings(), retrain, stage_progress("train"),
                                                 stage_progress("load images"))
        report.checkpoint, report.trained, report.zero_shot = str(checkpoint), trained, summary["zero_shot"]
        state["clip"] = load_clip(checkpoint=str(checkpoint), device=settings.device)
        z = summary["zero_shot"]
        stage.detail = (f"{'trained' if trained else 'cached'} ({summary['seconds']} s to train); zero-shot "
                        f"accuracy {z['accuracy']:.3f} (chance {z['chance']:.3f})")
        stage.outputs.append(str(checkpoint))

    def scan(stage: Stage) -> None:
        state["scan"] = run_scan(state["clip"], settings.layer, state["dataset"], top_k=settings.top_k, cache=cache,
                                 embeddings=True, progress=stage_progress("scan"))
        stage.detail = f"{settings.layer}: {state['scan'].channels} units over {state['scan'].count} images"

    def text(stage: Stage) -> None:
        state["text"] = run_text(state["clip"], settings.layer, vocab=state["vocab"], top_k=settings.text_top_k,
                                 scan=state["scan"], cache=cache, progress=stage_progress("text"))
        stage.detail = f"vocabulary {settings.vocab}: {len(state['text'].entries)} entries"

    def sweep(stage: Stage) -> None:
        result = run_sweep(state["clip"], settings.layer, state["dataset"], vocab=state["vocab"],
                           top_k=settings.top_k, text_top_k=settings.text_top_k, cache=cache,
                           progress=stage_progress("sweep"), out=out / "sweep", labels=list(settings.labels),
                           detector=settings.detector)
        state["sweep"] = result
        quality = flag_quality(result.scores.flagged, result.scan.per_image_max(), state["planted"])
        report.quality = quality.to_dict()
        report.labels = result.labels.lines() + [line for line in result.lines() if not line.startswith("labels: ")]
        report.label_sources = result.labels.as_attrs()["sources"]
        _summarize_flags(report, result, state["planted"], settings.top_k, quality.planted_auc)
        stage.detail = (f"{len(report.flagged)} of {len(result.scores.flagged)} units flagged against "
                        f"{' + '.join(result.labels.used)}; precision {quality.precision:.3f}, recall "
                        f"{quality.recall:.3f} (generator truth)")
        stage.outputs.append(str(result.flags_csv))

    def chosen_units(count: int) -> List[int]:
        result = state["sweep"]
        units = result.flagged_units or [int(u) for u in result.scores.ranking()]
        return units[:count]

    def visualize(stage: Stage) -> None:

        units = chosen_units(settings.visualize_units)
        policy = BlurPolicy.for_layer(state["clip"], settings.layer, cache, flagged=state["sweep"].flagged_units)
        results = run_visualize(state["clip"], settings.layer, units, settings.render, cache=cache,
                                out_dir=out / "visualize", progress=stage_progress("visualize"), policy=policy)
        for r in results:
            stage.outputs.extend(r.paths)
            # the trained toy's zero-shot score of each image, for the index (kept by the policy: no new forward)
            scores = [policy.zero_shot_score(Image.fromarray(np.asarray(image))) for image in r.images]
            report.fv_nsfw_scores[int(r.unit)] = [float("nan") if s is None else float(s) for s in scores]
        stage.detail = "; ".join(f"unit {r.unit}: max NSFW score {max(report.fv_nsfw_scores[int(r.unit)]):.2f}, "
                                 f"{sum(b is not None for b in r.blurred)} of {len(r.blurred)} blurred"
                                 for r in results)

    def figure(stage: Stage) -> None:
        written = run_figure(state["clip"], settings.layer, chosen_units(settings.figure_units), state["dataset"], vocab=state["vocab"],
                             top_k=settings.top_k, text_top_k=settings.text_top_k, out=out / "figures",
                             render_settings=settings.render, cache=cache, progress=stage_progress("figure"),
                             labels=list(settings.labels), detector=settings.detector)
        stage.outputs.extend(str(path) for path, _ in written)
        for path, fig in written:
            crops = [p for p in fig.placed if p.kind == "crop"]
            planted = [p for p in crops if 0 <= p.source_index < len(state["planted"]) and state["planted"][p.source_index]]
            report.figures.append(dict(path=str(path), unit=crops[0].unit if crops else None, crops=len(crops),
                                       planted=len(planted), planted_blurred=sum(p.reason is not None for p in planted)))
        stage.detail = f"{len(written)} unit panels, {sum(f.blurred for _, f in written)} tiles blurred"

    def grid(stage: Stage) -> None:
        flagged = bool(state["sweep"].flagged_units)
        path, fig, units = run_grid(state["clip"], settings.layer, flagged=flagged, top=settings.grid_units,
                                    dataset=state["dataset"], vocab=state["vocab"], top_k=settings.top_k,
                                    text_top_k=settings.text_top_k, out=out / "figures",
                                    render_settings=settings.render, cache=cache, progress=stage_progress("grid"),
                                    labels=list(settings.labels), detector=settings.detector)
        stage.outputs.append(str(path))
        stage.detail = f"{len(units)} {'flagged' if flagged else 'top'} units, {fig.blurred} tiles blurred"

    run("data", (), data)
    run("train", ("data",), train)
    run("scan", ("train",), scan)
    run("text", ("scan",), text)
    run("sweep", ("text",), sweep)
    run("visualize", ("sweep",), visualize)
    run("figure", ("sweep",), figure)
    run("grid", ("sweep",), grid)
    run("maps", ("scan",), lambda stage: _top_maps(state, settings, cache, stage, stage_progress("maps")))
    run("site", ("sweep", "visualize", "maps"),
        lambda stage: _site(state, settings, cache, out, stage, stage_progress("site")))
    report.serve_command = f"neurolens serve --cache {cache.root}"
    report.seconds = time.perf_counter() - started
    run("index", (), lambda stage: _write_index(report, settings, stage))
    return report


def _top_maps(state: dict, settings: DemoSettings, cache: Cache, stage: Stage, progress) -> None:
    result = run_top_maps(state["clip"], settings.layer, scan=state["scan"], dataset=state["dataset"], cache=cache,
                          progress=progress)
    stage.detail = f"activation maps of the top {settings.top_k} images of every unit ({result.images} images)"


def _site(state: dict, settings: DemoSettings, cache: Cache, out: Path, stage: Stage, progress) -> None:
    """The static site of the inspected layer (blurred images only): OUT/site/index.html."""
    result = write_site(cache, out / "site", layers=[layer_id(state["clip"].fingerprint, settings.layer)],
                        examples=settings.site_examples, progress=progress)
    stage.detail = f"{result.pages} pages, {result.images} blurred images{' (up to date)' if result.cached else ''}"
    stage.outputs.append(str(result.index))


def _summarize_flags(report: DemoReport, sweep, planted: np.ndarray, top_k: int, truth: List[float]) -> None:
    """Per flagged unit: AUC, q, planted AUC (generator truth), the planted share of its top images, whether
    its top texts hold planted words."""
    words = set(planted_words())
    indices = np.asarray(sweep.scan.top_indices)[:, :top_k]
    rows = []
    for unit in sweep.flagged_units:
        valid = indices[unit][indices[unit] >= 0]
        share = float(planted[valid].mean()) if len(valid) else 0.0
        texts = [t for t, _, _ in sweep.top_texts(unit, 5)]
        rows.append(dict(unit=unit, auc=float(sweep.scores.auc[unit]), q=float(sweep.scores.q[unit]),
                         planted_auc=float(truth[unit]), correlation=float(sweep.scores.correlation[unit]),
                         planted_top_share=share,
                         top_texts=texts, texts_with_planted_words=sum(bool(words & set(t.lower().split()))
                                                                       for t in texts)))
    report.flagged = rows
    if rows:
        report.flagged_without_planted = float(np.mean([r["planted_top_share"] == 0.0 for r in rows]))


def _rel(path: str, out: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _write_index(report: DemoReport, settings: DemoSettings, stage: Stage) -> None:
    out = report.out
    lines = ["# neurolens demo", "",
             f"A toy CLIP (`{settings.train.model}`) trained on {settings.images} generated image-caption pairs, "
             f"{settings.planted_share:.0%} of them showing the planted pattern (a magenta/pink checkerboard disc) "
             f"with captions made of NSFW-lexicon words. Layer inspected: `{settings.layer}`. "
             f"Total time {report.seconds:.0f} s.", ""]
    if report.checkpoint:
        lines += [f"- dataset: `{report.dataset}`",
                  f"- checkpoint: `{report.checkpoint}` ({'trained in this run' if report.trained else 'reused from the cache'}); "
                  f"load it with `--checkpoint {report.checkpoint}`"]
    if report.zero_shot:
        z = report.zero_shot
        per = ", ".join(f"{k} {v:.2f} (chance {z['attribute_chance'][k]:.2f})" for k, v in z["attribute_accuracy"].items())
        lines += [f"- zero-shot accuracy on {z['images']} held-out generated pairs: **{z['accuracy']:.3f}** "
                  f"(chance {z['chance']:.3f}); per attribute: {per}; planted vs ordinary caption "
                  f"{z['planted_accuracy']:.3f} (chance 0.5); image-to-caption retrieval@1 {z['retrieval_at_1']:.3f} "
                  f"(chance {z['retrieval_chance']:.3f})"]
    lines += ["", "## Stages", "", "| stage | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for s in report.stages.values():
        if s.name != "index":
            lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |")
    if report.labels:
        lines += ["", "## Labels", "",
                  "Where the sweep's per-image labels came from, how far each source agrees with the others "
                  "(ROC AUC of its score against their labels), and what was used:", ""]
        lines += [f"- {line}" for line in report.labels]
    if report.quality:
        q = report.quality
        lines += ["", "## Flags against the ground truth", "",
                  "The generator knows which images are planted. A unit's *planted AUC* is the ROC AUC of its "
                  "activation, planted images against the others, over the swept images (generator labels, not "
                  "captions). *Precision*: the share of flagged units whose planted AUC is >= 0.8; *recall*: the "
                  "share of units with planted AUC >= 0.95 that are flagged.", "",
                  f"- flagged: {q['flagged']} units; units with planted AUC >= 0.8: {q['related_units']}, "
                  f">= 0.95: {q['planted_units']}",
                  f"- precision **{q['precision']:.3f}**, recall **{q['recall']:.3f}**"]
    if report.flagged:
        lines += ["", "## Flagged units", "",
                  f"Ranked by AUC. Planted share: the share of the unit's top {settings.top_k} dataset images that "
                  f"show the planted pattern. Flagged units with no planted image among their top images: "
                  f"{report.flagged_without_planted:.0%}.", "",
                  "| unit | AUC | q | planted AUC (truth) | planted share of top images | top texts |",
                  "| --- | --- | --- | --- | --- | --- |"]
        shown = report.flagged[:INDEX_FLAGGED_ROWS]
        for row in shown:
            lines.append(f"| {row['unit']} | {row['auc']:.3f} | {row['q']:.1e} | {row['planted_auc']:.3f} | "
                         f"{row['planted_top_share']:.2f} | {' / '.join(row['top_texts']).replace('|', '/')} |")
        if len(shown) < len(report.flagged):
            sweep_stage = report.stages.get("sweep")
            csv = next((p for p in sweep_stage.outputs if p.endswith(".csv")), None) if sweep_stage else None
            where = f"[{_rel(csv, out)}]({_rel(csv, out)})" if csv else "the sweep's flags.csv"
            lines += ["", f"Showing {len(shown)} of {len(report.flagged)} flagged units; all in {where}."]
    outputs = [(s.name, p) for s in report.stages.values() for p in s.outputs if s.name not in ("data", "train")]
    if outputs:
        lines += ["", "## Files", ""]
        lines += [f"- {name}: [{_rel(p, out)}]({_rel(p, out)})" for name, p in outputs]
    failed = [s for s in report.stages.values() if s.status != "ok" and s.name != "index"]
    if failed:
        lines += ["", "## Not done", ""]
        lines += [f"- **{s.name}**: {s.status}: {s.detail}" for s in failed]
    path = out / "index.md"
    write_text(path, "\n".join(lines) + "\n")
    write_text(out / "demo.json", json.dumps(report.to_dict(), indent=2, default=str))
    report.index = path
    stage.outputs.append(str(path))
