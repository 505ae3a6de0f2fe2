"""NSFW scoring: zero-shot math, the model path, prompt files, the paper's string match, NudeNet when installed."""
import numpy as np
import pytest
import torch
from PIL import Image

from neurolens.labels import lexicon, zero_shot as safety
from neurolens.errors import NeurolensError
from neurolens.models.embed import eval_transform
from neurolens.text import encode as text_encode
from neurolens.text.encode import encode_texts
from neurolens.labels.prompts import Prompts, load_prompts


def test_shipped_prompt_lists_are_words_and_unsafe_is_the_minority():
    prompts = load_prompts()
    assert 10 <= len(prompts.unsafe) < len(prompts.safe)
    assert all(len(p) < 60 and "\t" not in p for p in prompts.all)
    # the uninformative prior stays below the threshold
    assert len(prompts.unsafe) / len(prompts.all) < 0.5   # the prior stays below the image threshold


def test_zero_shot_score_is_softmax_mass_on_unsafe_prompts():
    rng = np.random.default_rng(0)
    prompt = np.linalg.qr(rng.normal(size=(16, 16)))[0][:5]       # 5 orthonormal prompt embeddings
    unsafe = 2
    image = np.stack([prompt[0], prompt[4], prompt.mean(0) * 0 + rng.normal(size=16)])
    scores = safety.zero_shot_scores(image, prompt, unsafe)
    # brute force
    emb = image / np.linalg.norm(image, axis=1, keepdims=True)
    logits = 100 * emb @ prompt.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(scores, p[:, :unsafe].sum(1), rtol=1e-5, atol=1e-7)
    assert scores[0] > 0.99 and scores[1] < 0.01
    # equal cosines give the prior m / (m + n)
    uniform = safety.zero_shot_scores(np.ones((1, 16)), np.ones((5, 16)) / 4, unsafe)
    np.testing.assert_allclose(uniform, [unsafe / 5], rtol=1e-6)


def test_image_scores_equal_embedding_scores_through_the_full_forward(tiny_clip):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (80, 70, 3), dtype=np.uint8))
              for i in range(3)]
    scores = safety.nsfw_scores_for_images(tiny_clip, images)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    transform = eval_transform(tiny_clip)
    with torch.no_grad():
        emb = tiny_clip.model.encode_image(torch.stack([transform(im) for im in images]))
    emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    np.testing.assert_allclose(safety.nsfw_scores_for_embeddings(tiny_clip, emb), scores, atol=1e-5)
    assert safety.nsfw_scores_for_images(tiny_clip, []).shape == (0,)


def test_prompt_embeddings_are_cached_per_fingerprint(tiny_clip, monkeypatch):
    prompts = Prompts(["nsfw thing"], ["a cat", "a dog"])
    first = safety.prompt_embeddings(tiny_clip, prompts)
    monkeypatch.setattr(text_encode, "encode_texts", lambda *a: pytest.fail("encoded twice"))
    assert safety.prompt_embeddings(tiny_clip, prompts) is first
    assert first.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, rtol=1e-5)


def test_user_prompt_files_override_and_bad_files_are_one_line_errors(tmp_path):
    unsafe = tmp_path / "u.txt"
    unsafe.write_text("# comment\nfoo\n\nbar\n")
    prompts = load_prompts(unsafe_file=unsafe)
    assert prompts.unsafe == ["foo", "bar"] and prompts.safe == load_prompts().safe
    with pytest.raises(NeurolensError, match="does not exist"):
        load_prompts(safe_file=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(NeurolensError, match="at least one"):
        load_prompts(unsafe_file=empty)


def test_caption_match_is_the_papers_filter():
    assert lexicon.default_terms() == ["porn", "hot", "adult", "xxx", "sex", "f*ck", "rape"]
    texts = ["PORNO site", "a hot day", "Adult Swim", "www.xxx.com", "sexual", "what the fuck", "F4ck",
             "rapeseed oil", "a photo of a cat", None, "", "a dog"]
    got = lexicon.caption_nsfw_matches(texts)
    assert got.tolist() == [True] * 8 + [True, False, False, False]   # substring: "photo" contains "hot"
    word = lexicon.caption_nsfw_matches(texts, mode="word")
    assert word.tolist() == [True, True, True, True, True, True, True, False, False, False, False, False]
    assert lexicon.caption_nsfw_matches(["a grape", "hotel", "sexy", "raped"], mode="word").tolist() == \
        [False, False, True, True]
    assert lexicon.caption_nsfw_matches(["kitten"], terms=["kit*en"]).tolist() == [True]
    assert lexicon.caption_nsfw_matches(["kiten"], terms=["kit*en"]).tolist() == [False]
    with pytest.raises(NeurolensError):
        lexicon.caption_nsfw_matches(["x"], mode="fuzzy")


def test_text_scores_combine_lexicon_and_zero_shot(tiny_clip):
    texts = ["erotic pleasure virgin types", "a red bicycle", "nude"]
    lexicon_only = safety.text_nsfw_scores(tiny_clip, texts, zero_shot=False)
    assert lexicon_only.tolist() == [1.0, 0.0, 1.0]
    both = safety.text_nsfw_scores(tiny_clip, texts)
    assert both[0] == 1.0 and both[2] == 1.0 and 0 <= both[1] <= 1


def test_one_rule_for_term_and_prompt_files(tmp_path):
    from neurolens.audit import captions as audit
    listed = tmp_path / "terms.txt"
    listed.write_text("# a comment line\n  porn \n\n   # an indented comment\nphoto #tag\nf*ck\n", encoding="utf-8")
    expected = ["porn", "photo #tag", "f*ck"]
    assert lexicon.read_list(listed) == expected
    assert audit.parse_terms(str(listed)) == expected            # the audit reads term files the same way
    assert load_prompts(listed, listed).unsafe == expected


def test_nsfw_scores_and_similarity_share_the_models_own_preprocessing(tiny_clip):
    import open_clip
    from neurolens.audit.similarity import cosine_matrix
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 60, 3), dtype=np.uint8))
    _, _, preprocess = open_clip.create_model_and_transforms("nl-tiny-RN", pretrained=None)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(tiny_clip.model.encode_image(preprocess(image)[None]), dim=-1).numpy()
    np.testing.assert_allclose(safety.nsfw_scores_for_images(tiny_clip, [image]),
                               safety.nsfw_scores_for_embeddings(tiny_clip, direct), atol=1e-5)
    text = encode_texts(tiny_clip, ["a cat"])
    np.testing.assert_allclose(cosine_matrix(tiny_clip, [image], ["a cat"]), direct @ text.T, atol=1e-4)
