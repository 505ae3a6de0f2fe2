"""`neurolens.open`: a notebook's handle on one model, layer and dataset in a cache, whose answers render
themselves in Jupyter (neurolens.display.notebook and .dashboard).

    import neurolens
    h = neurolens.open("outputs/cache", checkpoint="toy.pt", layer="image_block_4_0", dataset="data.parquet")
    h.unit(5)              # the unit's dashboard: visualization, top crops, histogram, top texts, NSFW evidence
    h.unit(5).reveal()     # a NEW dashboard with raw pixels; the first stays blurred
    h.layer()              # the layer's flags (the sweep, computed if it is not cached)
    h.sae_quality()        # with sae=...: the SAE's quality report

Cache first: the model is a LazyClip (neurolens.pipelines.model) when the cache holds its model card, and
every answer is read from the cache records the CLI writes with the same settings (`neurolens visualize`,
`scan`, `text`, `sweep`), so a cached answer loads no model. What is missing is computed by the same
pipelines (the model loaded on first need), with progress on stderr. unit() uses the sweep when it is
cached and never starts one (a sweep labels every image of the dataset: NudeNet included, minutes);
layer() and sweep() compute it.

Which record: the scan of the handle's dataset and top_k; the feature visualizations of `render` settings,
or without them the cached ones of the unit with the most steps (else rendered with the fast preset); the
texts of the sweep when there is one, else the cached ranking of the vocabulary (referenced to the scan's
mean activation, else the neutral image), else ranked now at the scan's mean.

Blur: the decisions of figures (neurolens.pipelines.figures.blur_policy: the sweep's flags and image labels,
every cached sweep's flags, NudeNet, a trained model's zero-shot score; `blur_all=True` blurs everything,
as the web app does before a reveal); pixels are raw only after `.reveal()`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
from PIL import Image

from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..display.dashboard import UnitDashboard
from ..display.notebook import Evidence, Histogram, LayerFlags, Picture, SaeQuality, Samples, Texts, Visualizations
from ..labels.policy import BlurPolicy
from ..models.layer_table import resolve_layer
from ..models.names import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..records import visualize as visualize_records
from ..records.keys import NEURONS, as_cache
from ..records.sweep import unit_evidence
from ..sae.basis import load_basis
from ..serve.charts import histogram_chart
from ..serve.layer import HISTOGRAM_BINS, Histogram as Counts, layer_histograms
from ..types import RenderSettings
from .figures import blur_policy
from .model import load_model
from .samples import unit_crops, unit_rows
from .scan import run_scan
from .settings import SweepSettings
from .sweep import run_sweep
from .sweep_find import find_sweep
from .text import find_text, run_text
from .visualize import run_visualize

Progress = Optional[Callable[[int, int], None]]
FV_PIXELS = 160          # feature visualizations as the dashboard shows them (a smaller render is enlarged)
CROP_PIXELS = 112        # dataset crops


def stderr_progress(label: str) -> Callable[[int, int], None]:
    """A progress callback that rewrites one stderr line (a notebook shows it under the cell), at most 4 a second."""
    last = [0.0]
    started = [False]

    def update(done: int, total: int, description: Optional[str] = None) -> None:
        if not started[0] and total and done >= total:
            return                        # a cached answer reports itself done at once: nothing to show
        started[0] = True
        now = time.monotonic()
        if done < total and now - last[0] < 0.25:
            return
        last[0] = now
        end = "\n" if total and done >= total else ""
        sys.stderr.write(f"\r{label}: {done}/{total}{end}")
        sys.stderr.flush()
    update.note = lambda text: None
    return update


def say(text: str) -> None:
    sys.stderr.write(f"neurolens: {text}\n")


class Handle:
    """One model, layer (and basis) and dataset in a cache (module docstring). Made by neurolens.open."""

    def __init__(self, clip, cache, layer: str, dataset=None, basis=None, settings: Optional[SweepSettings] = None,
                 render: Optional[RenderSettings] = None, examples: int = 8, blur: bool = True,
                 blur_all: bool = False, progress: bool = True):
        self.clip, self.cache = clip, as_cache(cache)
        self.spec = resolve_layer(clip, layer)
        self.basis = basis if basis is not None else load_basis(clip, self.spec.name, None, self.cache)
        self.settings = settings or SweepSettings()
        self.render, self.examples = render, int(examples)
        self.blur, self.blur_all, self.progress = blur, blur_all, progress
        self._dataset_spec = dataset
        self._memo: Dict[str, object] = {}

    def __repr__(self) -> str:
        return (f"<neurolens handle: {self.clip.name} ({self.clip.pretrained}) {self.spec.name}, "
                f"{self.basis.units} {self.basis.unit_word}s, cache {self.cache.root}, {self.clip!r}>")

    # ---------------------------------------------------------------------------------------- inputs

    def _progress(self, label: str) -> Progress:
        return stderr_progress(label) if self.progress else None

    @property
    def dataset(self) -> ImageDataset:
        """The dataset (opened on first use; None: neurolens's built-in sample images, as in the CLI)."""
        if "dataset" not in self._memo:
            spec = self._dataset_spec
            self._memo["dataset"] = spec if isinstance(spec, ImageDataset) else open_dataset(spec)
        return self._memo["dataset"]

    def scan(self):
        """The scan of the dataset through the layer (top_k of the settings): cached, else scanned now."""
        if "scan" not in self._memo:
            self._memo["scan"] = run_scan(self.clip, self.spec.name, self.dataset, top_k=self.settings.top_k,
                                          cache=self.cache, progress=self._progress(f"scan {self.spec.name}"),
                                          basis=self.basis)
        return self._memo["scan"]

    def cached_sweep(self):
        """The sweep of the dataset with the handle's settings when the cache holds it, else None (nothing run)."""
        if "sweep" not in self._memo:
            self._memo["sweep"] = find_sweep(self.clip, self.spec.name, self.dataset, self.settings, cache=self.cache,
                                             basis=self.basis)
        return self._memo["sweep"]

    def sweep(self):
        """The sweep (records.sweep.SweepResult): cached, else run now (every image labelled: can take minutes)."""
        if self.cached_sweep() is None:
            self._memo["sweep"] = run_sweep(self.clip, self.spec.name, self.dataset, self.settings, cache=self.cache,
                                            progress=self._progress(f"sweep {self.spec.name}"), write_csv=False,
                                            basis=self.basis)
            self._memo.pop("policy", None)
        return self._memo["sweep"]

    def policy(self) -> BlurPolicy:
        """The blur policy of what this handle shows (module docstring)."""
        if "policy" not in self._memo:
            sweep = self.cached_sweep()
            prompts = self.settings.labels.prompts()
            if sweep is not None:
                policy = blur_policy(self.clip, sweep, self.cache, self.blur, prompts, self.basis)
            else:
                policy = BlurPolicy.for_layer(self.clip, self.spec.name, self.cache, blur=self.blur, basis=self.basis,
                                              prompts=prompts)
            policy.blur_all = self.blur_all and policy.blur
            self._memo["policy"] = policy
        return self._memo["policy"]

    # ---------------------------------------------------------------------------------------- views

    def _label(self, unit: int) -> str:
        return self.basis.label(unit)

    def visualization(self, unit: int) -> Visualizations:
        """The unit's feature visualizations (module docstring: which ones)."""
        unit = self._check(unit)
        images, activations, seeds, how = self._visualization_arrays(unit)
        policy = self.policy()
        pictures = []
        for image, activation, seed in zip(images, activations, seeds):
            native = Image.fromarray(np.asarray(image, dtype=np.uint8))
            reason = policy.reason_fv(unit, native)   # judged as `visualize` judges it (scores kept per pixels)
            shown = native.resize((FV_PIXELS, FV_PIXELS), Image.BICUBIC) if native.width < FV_PIXELS else native
            pictures.append(Picture.of(shown, reason, f"seed {seed}: {float(activation):.3g}"))
        return Visualizations(f"Feature visualization · {self._label(unit)}", tuple(pictures), FV_PIXELS, how)

    def _visualization_arrays(self, unit: int):
        if self.render is None:
            found = []
            owner = NEURONS if self.basis.kind == NEURONS else self.basis.name
            for path in visualize_records.layer_records(self.cache, self.clip.fingerprint, self.spec.name, owner).get(
                    unit, []):
                record = visualize_records.read_visualization(self.cache, path, basis=self.basis.id)
                if record is not None:
                    found.append(record)
            if found:
                best = max(found, key=lambda r: (int(r.attrs.get("settings", {}).get("steps", 0)), str(r.path)))
                settings = best.attrs.get("settings", {})
                seeds = list(settings.get("seeds", range(len(best.arrays["activations"]))))
                return (best.arrays["images"], best.arrays["activations"], seeds,
                        f"cached: {settings.get('steps')} steps at {settings.get('size')} px")
        settings = self.render or RenderSettings()
        result = run_visualize(self.clip, self.spec.name, [unit], settings, cache=self.cache, basis=self.basis,
                               progress=self._progress(f"visualize {self._label(unit)}"))[0]
        how = (f"{'cached' if result.cached else 'rendered now'}: {result.settings.steps} steps at "
               f"{result.settings.size} px")
        return result.images, result.activations, list(result.seeds), how

    def samples(self, unit: int, count: Optional[int] = None) -> Samples:
        """The unit's top dataset images (`examples` of them unless count), cropped where it fired hardest."""
        unit = self._check(unit)
        scan = self.scan()
        rows = unit_rows(scan, unit, count or self.examples)
        sources, crops = unit_crops(self.clip, self.dataset, scan, rows, CROP_PIXELS)
        policy = self.policy()
        pictures = tuple(Picture.of(crop, policy.reason_image(unit, row["index"], source),
                                    f"#{row['rank']}  {row['score']:.3g}")
                         for row, source, crop in zip(rows, sources, crops))
        note = f"top {len(rows)} of {scan.count} images of {scan.description or self.dataset.description}"
        return Samples(f"Top dataset images · {self._label(unit)}", pictures, CROP_PIXELS, note)

    def histogram(self, unit: int) -> Histogram:
        """The unit's activation (spatial max per image) over the scanned images, as the web app draws it."""
        unit = self._check(unit)
        scan = self.scan()
        if not scan.chunks:
            return Histogram(None, note="this scan kept no per-image values")
        if "histograms" not in self._memo:
            self._memo["histograms"] = layer_histograms(self.cache, scan.chunks, scan.channels, HISTOGRAM_BINS)
        edges, counts, totals = self._memo["histograms"]
        top = np.asarray(scan.top_values[unit], dtype=np.float64)
        top = top[np.isfinite(top)]
        chart = histogram_chart(Counts(edges=edges[unit], counts=counts[unit], count=int(totals[unit])),
                                float(top[-1]) if len(top) else None, float(scan.mean[unit]))
        return Histogram(chart)

    def texts(self, unit: int, count: int = 10) -> Texts:
        """The unit's top texts (module docstring: which ranking), NSFW-marked when a sweep is cached."""
        unit = self._check(unit)
        sweep = self.cached_sweep()
        if sweep is not None:
            rows = tuple({"text": t, "score": s, "nsfw": f} for t, s, f in sweep.top_texts(unit, count))
            return Texts(rows, note=f"the sweep's ranking; {sweep.text.reference_description}")
        scan = self.scan()
        vocab, top_k = self.settings.vocab, self.settings.text_top_k
        ranking = find_text(self.clip, self.spec.name, vocab, top_k, scan, self.cache, basis=self.basis) or \
            find_text(self.clip, self.spec.name, vocab, top_k, None, self.cache, basis=self.basis) or \
            run_text(self.clip, self.spec.name, vocab, top_k, scan=scan, cache=self.cache, basis=self.basis,
                     progress=self._progress("encode texts"), direction_progress=self._progress("unit directions"))
        rows = tuple({"text": r["text"], "score": r["score"], "nsfw": None} for r in ranking.rows(unit, count))
        return Texts(rows, note=f"{'cached' if ranking.cached else 'ranked now'}; reference: "
                                f"{ranking.reference_description}")

    def evidence(self, unit: int) -> Evidence:
        """The sweep's checks for the unit (AUC, q, shares against the rule), when a sweep is cached."""
        unit = self._check(unit)
        sweep = self.cached_sweep()
        if sweep is None:
            return Evidence(None, note="no sweep of this dataset with these settings in the cache: handle.sweep() or "
                                       "handle.layer() runs it (neurolens sweep on the command line)")
        record = self.cache.read(sweep.path)
        return Evidence(unit_evidence(record, unit), note=f"{sweep.scores.n_pos} positive and {sweep.scores.n_neg} "
                                                          f"negative images; labels: {' + '.join(sweep.labels.used)}")

    def unit(self, unit: int) -> UnitDashboard:
        """The unit's dashboard (display.dashboard): cached parts read, missing ones computed (module docstring)."""
        unit = self._check(unit)
        was_loaded = getattr(self.clip, "loaded", True)
        sweep = self.cached_sweep()
        parts = dict(visualizations=self.visualization(unit), samples=self.samples(unit),
                     histogram=self.histogram(unit), texts=self.texts(unit), evidence=self.evidence(unit))
        flagged = None if sweep is None else bool(sweep.scores.flagged[unit])
        notes = [f"blur: {'every image (blur_all)' if self.blur_all else 'the blur policy of figures'}"
                 f"{'' if self.blur else ' OFF (blur=False)'}; .reveal() returns a new dashboard with raw pixels"]
        if hasattr(self.clip, "loaded"):
            notes.append("model: " + ("not loaded (answered from the cache)" if not self.clip.loaded else
                                      "loaded for what the cache did not hold" if not was_loaded else "loaded"))
        title = f"{self.clip.name} ({self.clip.pretrained}) · {self.spec.name} · {self._label(unit)}"
        return UnitDashboard(title, unit, self.spec.name, flagged, notes=tuple(notes), **parts)

    def layer(self, top: int = 30) -> LayerFlags:
        """The layer's flags: units ranked by AUC, flagged first (the sweep, run now if it is not cached)."""
        sweep = self.sweep()
        flagged = len(sweep.flagged_units)
        units = len(sweep.scores.flagged)
        title = f"{self.clip.name} · {self.spec.name}: {flagged} of {units} {sweep.unit_word}s flagged"
        return LayerFlags(title, tuple(sweep.ranking(limit=top, texts=3)), tuple(sweep.lines()),
                          note=f"rule: {sweep.scores.rule.describe()}; top {top} by AUC")

    def sae_quality(self) -> SaeQuality:
        """The SAE's quality report and what it is (with sae=...); for the neurons, says there is none."""
        info = self.basis.describe()
        if self.basis.kind == NEURONS:
            return SaeQuality(f"{self.spec.name}: the layer's neurons (no SAE given)", None,
                              (("units", str(info["units"])),))
        about = tuple((k, str(info[k])) for k in ("name", "path", "architecture", "k", "d_in", "units", "basis")
                      if info.get(k) is not None)
        return SaeQuality(f"SAE {info['name']} on {self.spec.name}", info.get("quality"), about)

    def _check(self, unit: int) -> int:
        self.basis.check_unit(int(unit))
        return int(unit)


def open_handle(cache=None, *, checkpoint: Optional[str] = None, model: str = DEFAULT_MODEL,
                pretrained: str = DEFAULT_PRETRAINED, layer: str = "image_block_4_5", dataset=None,
                sae=None, vocab="builtin", top_k: int = 32, text_top_k: int = 30,
                sweep: Optional[SweepSettings] = None, render: Optional[RenderSettings] = None, device: str = "auto",
                examples: int = 8, blur: bool = True, blur_all: bool = False, progress: bool = True) -> Handle:
    """`neurolens.open`: a Handle on one model (a checkpoint, or model + pretrained tag / 'none'), layer and
    dataset (None: the built-in sample images) in `cache` (a folder or Cache; None: the default cache).

    sae: a name from `neurolens sae train` or an SAE folder: its features are the units. vocab, top_k,
    text_top_k: the texts' vocabulary and the scan's and ranking's sizes, unless `sweep` (a SweepSettings)
    gives all of the sweep's settings. render: the feature visualizations' settings (None: any cached one).
    blur=False shows raw pixels everywhere (never by default); blur_all=True blurs every image."""
    clip = load_model(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device, cache=cache,
                      announce=say if progress else None)
    settings = sweep or SweepSettings(vocab=vocab, top_k=top_k, text_top_k=text_top_k)
    spec = resolve_layer(clip, layer)
    basis = load_basis(clip, spec.name, sae, cache)
    return Handle(clip, cache, spec.name, dataset, basis, settings, render, examples, blur, blur_all, progress)
