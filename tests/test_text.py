"""Text feature visualization: vocabularies, truncated text encoding, unit directions, ranking, cache, CLI."""
import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from neurolens.text import directions as directionlib, encode as textlib
from neurolens.cli import app
from neurolens.errors import NeurolensError
from neurolens.activations.hooks import forward_to, hook_count, inject
from neurolens.models.layers import registry_for
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.text import find_text, run_text
from neurolens.text.vocab import builtin_vocab, load_vocab
from neurolens.labels.prompts import Prompts

TEXTS = ["a dog", "", "x", "a photo of a cat sitting on a red sofa next to the window",
         "Golden Retriever!!", "the quick brown fox jumps over the lazy dog " * 12,  # longer than 77 tokens
         "naïve café", "3 apples", "sunset over the sea"]
WORDS = ["dog", "cat", "red car", "blue sky", "tree", "beach", "snow", "city street", "portrait", "flower",
         "mountain lake", "bird", "fish", "night", "text", "face", "hand", "building", "food", "grass",
         "a photo of a dog", "a painting", "water", "fire", "sand", "road", "house", "boat", "horse", "cloud"]


def _reference_encode(clip, texts):
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1).numpy()


# ------------------------------------------------------------------------------------------- vocabularies

def test_builtin_vocabulary_is_large_clean_and_deterministic():
    vocab = builtin_vocab()
    assert len(vocab) >= 20000
    assert len(set(vocab.entries)) == len(vocab)
    assert all(re.fullmatch(r"[a-z][a-z' .\-]*", e) and len(e.split()) <= 4 for e in vocab.entries)
    words = set(vocab.entries)
    assert {"dog", "golden retriever", "beach", "smiling"} <= words       # class lemmas and BPE words
    assert not {"ation", "cence", "ing"} & words                          # word-final BPE fragments are dropped
    assert vocab.identity.startswith("builtin-v") and "MIT" in vocab.source and "Apache-2.0" in vocab.source
    assert load_vocab("builtin").identity == vocab.identity


def test_file_and_table_vocabularies(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    lines = tmp_path / "words.txt"
    lines.write_text("dog\n\n  cat  \ndog\nred   car\n")
    vocab = load_vocab(str(lines))
    assert vocab.entries == ["dog", "cat", "red car"]                     # blanks dropped, duplicates once
    same = tmp_path / "other_name.txt"
    same.write_text("dog\ncat\nred car\n")
    assert load_vocab(str(same)).identity == vocab.identity               # identity is the content
    pq.write_table(pa.table({"caption": ["a dog", None, "a cat"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    assert load_vocab(f"{tmp_path}/t.parquet:caption").entries == ["a dog", "a cat"]
    assert load_vocab(f"{tmp_path}/t.parquet").entries == ["a dog", "a cat"]  # default caption column
    (tmp_path / "t.csv").write_text('id,words\n1,"a bird, flying"\n2,snow\n')
    assert load_vocab(f"{tmp_path}/t.csv:words").entries == ["a bird, flying", "snow"]


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/missing.txt", "not found"),
    ("{tmp}/empty.txt", "no non-blank entries"),
    ("{tmp}/t.parquet:nope", "has no column 'nope'"),
    ("{tmp}/t.csv", "no caption or text column"),
    ("{tmp}/broken.parquet:caption", "cannot read table"),
])
def test_bad_vocabularies_say_what_is_wrong(tmp_path, spec, message):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "empty.txt").write_text("\n  \n")
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("id,words\n1,a\n")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(NeurolensError, match=message):
        load_vocab(spec.format(tmp=tmp_path))


# ------------------------------------------------------------------------------------ truncated encoding

def test_truncated_encoding_equals_open_clip_tiny(tiny_clip):
    lengths = []
    transformer = tiny_clip.model.transformer
    length_dim = 1 if hasattr(transformer, "batch_first") else 0   # open_clip < 2.26 takes (L, N, D)
    handle = transformer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[length_dim]))
    try:
        ours = textlib.encode_texts(tiny_clip, TEXTS, batch_size=2)   # a budget of 16 token positions
    finally:
        handle.remove()
    np.testing.assert_allclose(ours, _reference_encode(tiny_clip, TEXTS), atol=1e-4)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # sorted by length: the short batches run on a few positions, only the long text's batch on all 77
    assert lengths.count(77) == 1 and min(lengths) <= 4 and sorted(lengths)[-2] < 20 and len(lengths) >= 3


def test_length_batches_cover_every_text_once_within_the_token_budget():
    positions = torch.tensor([3, 76, 1, 5, 5, 2, 9, 0, 4, 30])
    batches = textlib._batches(positions, len(positions), batch_size=4)      # budget: 32 positions
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(len(positions)))
    for batch in batches:
        longest = int(positions[batch].max()) + 1
        assert len(batch) == 1 or len(batch) * longest <= 32
    assert [len(b) for b in textlib._batches(None, 5, batch_size=2)] == [2, 2, 1]


def test_truncated_encoding_equals_open_clip_rn50x4_text_tower(rn50x4):
    clip = rn50x4   # the real 12-layer, 640-wide text tower, random weights
    assert textlib.can_truncate(clip.model) and clip.model.text_pool_type == "argmax"
    texts = TEXTS[:5]
    np.testing.assert_allclose(textlib.encode_texts(clip, texts, batch_size=2), _reference_encode(clip, texts),
                               atol=1e-4)


def test_untruncatable_towers_fall_back_to_encode_text(tiny_clip):
    model = copy.copy(tiny_clip.model)
    model.text_pool_type = "last"        # the pooled position is not the end-of-text token: no truncation
    clip = copy.copy(tiny_clip)
    clip.model = model
    assert not textlib.can_truncate(model)
    np.testing.assert_allclose(textlib.encode_texts(clip, TEXTS[:4]), _reference_encode(clip, TEXTS[:4]), atol=1e-5)



def test_every_job_that_embeds_texts_uses_the_one_encoder(tiny_clip):
    """The zero-shot prompts, the similarity probe and the toy's zero-shot check get encode_texts' embeddings,
    which match open_clip's own encode_text."""
    from neurolens.audit.similarity import cosine_matrix
    from neurolens.datasets.builtin import builtin_image
    from neurolens.labels import zero_shot
    from neurolens.models.embed import image_embeddings
    from neurolens.toy import evaluate
    texts = ["a photo of a cat", "an astronaut", "a cup of coffee on a saucer", "x"]
    expected = textlib.encode_texts(tiny_clip, texts)
    np.testing.assert_allclose(expected, _reference_encode(tiny_clip, texts), atol=1e-5)
    prompts = Prompts(texts[:1], texts[1:])
    np.testing.assert_allclose(zero_shot.prompt_embeddings(tiny_clip, prompts), expected, atol=1e-6)
    np.testing.assert_allclose(evaluate._encode_texts(tiny_clip, texts).numpy(), expected, atol=1e-6)
    image = builtin_image("astronaut")
    np.testing.assert_allclose(cosine_matrix(tiny_clip, [image], texts),
                               image_embeddings(tiny_clip, [image]) @ expected.T, atol=1e-6)


# -------------------------------------------------------------------------------------- unit directions

@pytest.fixture(scope="module")
def tiny64(tiny_clip):
    """The tiny model in float64, so that finite differences are exact to ~1e-8."""
    clip = copy.copy(tiny_clip)
    clip.model = copy.deepcopy(tiny_clip.model).double()
    clip._layers = registry_for(tiny_clip)   # same layer names and shapes
    return clip


@pytest.mark.parametrize("layer", ["image_block_4_0", "image_block_3_0_relu"])
def test_directions_equal_finite_differences(tiny64, natural_images, layer):
    spec = resolve_layer(tiny64, layer)
    images = tiny64.normalize(natural_images[:1].double())
    with torch.no_grad():
        reference = forward_to(tiny64.model, images, [spec])[spec.name][0]
    jacobian = directionlib.image_jacobian(tiny64, spec, reference_map=reference.numpy(), chunk_rows=16)
    reference = torch.as_tensor(reference.numpy().astype(np.float32), dtype=torch.float64)  # what J used
    probe = directionlib.neutral_image(tiny64)

    def embed(activation):
        with torch.no_grad(), inject(tiny64.model, spec, activation[None]):
            return F.normalize(tiny64.model.visual(probe), dim=-1)[0]

    eps, moved = 1e-6, 0
    for channel in range(0, spec.channels, max(1, spec.channels // 8)):
        bump = torch.zeros_like(reference)
        bump[channel] = eps
        numeric = (embed(reference + bump) - embed(reference - bump)) / (2 * eps)
        np.testing.assert_allclose(jacobian[:, channel].numpy(), numeric.numpy(), atol=1e-5)
        moved += bool(numeric.norm() > 1e-3)
    assert moved >= 3                       # the check compared real, non-zero derivatives
    assert hook_count(tiny64.model) == 0


def test_direction_batching_strategies_agree(tiny_clip):
    spec = resolve_layer(tiny_clip, "image_block_4_0")
    one_batch = directionlib.unit_directions(tiny_clip, spec)
    chunked = directionlib.unit_directions(tiny_clip, spec, chunk_rows=5)
    replicated = F.normalize(directionlib.image_jacobian(tiny_clip, spec, chunk_rows=6,
                                                    batched_backward=False).t(), dim=-1).numpy()
    assert one_batch.shape == (spec.channels, 32)
    np.testing.assert_allclose(chunked, one_batch, atol=1e-6)
    np.testing.assert_allclose(replicated, one_batch, atol=1e-5)
    norms = np.linalg.norm(one_batch, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)) and (norms > 0).sum() > spec.channels // 4


def test_neutral_reference_is_the_grey_image_activation(tiny_clip):
    spec = resolve_layer(tiny_clip, "image_block_4_0")
    grey = tiny_clip.normalize(torch.full((1, 3, 64, 64), 0.5))
    with torch.no_grad():
        expected = forward_to(tiny_clip.model, grey, [spec])[spec.name][0]
    torch.testing.assert_close(directionlib.neutral_reference(tiny_clip, spec), expected)
    with pytest.raises(NeurolensError, match="reference activation has shape"):
        directionlib.unit_directions(tiny_clip, spec, reference_map=np.zeros((3, 2, 2)))


# ------------------------------------------------------------------------------------------------ ranking

def test_streamed_top_k_equals_brute_force(tiny_clip):
    spec = resolve_layer(tiny_clip, "image_block_4_0_relu")
    directions = directionlib.unit_directions(tiny_clip, spec)
    vocab = builtin_vocab().entries[::150][:300]
    embeddings = textlib.encode_texts(tiny_clip, vocab, batch_size=64)
    indices, scores = directionlib.top_k_texts(directions, embeddings, k=10, chunk=37)
    brute = directions @ embeddings.T
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    all_k, _ = directionlib.top_k_texts(directions, embeddings, k=1000)        # k larger than the vocabulary
    assert all_k.shape == (spec.channels, 300)


def test_run_text_caches_embeddings_directions_and_rankings(tiny_clip, cache_dir, tmp_path, monkeypatch):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    first = run_text(tiny_clip, "image_block_4_0", str(words), top_k=5, cache=cache_dir)
    assert not first.cached and first.top_indices.shape == (512, 5) and first.path.is_file()
    rows = first.rows(7)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["text"] in WORDS

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(textlib, "encode_texts", boom)
    monkeypatch.setattr(directionlib, "unit_directions", boom)
    again = run_text(tiny_clip, "image_block_4_0", str(words), top_k=5, cache=cache_dir)
    assert again.cached
    np.testing.assert_array_equal(again.top_indices, first.top_indices)
    np.testing.assert_array_equal(again.top_scores, first.top_scores)
    # another top-k reuses the cached embeddings and directions (nothing is encoded or differentiated)
    fewer = run_text(tiny_clip, "image_block_4_0", str(words), top_k=3, cache=cache_dir)
    assert not fewer.cached and fewer.embeddings_cached and fewer.directions_cached
    np.testing.assert_array_equal(fewer.top_indices, first.top_indices[:, :3])
    assert find_text(tiny_clip, "image_block_4_0", str(words), top_k=3, cache=cache_dir) is not None
    assert hook_count(tiny_clip.model) == 0


def test_scan_mean_map_is_the_reference(tiny_clip, cache_dir, tmp_path):
    from neurolens.pipelines.scan import run_scan
    scan = run_scan(tiny_clip, "image_block_4_0", None, top_k=4, cache=cache_dir, workers=0)
    spec = resolve_layer(tiny_clip, "image_block_4_0")
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    ranking = run_text(tiny_clip, "image_block_4_0", str(words), top_k=5, scan=scan, cache=cache_dir)
    neutral = run_text(tiny_clip, "image_block_4_0", str(words), top_k=5, cache=cache_dir)
    assert ranking.reference.startswith("scan-mean-") and "mean activation map" in ranking.reference_description
    assert ranking.path != neutral.path
    directions = directionlib.unit_directions(tiny_clip, spec, reference_map=scan.mean_map)
    embeddings = textlib.encode_texts(tiny_clip, load_vocab(str(words)).entries)
    expected, _ = directionlib.top_k_texts(directions, embeddings, k=5)
    np.testing.assert_array_equal(ranking.top_indices, expected)


# ---------------------------------------------------------------------------------------------------- CLI

def _invoke(*args):
    base = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]
    return CliRunner().invoke(app, ["text", *args, *base])


def test_cli_json_and_text_output(cache_dir, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    result = _invoke("--layer", "image_block_4_0", "--unit", "7", "--unit", "9", "--vocab", str(words),
                     "--top-k", "4", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 8 and set(rows[0]) == {"unit", "rank", "score", "text"}
    assert [r["unit"] for r in rows] == [7] * 4 + [9] * 4 and rows[0]["rank"] == 1
    assert all(r["text"] in WORDS and -1 <= r["score"] <= 1 for r in rows)
    plain = _invoke("--layer", "image_block_4_0", "--unit", "7", "--vocab", str(words), "--top-k", "4")
    assert plain.exit_code == 0 and "cached" in plain.stdout and "reference: neutral image" in plain.stdout
    assert rows[0]["text"] in plain.stdout


@pytest.mark.parametrize("args, message", [
    (["--layer", "image_block_9_9", "--unit", "1"], "unknown layer"),
    (["--layer", "image_block_4_0", "--unit", "512"], "out of range"),
    (["--layer", "image_block_4_0", "--unit", "1", "--vocab", "/nonexistent/words.txt"], "not found"),
    (["--layer", "image_block_4_0", "--unit", "1", "--top-k", "0"], "at least 1"),
])
def test_cli_bad_input_exits_2_with_one_line(cache_dir, args, message):
    result = _invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_dataset_reference_scans_and_says_so(cache_dir, tmp_path):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):   # synthetic noise images
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS))
    result = _invoke("--layer", "image_block_4_0", "--unit", "7", "--vocab", str(words), "--top-k", "3",
                     "--dataset", str(folder))
    assert result.exit_code == 0, result.output
    assert "reference: mean activation map over 6 images" in result.stdout


def test_vit_token_layers_get_directions(tiny_vit):
    spec = resolve_layer(tiny_vit, "image_resblock_0")     # tokens: the class token is kept, patches replaced
    batched = directionlib.unit_directions(tiny_vit, spec)
    replicated = F.normalize(directionlib.image_jacobian(tiny_vit, spec, batched_backward=False).t(), dim=-1).numpy()
    np.testing.assert_allclose(batched, replicated, atol=1e-5)
    assert (np.linalg.norm(batched, axis=1) > 0.99).all() and hook_count(tiny_vit.model) == 0


@pytest.mark.parametrize("with_dataset", [False, True])
def test_zero_direction_hint_suggests_dataset_only_when_it_was_not_given(tmp_path, dataset_table, vocab_file,
                                                                         monkeypatch, with_dataset):
    """A unit whose scores are all 0 gets a note; "Try --dataset" only when --dataset was not given."""
    from neurolens.cli import app
    from neurolens.pipelines import text as text_pipeline
    real = text_pipeline.run_text

    def zeroed(*args, **kwargs):
        ranking = real(*args, **kwargs)
        ranking.top_scores[0] = 0.0
        return ranking
    monkeypatch.setattr(text_pipeline, "run_text", zeroed)
    monkeypatch.setattr(text_pipeline, "find_text", lambda *args, **kwargs: None)
    options = ["--dataset", str(dataset_table)] if with_dataset else []
    out = CliRunner().invoke(app, ["text", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer",
                                   "image_block_4_0", "--unit", "0", "--vocab", str(vocab_file), "--top-k", "3",
                                   "--cache", str(tmp_path / "c"), *options])
    assert out.exit_code == 0, out.output
    assert "direction is zero at the reference" in out.stdout and "no text evidence" in out.stdout
    assert ("Try --dataset" in out.stdout) is (not with_dataset)
