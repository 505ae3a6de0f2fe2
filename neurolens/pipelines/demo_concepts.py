"""`neurolens demo --concepts multi`: the concept audit, the descriptions and `find` proven on planted data.

The multi-concept toy of neurolens.toy.recipes.MultiConceptRecipe (three abstract patterns, nsfw, violence and
drugs, each with its own caption lexicon, nsfw and violence together in a share of the images) is trained once
and read from the cache afterwards (neurolens.toy.store); it is audited on the recipe's probe set (generated the
same way with another seed: images it never saw), with the generator's own concept set
(neurolens.toy.concepts.concept_set(), captions only: no model-based label), then every unit is described and
`find` is asked each concept's name and its most used lexicon word, from the cache as the command does.

Ground truth, computed here with numpy and scipy and not with neurolens' statistics: a unit's planted AUC for
a concept is the ROC AUC of its per-image activation (the scan's per-image maxima), images showing the concept
(the probe's `planted_<concept>` column) against the others. Per concept:

    truth_units        units with planted AUC >= 0.95 (truly planted)
    precision          the share of flagged units with planted AUC >= 0.8 (the flag's own bar)
    recall             the share of truly planted units that are flagged
    described_right    the share of truly planted units whose description's first concept is one they are
                       truly planted for (an intersection unit may be truly planted for both)
    find_concept/word  the first unit `find` ranks for the concept's name / its most used lexicon word, its
                       planted AUC, and whether it is truly planted

and the units flagged for two or more concepts, with each concept's AUC and planted AUC, and whether
`describe` lists them first. Writes OUT/index.md and OUT/concepts.json (no images: nothing to blur; the web app
over the same cache blurs by the one policy).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import rankdata

from ..datasets.open import open_dataset
from ..labels.concepts import concept_set_of
from ..models.build import load_clip
from ..records.keys import as_cache
from ..storage.files import ensure_folder, write_text
from ..toy.concepts import concept_set, truth_column
from ..toy.recipes import MultiConceptRecipe
from ..toy.store import toy_dataset, toy_model
from .concepts import run_concepts
from .describe import describe_units
from .find import find, locate
from .settings import ConceptSettings, DescribeSettings

StageProgress = Optional[Callable[[str, int, int], None]]
PLANTED_AUC, RELATED_AUC = 0.95, 0.8


@dataclass
class ConceptsDemoReport:
    out: Path
    index: Optional[Path] = None
    layer: str = ""
    dataset: str = ""                         # the training data
    probe: str = ""                           # the images audited (another seed)
    checkpoint: str = ""
    trained: bool = False                     # False: reused from the cache
    zero_shot: Optional[dict] = None
    images: int = 0                           # probe images audited
    units: int = 0
    concepts: List[dict] = field(default_factory=list)        # per planted concept (module docstring)
    intersections: List[dict] = field(default_factory=list)   # unit, concepts [{concept, auc, planted_auc}], summary
    intersections_first: bool = False         # describe lists exactly them first
    stages: Dict[str, float] = field(default_factory=dict)    # seconds per stage
    seconds: float = 0.0
    find_command: str = ""
    serve_command: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["out"], data["index"] = str(self.out), str(self.index) if self.index else None
        return data

    def lines(self) -> List[str]:
        lines = [f"concept demo written to {self.out} in {self.seconds:.0f} s; index: {self.index}",
                 f"{self.units} units of {self.layer} audited on {self.images} probe images"]
        for c in self.concepts:
            lines.append(f"  {c['concept']:<9} truly planted {c['truth_units']:>3}, flagged {c['flagged']:>3}, "
                         f"precision {_f(c['precision'])}, recall {_f(c['recall'])}, described right "
                         f"{_f(c['described_right'])}, find first truly planted: name {_yes(c['find_concept'])}, "
                         f"word '{c['find_word']['query']}' {_yes(c['find_word'])}")
        lines.append(f"  {len(self.intersections)} units flagged for two or more concepts, listed first by describe: "
                     f"{'yes' if self.intersections_first else 'NO'}")
        lines.append(f"search them: {self.find_command}")
        return lines


def truth_auc(maxima: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """(U,) per column of maxima (images x units): (rank sum of the images showing the concept - n1 (n1 + 1) / 2)
    / (n1 n0), midranks for ties; images with a non-finite value anywhere are left out."""
    maxima, shown = np.asarray(maxima, np.float64), np.asarray(shown, bool)
    keep = np.isfinite(maxima).all(axis=1)
    maxima, shown = maxima[keep], shown[keep]
    n1, n0 = int(shown.sum()), int((~shown).sum())
    if n1 == 0 or n0 == 0:
        return np.full(maxima.shape[1], np.nan)
    ranks = rankdata(maxima, axis=0)
    return (ranks[shown].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def most_used_term(terms: List[str], captions: List[str]) -> str:
    """The lexicon term found as a whole word in the most captions (the first such term on ties)."""
    padded = [f" {' '.join(str(c).lower().split())} " for c in captions]
    return max(terms, key=lambda t: sum(f" {t.lower()} " in c for c in padded))


def run_concepts_demo(out, seed: int = 0, *, cache=None, recipe: MultiConceptRecipe = MultiConceptRecipe(),
                      retrain: bool = False, device: str = "cpu", progress: StageProgress = None
                      ) -> ConceptsDemoReport:
    """Train (or reuse) the recipe's toy, audit, describe and search it on the probe set, write OUT/index.md and
    OUT/concepts.json (module docstring); returns the report."""
    started = time.perf_counter()
    out, cache = Path(out), as_cache(cache)
    ensure_folder(out)
    report = ConceptsDemoReport(out=out, layer=recipe.layer)

    def step(name):
        return (lambda done, total: progress(name, done, total)) if progress else None

    def timed(name, job):
        begun = time.perf_counter()
        value = job()
        report.stages[name] = round(time.perf_counter() - begun, 1)
        return value

    data = recipe.data_settings(seed)
    dataset = timed("data", lambda: toy_dataset(cache.root, settings=data, progress=step("data")))
    checkpoint, summary, trained = timed("train", lambda: toy_model(
        cache.root, dataset, data, recipe.train_settings(seed), retrain, step("train"), step("load images")))
    probe = timed("probe", lambda: toy_dataset(cache.root, settings=recipe.probe_settings(seed),
                                               progress=step("probe")))
    report.dataset, report.probe, report.checkpoint = str(dataset), str(probe), str(checkpoint)
    report.trained, report.zero_shot = trained, summary.get("zero_shot")
    clip = load_clip(checkpoint=str(checkpoint), device=device)
    images = open_dataset(str(probe))
    entries = concept_set()
    settings = ConceptSettings(concepts=concept_set_of(entries, name="toy"), detector=False)
    audit = timed("concepts", lambda: run_concepts(clip, recipe.layer, images, settings, cache=cache,
                                                   progress=step("concepts")))
    descriptions = timed("describe", lambda: describe_units(clip, audit, DescribeSettings(), cache=cache,
                                                            progress=step("describe")))
    located = locate(cache, recipe.layer, fingerprint=clip.fingerprint, dataset_identity=images.identity)
    table = pq.read_table(probe)
    maxima = audit.scan.per_image_max()
    truth = {e["name"]: truth_auc(maxima, np.asarray(table.column(truth_column(e["name"])).to_pylist(), bool))
             for e in entries}
    captions = [str(c) for c in table.column("caption").to_pylist()]
    begun = time.perf_counter()
    report.concepts = [_concept_row(e, audit, descriptions, located, truth, captions) for e in entries]
    report.stages["find"] = round(time.perf_counter() - begun, 1)
    both = audit.intersections()
    report.intersections = [_intersection_row(u, audit, descriptions, truth) for u in both]
    report.intersections_first = set(descriptions.order()[:len(both)]) == set(both)
    report.images, report.units = len(images), int(audit.scan.channels)
    report.find_command = (f"neurolens find violence --checkpoint {checkpoint} --layer {recipe.layer} "
                           f"--cache {cache.root}")
    report.serve_command = f"neurolens serve --cache {cache.root}"
    report.seconds = time.perf_counter() - started
    _write_index(report, recipe)
    return report


def _concept_row(entry: dict, audit, descriptions, located, truth: Dict[str, np.ndarray], captions: List[str]) -> dict:
    name = entry["name"]
    planted_auc, flagged = truth[name], np.asarray(audit.concept(name).flagged, bool)
    must = planted_auc >= PLANTED_AUC
    units = np.flatnonzero(must)
    right = [truth[descriptions.row(int(u))["concepts"][0]["concept"]][u] >= PLANTED_AUC for u in units]

    def first(query: str) -> dict:
        result = find(located, query, limit=1)
        unit = result.rows[0]["unit"]
        return {"query": query, "kind": result.query.kind, "unit": unit, "planted_auc": float(planted_auc[unit]),
                "truly_planted": bool(planted_auc[unit] >= PLANTED_AUC),
                "caption_share": result.rows[0]["caption_share"]}
    return {"concept": name, "truth_units": int(must.sum()), "flagged": int(flagged.sum()),
            "precision": float((planted_auc[flagged] >= RELATED_AUC).mean()) if flagged.any() else None,
            "recall": float(flagged[must].mean()) if must.any() else None,
            "described_right": float(np.mean(right)) if right else None,
            "find_concept": first(name), "find_word": first(most_used_term(list(entry["terms"]), captions))}


def _intersection_row(unit: int, audit, descriptions, truth: Dict[str, np.ndarray]) -> dict:
    named = [s for s in audit.scores if bool(s.flagged[unit])]
    return {"unit": int(unit), "summary": descriptions.row(unit)["summary"],
            "concepts": [{"concept": s.name, "auc": float(s.auc[unit]), "planted_auc": float(truth[s.name][unit])}
                         for s in named]}


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _yes(found: dict) -> str:
    return f"yes (unit {found['unit']})" if found["truly_planted"] else f"NO (unit {found['unit']})"


def _write_index(report: ConceptsDemoReport, recipe: MultiConceptRecipe) -> None:
    z = report.zero_shot or {}
    lines = ["# neurolens demo: concepts", "",
             f"A toy CLIP (`{recipe.train.model}`, {recipe.train.epochs} epochs) trained on {recipe.images} generated "
             f"image-caption pairs in multi-concept mode: three abstract patterns, **nsfw**, **violence** and "
             f"**drugs**, each shown alone in {recipe.planted_share:.0%} of the images with words of its own caption "
             f"lexicon, nsfw and violence together in {recipe.intersection_share:.0%}. Audited on {report.images} "
             f"probe images it never saw (another seed), layer `{report.layer}` ({report.units} units), with the "
             f"generator's concept set (caption lexicons only; nothing model-based in the labels). Total time "
             f"{report.seconds:.0f} s.", "",
             f"- checkpoint: `{report.checkpoint}` "
             f"({'trained in this run' if report.trained else 'reused from the cache'})",
             f"- probe set: `{report.probe}`"]
    if z:
        lines.append(f"- zero-shot accuracy on {z['images']} held-out generated pairs: {z['accuracy']:.3f} "
                     f"(chance {z['chance']:.3f}); planted vs ordinary caption {z['planted_accuracy']:.3f} "
                     f"(chance 0.5)")
    lines += ["", "## Planted concepts against the ground truth", "",
              "A unit's *planted AUC* for a concept is the ROC AUC of its activation (its maximum over the image), "
              "probe images showing the concept against the others, from the generator's truth column and computed "
              "with scipy, not with neurolens' scorer. *Truly planted*: planted AUC >= 0.95. *Precision*: the share "
              "of flagged units with planted AUC >= 0.8; *recall*: the share of truly planted units that are flagged; "
              "*described right*: the share of truly planted units whose description's first concept is one they "
              "are truly planted for; *find*: the first unit `neurolens find` ranks for the concept's name and for "
              "its most used lexicon word (from the cache, no model), and its planted AUC.", "",
              "| concept | truly planted | flagged | precision | recall | described right | find name: first unit "
              "(planted AUC) | find word: first unit (planted AUC) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in report.concepts:
        n, w = c["find_concept"], c["find_word"]
        lines.append(f"| {c['concept']} | {c['truth_units']} | {c['flagged']} | {_f(c['precision'])} | "
                     f"{_f(c['recall'])} | {_f(c['described_right'])} | `{n['query']}`: {n['unit']} "
                     f"({n['planted_auc']:.3f}){'' if n['truly_planted'] else ' **not truly planted**'} | "
                     f"`{w['query']}`: {w['unit']} ({w['planted_auc']:.3f})"
                     f"{'' if w['truly_planted'] else ' **not truly planted**'} |")
    lines += ["", "## Intersections", "",
              f"{len(report.intersections)} units are flagged for two or more concepts; `neurolens describe` "
              f"{'lists exactly them first' if report.intersections_first else '**does not** list them first'}. "
              "Each with its concepts' AUC (captions) and planted AUC (truth):", ""]
    if report.intersections:
        lines += ["| unit | concepts: AUC / planted AUC | description |", "| --- | --- | --- |"]
        for row in report.intersections:
            named = " + ".join(f"{c['concept']} {c['auc']:.3f} / {c['planted_auc']:.3f}" for c in row["concepts"])
            lines.append(f"| {row['unit']} | {named} | {row['summary'].replace('|', '/')} |")
    lines += ["", "## Stages", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in report.stages.items()]
    lines += ["", "## Next", "",
              f"- search the units: `{report.find_command}`",
              f"- browse them (every image blurred by default): `{report.serve_command}`",
              "- the same as JSON: [concepts.json](concepts.json)"]
    path = report.out / "index.md"
    report.index = path
    write_text(path, "\n".join(lines) + "\n")
    write_text(report.out / "concepts.json", json.dumps(report.to_dict(), indent=2, default=str))
