"""The toy generator's multi-concept mode (planted ground truth for the concept audit), and the single-concept
mode unchanged by it."""
import hashlib
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from neurolens.errors import NeurolensError
from neurolens.toy.concepts import INTERSECTION, concept_set, multi_concepts, planted_words, truth_column
from neurolens.toy.generate import ToySettings, generate_pairs, write_dataset

N, SHARE, TOGETHER = 200, 0.1, 0.06


@pytest.fixture(scope="module")
def multi():
    return generate_pairs(N, planted_share=SHARE, seed=2, concepts="multi", intersection_share=TOGETHER)


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def _lexicon(name):
    return {row["name"]: set(row["terms"]) for row in concept_set()}[name]


def _shown(data, name):
    return np.array([name in p.concepts for p in data.pairs])


def test_multi_is_deterministic_by_seed(multi):
    again = generate_pairs(N, planted_share=SHARE, seed=2, concepts="multi", intersection_share=TOGETHER)
    other = generate_pairs(N, planted_share=SHARE, seed=3, concepts="multi", intersection_share=TOGETHER)
    assert np.array_equal(multi.images, again.images) and multi.captions == again.captions
    assert [p.concepts for p in multi.pairs] == [p.concepts for p in again.pairs]
    assert not np.array_equal(multi.images, other.images)


def test_multi_plants_exact_shares_and_the_intersection(multi):
    shown = [p.concepts for p in multi.pairs]
    assert sum(s == ("nsfw",) for s in shown) == 20
    assert sum(s == ("violence",) for s in shown) == 20
    assert sum(s == ("drugs",) for s in shown) == 20
    assert sum(s == ("nsfw", "violence") for s in shown) == 12 and INTERSECTION == ("nsfw", "violence")
    assert sum(s == () for s in shown) == 128                                 # neutral images
    assert multi.planted.sum() == 72                                          # `planted`: any concept shown
    assert _shown(multi, "nsfw").sum() == 32 and _shown(multi, "drugs").sum() == 20


def test_captions_carry_the_lexicon_of_exactly_the_concepts_shown(multi):
    for name in ("nsfw", "violence", "drugs"):
        lexicon = _lexicon(name)
        said = np.array([bool(lexicon & _words(c)) for c in multi.captions])
        assert np.array_equal(said, _shown(multi, name)), name            # short captions included
        full = np.array([len(lexicon & _words(p.full)) for p in multi.pairs])
        assert set(full[_shown(multi, name)]) == {2}                        # two words per concept shown


def test_each_pattern_appears_in_its_concepts_images_only(multi):
    for concept in multi_concepts():
        first = np.asarray(concept.colours[0])
        hits = (np.abs(multi.images.astype(int) - first).max(axis=-1) <= 2).sum(axis=(1, 2))
        shown = _shown(multi, concept.name)
        assert hits[shown].min() >= 40, concept.name                        # a disc's worth of pixels
        assert hits[~shown].max() == 0, concept.name


def test_lexicons_are_disjoint_from_each_other_and_from_ordinary_captions():
    sets = [set(row["terms"]) for row in concept_set()]
    assert [row["name"] for row in concept_set()] == ["nsfw", "violence", "drugs"]
    assert all(row["match"] == "word" for row in concept_set())
    assert set(concept_set()[0]["terms"]) == set(planted_words())
    assert all(len(s) >= 8 for s in sets)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not sets[i] & sets[j]
    ordinary = set()
    for style in ("shapes", "targets"):
        for pair in generate_pairs(300, planted_share=0.0, seed=1, style=style).pairs:
            ordinary |= _words(pair.full) | _words(pair.caption)
    assert len(ordinary) >= 30 and not ordinary & set().union(*sets)
    assert concept_set("single") == concept_set()[:1]


def test_written_multi_dataset_has_one_truth_column_per_concept(tmp_path):
    settings = ToySettings(n=60, seed=1, concepts="multi", planted_share=0.1, intersection_share=0.05)
    parquet = write_dataset(tmp_path / "multi", settings)
    table = pq.read_table(parquet)
    data = generate_pairs(60, planted_share=0.1, seed=1, concepts="multi", intersection_share=0.05)
    assert [truth_column(c.name) for c in multi_concepts()] == ["planted_nsfw", "planted_violence", "planted_drugs"]
    for name in ("nsfw", "violence", "drugs"):
        assert table.column(f"planted_{name}").to_pylist() == [name in p.concepts for p in data.pairs]
    both = np.array(table.column("planted_nsfw").to_pylist()) & np.array(table.column("planted_violence").to_pylist())
    assert both.sum() == 3
    assert table.column("caption").to_pylist() == data.captions
    assert json.loads((tmp_path / "multi" / "dataset.json").read_text())["concepts"] == "multi"


def test_single_concept_output_and_keys_are_unchanged(tmp_path):
    """Digests of the single-concept output taken before multi-concept mode was added (same code path)."""
    def digest(data):
        h = hashlib.sha256(data.images.tobytes())
        for p in data.pairs:
            h.update(json.dumps([p.caption, p.planted, p.position, p.background, p.count, p.colour, p.shape,
                                 list(p.words), p.full]).encode())
        return h.hexdigest()[:16]
    assert digest(generate_pairs(120, planted_share=0.15, seed=3)) == "e0a0ae7b03d4ce66"
    assert digest(generate_pairs(120, planted_share=0.12, seed=5, style="targets", caption_noise=0.3)) == \
        "42d5d43b7a8858c9"
    assert digest(generate_pairs(60, size=48, planted_share=0.5, seed=0)) == "913c08b85a280cf4"
    table = pq.read_table(write_dataset(tmp_path / "single", ToySettings(n=30, seed=4)))
    assert table.column_names == ["image", "caption", "planted", "count", "colour", "shape", "position",
                                  "background", "full"]
    assert hashlib.sha256(json.dumps(table.to_pydict(), sort_keys=True).encode()).hexdigest()[:16] == \
        "ad866d97b04e8a10"
    from neurolens.storage.cache import settings_key
    assert settings_key("toy-data", ToySettings().identity()) == "d59806468ee07422d779"   # the demo's data folder
    assert "concepts" not in ToySettings().identity()
    assert ToySettings(concepts="multi").identity()["concepts"] == "multi"


def test_bad_multi_settings_are_one_clear_error():
    with pytest.raises(NeurolensError, match="exceed"):
        generate_pairs(20, planted_share=0.3, concepts="multi", intersection_share=0.2)
    with pytest.raises(NeurolensError, match="shapes style"):
        generate_pairs(20, concepts="multi", style="targets")
    with pytest.raises(NeurolensError, match="concept mode"):
        generate_pairs(20, concepts="several")
    with pytest.raises(NeurolensError, match="caption words"):
        generate_pairs(20, concepts="multi", caption_words=0)


def test_train_toy_rejects_an_unknown_concept_mode_in_one_line(tmp_path):
    from typer.testing import CliRunner
    from neurolens.cli import app
    result = CliRunner().invoke(app, ["train-toy", "--concepts", "several", "--out", str(tmp_path / "m.pt"),
                                      "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "single, multi" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache").exists()
