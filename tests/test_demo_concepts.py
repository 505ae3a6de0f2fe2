"""`neurolens demo --concepts multi` (pipelines.demo_concepts): the multi-concept toy audited, described and
searched on its probe set, the figures of OUT/concepts/index.md checked against a computation made here: the
planted AUC of every unit with scipy's ranks from the scan's per-image maxima and the probe's truth columns,
the flags read from the cached audit, and `find` asked again through the command.

The toy is the recipe's (MultiConceptRecipe: 3000 images, 6 epochs), trained once in this module's cache (the
session fixture of tests/test_concepts_toy.py trains another toy, 2000 images x 5 epochs, outside the store,
so its cache cannot be reused here)."""
import json

import numpy as np
import pytest
from scipy.stats import rankdata
from typer.testing import CliRunner

from neurolens.cli import app

LAYER = "image_block_4_0"


def planted_auc(maxima, shown):
    keep = np.isfinite(maxima).all(axis=1)
    maxima, shown = maxima[keep], shown[keep]
    ranks = rankdata(maxima, axis=0)
    n1, n0 = shown.sum(), (~shown).sum()
    return (ranks[shown].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def table_rows(markdown: str, header: str):
    """The rows of the markdown table that follows `## header`, as lists of cells."""
    section = markdown.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-concepts")
    out = CliRunner().invoke(app, ["demo", "--concepts", "multi", "--out", str(root / "demo"), "--cache",
                                   str(root / "cache"), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout), root


@pytest.mark.integration   # trains the multi-concept toy (minutes on 2 cores)
def test_index_figures_match_an_independent_computation(demo):
    import pyarrow.parquet as pq
    from neurolens.models.build import load_clip
    from neurolens.pipelines.concepts import run_concepts
    from neurolens.pipelines.settings import ConceptSettings
    from neurolens.labels.concepts import concept_set_of
    from neurolens.records.descriptions import newest_descriptions
    from neurolens.storage.cache import Cache
    from neurolens.toy.concepts import concept_set
    report, root = demo
    index = (root / "demo" / "concepts" / "index.md").read_text()
    assert json.loads((root / "demo" / "concepts" / "concepts.json").read_text()) == report
    clip = load_clip(checkpoint=report["checkpoint"], device="cpu")
    settings = ConceptSettings(concepts=concept_set_of(concept_set(), name="toy"), detector=False)
    audit = run_concepts(clip, LAYER, report["probe"], settings, cache=Cache(root / "cache"))
    assert audit.cached          # the demo's audit, read back
    table = pq.read_table(report["probe"])
    maxima = audit.scan.per_image_max().astype(np.float64)
    assert maxima.shape == (1000, 512)
    truth = {e["name"]: planted_auc(maxima, np.asarray(table.column(f"planted_{e['name']}").to_pylist(), bool))
             for e in concept_set()}
    descriptions = newest_descriptions(Cache(root / "cache"), clip.fingerprint, LAYER)
    rows = {row[0]: row for row in table_rows(index, "Planted concepts against the ground truth")}
    assert sorted(rows) == ["drugs", "nsfw", "violence"]
    for name, auc in truth.items():
        flagged = np.asarray(audit.concept(name).flagged, bool)
        must = auc >= 0.95
        row = rows[name]
        assert int(row[1]) == int(must.sum()) and int(row[2]) == int(flagged.sum()), (name, row)
        precision, recall = (auc[flagged] >= 0.8).mean(), flagged[must].mean()
        assert float(row[3]) == pytest.approx(precision, abs=5e-4) and float(row[4]) == pytest.approx(recall, abs=5e-4)
        # the bars of issue 21 R8 on the probe set the toy never saw
        assert must.sum() >= 5 and precision >= 0.9 and recall >= 0.9, (name, row)
        units = np.flatnonzero(must)
        right = np.mean([truth[descriptions.row(int(u))["concepts"][0]["concept"]][u] >= 0.95 for u in units])
        assert float(row[5]) == pytest.approx(right, abs=5e-4) and right >= 0.9, (name, row)
        for cell, name_query in ((row[6], True), (row[7], False)):
            word, rest = cell.split("`: ")
            word, unit = word.strip("`"), int(rest.split(" ")[0])
            assert float(rest.split("(")[1].split(")")[0]) == pytest.approx(auc[unit], abs=5e-4)
            assert ("not truly planted" in cell) == (auc[unit] < 0.95), (name, cell)
            again = CliRunner().invoke(app, ["find", word, "--checkpoint", report["checkpoint"], "--layer", LAYER,
                                             "--cache", str(root / "cache"), "--dataset", report["probe"], "--json",
                                             "--top", "1"])
            assert again.exit_code == 0, again.output
            assert json.loads(again.stdout)[0]["unit"] == unit
            if name_query:      # the concept's name: a truly planted unit first (issue 21 R8)
                assert word == name and auc[unit] >= 0.95, (name, cell)
            else:               # its most used lexicon word: measured on this probe set, a truly planted unit first
                # for nsfw ('nude') and violence ('blood'), but for drugs ('opioid') unit 175, planted AUC 0.895: a
                # word in a fifth of the concept's captions leaves few matches among a unit's top 32 of 1000 images
                assert word in dict((e["name"], e["terms"]) for e in concept_set())[name] and auc[unit] >= 0.8, cell
    both = audit.intersections()
    listed = table_rows(index, "Intersections")
    assert [int(r[0]) for r in listed] == both and len(both) == len(report["intersections"])
    assert "lists exactly them first" in index and report["intersections_first"]
    for row, unit in zip(listed, both):
        named = [s.name for s in audit.scores if s.flagged[unit]]
        assert len(named) >= 2 and all(f"{n} " in row[1] for n in named)
        assert all(truth[n][unit] >= 0.8 for n in named), (unit, row)


@pytest.mark.integration   # reuses the trained toy
def test_a_second_run_reads_the_cache(demo):
    report, root = demo
    again = CliRunner().invoke(app, ["demo", "--concepts", "multi", "--out", str(root / "demo"), "--cache",
                                     str(root / "cache"), "--json"])
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert not second["trained"] and second["concepts"] == report["concepts"]
    assert second["stages"]["train"] < 5 and second["stages"]["concepts"] < 10


def test_an_unknown_concept_mode_is_one_line_and_exit_2(tmp_path):
    out = CliRunner().invoke(app, ["demo", "--concepts", "many", "--out", str(tmp_path)])
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "many" in lines[0] and "single, multi" in lines[0], out.output
    assert not list(tmp_path.iterdir())
