"""Interop with SAELens itself (the sae-lens pinned in the `test` extra), both ways, on the tiny random ResNet:

- an SAE trained by `neurolens sae train` (TopK, and BatchTopK saved as JumpReLU) loads with
  `sae_lens.SAE.load_from_disk` and encodes and decodes the layer's own cell vectors like neurolens: feature
  activations and reconstruction within 1e-4, the same active features on every vector;
- SAEs made and saved by SAELens's own API (its config classes, its trainer `SAETrainer`, `save_model` and
  `save_inference_model`) in the TopK and JumpReLU architectures, with the options that change the arithmetic
  (rescale_acts_by_decoder_norm, apply_b_dec_to_input=False, layer_norm and constant_norm_rescale inputs), are
  read by `neurolens.sae.io.load_sae` and by the CLI's `--sae PATH` (scan, samples) and `sae list`, with the same
  encode/decode as SAELens within 1e-4.
"""
import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed: the SAELens interop tests need "
                                                   "the pinned sae-lens of the test extra (pip install -e '.[test]')")

from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

from neurolens.activations.hooks import forward_to  # noqa: E402
from neurolens.cli import app  # noqa: E402
from neurolens.datasets.open import open_dataset  # noqa: E402
from neurolens.datasets.decode import preprocess_array  # noqa: E402
from neurolens.models.layer_table import resolve_layer  # noqa: E402
from neurolens.sae.io import load_sae  # noqa: E402
from neurolens.records.sae import sae_folder  # noqa: E402
from neurolens.storage.cache import Cache  # noqa: E402
from scan_data import write_images  # noqa: E402

LAYER = "image_block_3_0"   # nl-tiny-RN: 256 channels on a 4x4 grid at 64 px
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]
D_IN, D_SAE = 256, 512


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saelens-images")
    write_images(folder, 20, start_seed=300)
    return folder


@pytest.fixture(scope="module")
def cells(tiny_clip, images):
    """(images (20, 3, 64, 64) as the scan sees them, their layer activations (20, 256, 4, 4), the cell vectors
    (320, 256))."""
    dataset = open_dataset(str(images))
    pixels = torch.from_numpy(np.stack([preprocess_array(dataset.load(i), 64) for i in range(len(dataset))])).float()
    spec = resolve_layer(tiny_clip, LAYER)
    with torch.no_grad():
        acts = forward_to(tiny_clip.model, tiny_clip.normalize(pixels / 255), [spec])[spec.name]
    return dataset, acts, acts.permute(0, 2, 3, 1).reshape(-1, D_IN)


def saelens_encode_decode(path, vectors):
    sae = SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        z = sae.encode(vectors)
        return sae, z, sae.decode(z), sae(vectors)


def assert_same_arithmetic(path, vectors, reference_z, reference_rec):
    """neurolens's reading of `path` encodes and decodes `vectors` like the reference (SAELens's or neurolens's)."""
    ours = load_sae(path)
    with torch.no_grad():
        z, rec = ours.encode(vectors), ours(vectors)
    assert float((z - reference_z).abs().max()) <= 1e-4
    assert float((rec - reference_rec).abs().max()) <= 1e-4
    assert torch.equal(z != 0, reference_z != 0)           # the same active features on every vector
    return ours, z


# ------------------------------------------------------------------------------ neurolens -> SAELens

@pytest.mark.parametrize("sparsity,architecture,cls", [("topk", "topk", TopKSAE),
                                                       ("batchtopk", "jumprelu", JumpReLUSAE)])
def test_sae_trained_by_neurolens_loads_in_saelens_and_encodes_alike(tmp_path, images, cells, sparsity,
                                                                     architecture, cls):
    _, _, vectors = cells
    train = CliRunner().invoke(app, ["sae", "train", *TINY, "--layer", LAYER, "--dataset", str(images),
                                     "--features", "2x", "--k", "8", "--epochs", "3", "--batch-size", "64",
                                     "--held-out", "0.2", "--sparsity", sparsity, "--out", "mine",
                                     "--cache", str(tmp_path / "cache"), "--workers", "0", "--json"])
    assert train.exit_code == 0, train.output
    path = json.loads(train.stdout)["path"]
    theirs, z, rec, forward = saelens_encode_decode(path, vectors)
    assert type(theirs) is cls and theirs.cfg.architecture() == architecture
    assert theirs.cfg.d_in == D_IN and theirs.cfg.d_sae == D_SAE and theirs.cfg.metadata.hook_name == LAYER
    torch.testing.assert_close(forward, rec, rtol=0, atol=0)
    l0 = (z != 0).sum(dim=1).float()
    if architecture == "topk":
        assert theirs.cfg.k == 8 and int(l0.max()) <= 8
    else:
        threshold = theirs.threshold.detach()
        assert float(threshold.min()) == float(threshold.max()) > 0      # BatchTopK's one global threshold
    assert float(l0.mean()) >= 1                                       # the features fire on the layer's vectors
    ours = load_sae(path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ()):
        assert torch.equal(getattr(theirs, name).detach(), getattr(ours, name).detach()), name
    assert_same_arithmetic(path, vectors, z, rec)
    shifted = vectors * 1.5 + 0.25                                      # inputs off the training distribution too
    _, z2, rec2, _ = saelens_encode_decode(path, shifted)
    assert_same_arithmetic(path, shifted, z2, rec2)


# ------------------------------------------------------------------------------ SAELens -> neurolens

def _random_weights(sae, seed: int, decoder_norms: bool = False, decoder_scale: float = 1.0):
    """Encoder columns and decoder rows of norm about 1 (random norms in [0.5, 2] with decoder_norms; times
    decoder_scale), small biases: pre-activations of the layer's vectors (norm about 46) in the tens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=generator) / D_IN ** 0.5)
        rows = torch.randn(D_SAE, D_IN, generator=generator)
        rows = decoder_scale * rows / rows.norm(dim=1, keepdim=True)
        if decoder_norms:
            rows = rows * (0.5 + 1.5 * torch.rand(D_SAE, 1, generator=generator))
        sae.W_dec.copy_(rows)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=generator) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.1)


def _provider(vectors):
    generator = torch.Generator().manual_seed(0)
    while True:
        yield vectors[torch.randint(len(vectors), (64,), generator=generator)]


def _fit(sae, vectors):
    """SAELens's own trainer, 60 steps of 64 vectors, with its input scaling estimated and folded at the end."""
    config = SAETrainerConfig(total_training_samples=64 * 60, train_batch_size_samples=64, lr=1e-3, lr_end=1e-4,
                              n_batches_for_norm_estimate=10, logger=LoggingConfig(log_to_wandb=False))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SAETrainer(cfg=config, sae=sae, data_provider=_provider(vectors)).fit()


def make_saelens_sae(case: str, folder, vectors):
    """Build, (train,) and save an SAE with SAELens's API; returns the architecture it is saved as."""
    torch.manual_seed(0)
    if case == "topk-rescaled-decoder":
        # inference config with TopK on pre-activations times the decoder norms (non-unit decoder rows)
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True))
        _random_weights(sae, 1, decoder_norms=True)
        sae.save_model(folder)
        return "topk"
    if case == "topk-no-b_dec-norm-rescale":
        sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=12, apply_b_dec_to_input=False,
                                    normalize_activations="constant_norm_rescale"))
        _random_weights(sae, 2)
        sae.save_model(folder)
        return "topk"
    if case == "topk-trained":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8,
                                                    normalize_activations="expected_average_only_in"))
        _fit(sae, vectors).save_inference_model(folder)
        return "topk"
    if case == "jumprelu-layer-norm":
        # decoder rows of norm 100: a normalized-space reconstruction in the hundreds, where undoing the layer norm
        # with std + 1e-5 instead of SAELens's std would differ by about 1e-3
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm"))
        _random_weights(sae, 3, decoder_scale=100.0)
        with torch.no_grad():   # each feature fires on about 1 vector in 10
            normalized = (vectors - vectors.mean(1, keepdim=True)) / (vectors.std(1, keepdim=True) + 1e-5)
            pre = (normalized - sae.b_dec) @ sae.W_enc + sae.b_enc
            sae.threshold.copy_(pre.quantile(0.9, dim=0))
        sae.save_model(folder)
        return "jumprelu"
    if case == "jumprelu-trained":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, jumprelu_init_threshold=0.3,
                                                            l0_coefficient=0.05,
                                                            normalize_activations="expected_average_only_in"))
        _fit(sae, vectors).save_inference_model(folder)
        return "jumprelu"
    if case == "batchtopk-trained":       # SAELens saves BatchTopK as JumpReLU with its global threshold
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8))
        _fit(sae, vectors).save_inference_model(folder)
        return "jumprelu"
    raise AssertionError(case)


CASES = ["topk-rescaled-decoder", "topk-no-b_dec-norm-rescale", "topk-trained", "jumprelu-layer-norm",
         "jumprelu-trained", "batchtopk-trained"]


@pytest.mark.parametrize("case", CASES)
def test_sae_saved_by_saelens_is_read_by_neurolens_and_sae_path(tmp_path, tiny_clip, images, cells, case):
    dataset, acts, vectors = cells
    folder = tmp_path / case
    architecture = make_saelens_sae(case, folder, vectors)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["metadata"]["sae_lens_version"] == sae_lens.__version__
    assert cfg["normalize_activations"] != "expected_average_only_in"     # SAELens folded its scaling on saving
    theirs, z, rec, _ = saelens_encode_decode(folder, vectors)
    l0 = (z != 0).sum(dim=1).float()
    assert 1 <= float(l0.mean()) <= 200                                   # sparse, and firing
    ours, _ = assert_same_arithmetic(folder, vectors, z, rec)
    assert ours.config.architecture == architecture
    if architecture == "topk":
        assert ours.k == theirs.cfg.k

    # --sae PATH in the CLI: the feature scan and a feature's samples are SAELens's activations, max over cells
    feature_maps = z.reshape(20, 4, 4, D_SAE)
    per_image = feature_maps.flatten(1, 2).max(dim=1).values               # (20, d_sae)
    feature = int(per_image.max(dim=0).values.argmax())
    runner = CliRunner()
    common = [*TINY, "--layer", LAYER, "--sae", str(folder), "--cache", str(tmp_path / "cache")]
    scan = runner.invoke(app, ["scan", *common, "--dataset", str(images), "--workers", "0", "--json"])
    assert scan.exit_code == 0, scan.output
    assert json.loads(scan.stdout)["units"] == D_SAE and json.loads(scan.stdout)["basis"].startswith(f"sae-{case}-")
    samples = runner.invoke(app, ["samples", *common, "--dataset", str(images), "--unit", str(feature), "--top-k", "5",
                                  "--workers", "0", "--out", str(tmp_path / "grid.png"), "--json"])
    assert samples.exit_code == 0, samples.output
    rows = json.loads(samples.stdout)
    assert len(rows) == 5 and rows[0]["score"] > 0
    expected = per_image[:, feature]
    for row in rows:
        index = dataset.keys.index(row["path"])
        assert abs(row["score"] - float(expected[index])) <= 1e-4
    assert [dataset.keys.index(row["path"]) for row in rows] == expected.argsort(descending=True, stable=True)[:5].tolist()


def test_saelens_sae_in_the_cache_is_listed_and_used_by_name(tmp_path, tiny_clip, images, cells):
    """An SAE saved by SAELens into the cache's folder of this model and layer is listed by `sae list` (its
    architecture and k from SAELens's cfg.json; no neurolens quality report) and used by --sae NAME."""
    _, _, vectors = cells
    cache = Cache(tmp_path / "cache")
    folder = sae_folder(cache, tiny_clip.fingerprint, LAYER, "from-saelens")
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6))
    _random_weights(sae, 4)
    sae.save_model(folder)
    runner = CliRunner()
    listed = runner.invoke(app, ["sae", "list", *TINY, "--layer", LAYER, "--cache", str(tmp_path / "cache"), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(row["name"], row["architecture"], row["k"], row["features"]) for row in rows] == \
        [("from-saelens", "topk", 6, D_SAE)]
    assert rows[0]["explained_variance"] is None
    text = runner.invoke(app, ["sae", "list", *TINY, "--layer", LAYER, "--cache", str(tmp_path / "cache")])
    assert text.exit_code == 0 and "from-saelens: 512 features, k=6" in text.output
    scan = runner.invoke(app, ["scan", *TINY, "--layer", LAYER, "--sae", "from-saelens", "--dataset", str(images),
                               "--workers", "0", "--cache", str(tmp_path / "cache"), "--json"])
    assert scan.exit_code == 0, scan.output
    assert json.loads(scan.stdout)["basis"].startswith("sae-from-saelens-")
    with torch.no_grad():
        z, rec = sae.encode(vectors), sae(vectors)
    assert_same_arithmetic(folder, vectors, z, rec)
