"""SAE features as units on tiny random models: the SAE's own arithmetic against hand-made weights, the SAELens
and Prisma layouts, training (determinism, resume, progress), and features in scan, samples, visualize and text
(against brute force), through the library and the CLI."""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.datasets.open import open_dataset
from neurolens.activations.hooks import forward_to, hook_count
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.sae import run_sae_train
from neurolens.pipelines.scan import run_scan
from neurolens.sae.model import SaeConfig, SparseAutoencoder
from neurolens.sae.basis import load_basis
from neurolens.sae.io import load_sae, save_sae
from neurolens.records.sae import CFG_NAME, WEIGHTS_NAME
from neurolens.sae.train import SaeTrainSettings
from neurolens.storage.cache import Cache
from scan_data import write_images

LAYER = "image_block_3_0"   # nl-tiny-RN: 256 channels on a 4x4 grid at 64 px
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]
SMALL = SaeTrainSettings(features="2x", k=8, epochs=3, batch_size=64, held_out=0.2, sparsity="batchtopk")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae-images")
    write_images(folder, 20, start_seed=100)
    return folder


def random_sae(d_in=6, d_sae=10, k=3, seed=0, architecture="topk") -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, architecture=architecture,
                                      k=k if architecture == "topk" else None))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return sae


# ------------------------------------------------------------------------------------- hand-made weights

def hand_made_sae() -> SparseAutoencoder:
    """d_in 3, d_sae 4, k 2: feature f reads channel f (f < 3) and feature 3 reads channel 0 minus channel 1;
    b_dec shifts channel 2 by 1 before encoding, b_enc lowers feature 3 by 0.5."""
    sae = SparseAutoencoder(SaeConfig(d_in=3, d_sae=4, architecture="topk", k=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1., 0., 0., 1.], [0., 1., 0., -1.], [0., 0., 1., 0.]]))
        sae.b_enc.copy_(torch.tensor([0., 0., 0., -0.5]))
        sae.W_dec.copy_(torch.tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.], [0.6, 0.8, 0.]]))
        sae.b_dec.copy_(torch.tensor([0., 0., 1.]))
    return sae


def test_hand_made_sae_gives_the_expected_feature_activations():
    sae = hand_made_sae()
    x = torch.tensor([[3., 1., 1.],     # pre = [3, 1, 0, 1.5]  -> top 2: f0=3, f3=1.5
                      [0., 2., 4.],     # pre = [0, 2, 3, -2.5] -> f2=3, f1=2
                      [-1., -2., 0.]])  # pre = [-1, -2, -1, 0.5] -> f3=0.5 and one of the -1s, ReLU'd to 0
    expected = torch.tensor([[3., 0., 0., 1.5], [0., 2., 3., 0.], [0., 0., 0., 0.5]])
    torch.testing.assert_close(sae.pre_activations(x), torch.tensor(
        [[3., 1., 0., 1.5], [0., 2., 3., -2.5], [-1., -2., -1., 0.5]]))
    torch.testing.assert_close(sae.encode(x), expected)
    # reconstruction: z @ W_dec + b_dec
    torch.testing.assert_close(sae(x), expected @ sae.W_dec.detach() + sae.b_dec.detach())
    standard = SparseAutoencoder(SaeConfig(d_in=3, d_sae=4, architecture="standard"))
    standard.load_tensors(sae.state_tensors())
    torch.testing.assert_close(standard.encode(x), torch.tensor([[3., 1., 0., 1.5], [0., 2., 3., 0.], [0., 0., 0., 0.5]]))


def test_hand_made_sae_through_the_basis_and_the_saelens_layout(tmp_path, tiny_clip):
    """Written by hand in SAELens's layout (cfg.json + safetensors), read back by --sae PATH, applied to every cell."""
    from safetensors.torch import save_file
    spec = resolve_layer(tiny_clip, LAYER)
    channels = spec.channels
    # feature f reads channel f for f < 3; a 3-feature, k=1 SAE on a 256-channel layer
    w_enc = torch.zeros(channels, 3)
    w_enc[0, 0] = w_enc[1, 1] = w_enc[2, 2] = 1.0
    folder = tmp_path / "hand"
    folder.mkdir()
    save_file({"W_enc": w_enc, "b_enc": torch.tensor([0., -0.25, 0.]), "W_dec": w_enc.t().contiguous(),
               "b_dec": torch.zeros(channels)}, str(folder / WEIGHTS_NAME))
    (folder / CFG_NAME).write_text(json.dumps({"architecture": "topk", "d_in": channels, "d_sae": 3, "k": 1,
                                               "dtype": "float32", "apply_b_dec_to_input": True,
                                               "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0"}}))
    basis = load_basis(tiny_clip, LAYER, str(folder))
    assert basis.units == 3 and basis.tag(2) == "sae-hand_feature2"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    acts = forward_to(tiny_clip.model, tiny_clip.normalize(images), [spec])[spec.name]
    pre = torch.stack([acts[:, 0], acts[:, 1] - 0.25, acts[:, 2]], dim=1)          # (2, 3, 4, 4)
    winner = pre.argmax(dim=1, keepdim=True)
    expected = torch.zeros_like(pre).scatter_(1, winner, pre.gather(1, winner).relu())
    torch.testing.assert_close(basis.activations(acts), expected)


# ------------------------------------------------------------------------------------------ file formats

@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_saelens_layout_round_trip_is_bit_for_bit(tmp_path, architecture):
    sae = random_sae(d_in=16, d_sae=40, k=5, architecture=architecture)
    save_sae(sae, tmp_path / "a", {"note": "x"})
    loaded = load_sae(tmp_path / "a")
    assert set(loaded.state_tensors()) == set(sae.state_tensors())
    for name, tensor in sae.state_tensors().items():
        assert torch.equal(getattr(loaded, name).detach(), tensor), name
    assert loaded.config.architecture == architecture and loaded.config.metadata["note"] == "x"
    assert loaded.config.k == (5 if architecture == "topk" else None)
    save_sae(loaded, tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    cfg = json.loads((tmp_path / "a" / CFG_NAME).read_text())
    assert {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "metadata"} <= set(cfg)
    assert ("k" in cfg) == (architecture == "topk")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert tensors["W_enc"].shape == (16, 40) and tensors["W_dec"].shape == (40, 16)
    assert tensors["b_enc"].shape == (40,) and tensors["b_dec"].shape == (16,)
    if architecture == "jumprelu":
        assert tensors["threshold"].shape == (40,)
        x = torch.randn(7, 16)
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


def test_reads_older_saelens_and_prisma_configs(tmp_path):
    sae = random_sae(d_in=8, d_sae=24, k=4, seed=1)
    tensors = sae.state_tensors()
    # SAELens before 6.0: activation_fn_str + activation_fn_kwargs, hook_point
    old = tmp_path / "old"
    old.mkdir()
    from safetensors.torch import save_file
    save_file(tensors, str(old / WEIGHTS_NAME))
    (old / CFG_NAME).write_text(json.dumps({"d_in": 8, "d_sae": 24, "activation_fn_str": "topk",
                                            "activation_fn_kwargs": {"k": 4}, "hook_point": "blocks.3.hook_resid_post",
                                            "normalize_activations": False, "dtype": "torch.float32"}))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_sae(old).encode(x), sae.encode(x))
    # Prisma: config.json (expansion_factor, no d_sae) + a .pt state dict
    prisma = tmp_path / "prisma"
    prisma.mkdir()
    torch.save(dict(tensors), prisma / "weights.pt")
    (prisma / "config.json").write_text(json.dumps({"d_in": 8, "expansion_factor": 3, "activation_fn_str": "topk",
                                                    "activation_fn_kwargs": {"k": 4}, "architecture": "standard",
                                                    "hook_point_layer": 3, "normalize_activations": "none"}))
    torch.testing.assert_close(load_sae(prisma / "weights.pt").encode(x), sae.encode(x))


def _saelens_folder(folder, tensors, **cfg):
    from safetensors.torch import save_file
    folder.mkdir()
    save_file({name: t.clone() for name, t in tensors.items()}, str(folder / WEIGHTS_NAME))
    (folder / CFG_NAME).write_text(json.dumps({"dtype": "float32", "metadata": {"sae_lens_version": "6.54.12"}, **cfg}))
    return folder


def test_saelens_arithmetic_variants_by_hand(tmp_path):
    """What SAELens's code does (saes/topk_sae.py, jumprelu_sae.py, sae.py), on hand-made weights; the interop
    with SAELens itself is tests/test_saelens.py."""
    from neurolens.errors import NeurolensError
    # TopK with rescale_acts_by_decoder_norm: TopK over pre * |W_dec row|, activations divided by it before decoding.
    # x = [1, 0.5], identity encoder, decoder rows of norm 1 and 3: rescaled pre = [1, 1.5] -> feature 1 wins with
    # 1.5 (plain TopK would pick feature 0); reconstruction 1.5 / 3 * [0, 3] = [0, 1.5]
    eye = torch.eye(2)
    folder = _saelens_folder(tmp_path / "rescaled", {"W_enc": eye, "b_enc": torch.zeros(2), "b_dec": torch.zeros(2),
                                                     "W_dec": torch.tensor([[1., 0.], [0., 3.]])},
                             architecture="topk", d_in=2, d_sae=2, k=1, rescale_acts_by_decoder_norm=True)
    sae = load_sae(folder)
    x = torch.tensor([[1.0, 0.5]])
    torch.testing.assert_close(sae.encode(x), torch.tensor([[0.0, 1.5]]))
    torch.testing.assert_close(sae(x), torch.tensor([[0.0, 1.5]]))
    # JumpReLU weights from before SAELens 6 hold log_threshold
    folder = _saelens_folder(tmp_path / "log", {"W_enc": eye, "b_enc": torch.zeros(2), "W_dec": eye,
                                                "b_dec": torch.zeros(2), "log_threshold": torch.log(torch.tensor([0.5, 2.0]))},
                             architecture="jumprelu", d_in=2, d_sae=2)
    sae = load_sae(folder)
    torch.testing.assert_close(sae.threshold.detach(), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(sae.encode(torch.tensor([[1.0, 1.0]])), torch.tensor([[1.0, 0.0]]))
    # layer_norm: n(x) = (x - mu) / (std + 1e-5), undone as y * std + mu (no eps). An SAE that passes n(x) through
    # (identity weights, b_dec = -10 keeps every pre-activation positive) returns mu + (x - mu) * std / (std + 1e-5):
    # 1 % short of x for a spread of 1e-3
    folder = _saelens_folder(tmp_path / "ln", {"W_enc": torch.eye(3), "b_enc": torch.zeros(3), "W_dec": torch.eye(3),
                                               "b_dec": torch.full((3,), -10.0)},
                             architecture="standard", d_in=3, d_sae=3, normalize_activations="layer_norm")
    x = torch.tensor([[5.000, 5.001, 5.002]], dtype=torch.float64)
    mu, std = x.mean(), x.std()
    expected = mu + (x - mu) / (std + 1e-5) * std
    torch.testing.assert_close(load_sae(folder)(x.float()).double(), expected, rtol=0, atol=2e-6)
    assert abs(float(expected[0, 2] - x[0, 2])) > 5e-6        # the eps is not undone
    _saelens_folder(tmp_path / "white", {"W_enc": eye, "b_enc": torch.zeros(2), "W_dec": eye, "b_dec": torch.zeros(2)},
                    architecture="topk", d_in=2, d_sae=2, k=1, normalize_activations="covariance_whitening")
    with pytest.raises(NeurolensError, match="fold_activation_whitening"):
        load_sae(tmp_path / "white")


def test_reads_prisma_checkpoints_that_pickle_their_config_without_running_its_code(tmp_path):
    """Prisma's legacy files are {"cfg": <its config object>, "state_dict": ...}; the config class is not
    importable here, and it must not be: it is rebuilt as an inert holder of its fields."""
    module = types.ModuleType("fake_prisma_config")

    class RunnerConfig:
        def __init__(self):
            self.d_in, self.expansion_factor = 8, 2

        def __setstate__(self, state):   # would run on load if the real class were used
            raise AssertionError("foreign code ran")
    RunnerConfig.__module__, RunnerConfig.__qualname__ = "fake_prisma_config", "RunnerConfig"
    module.RunnerConfig = RunnerConfig
    sys.modules["fake_prisma_config"] = module
    try:
        sae = random_sae(d_in=8, d_sae=16, architecture="standard", seed=2)
        folder = tmp_path / "legacy"
        folder.mkdir()
        torch.save({"cfg": RunnerConfig(), "state_dict": dict(sae.state_tensors())}, folder / "n_images_100.pt")
    finally:
        del sys.modules["fake_prisma_config"]
    (folder / "config.json").write_text(json.dumps({"d_in": 8, "d_sae": 16, "activation_fn_str": "relu",
                                                    "architecture": "standard"}))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(load_sae(folder).encode(x), sae.encode(x))


def test_sae_that_does_not_fit_the_layer_is_one_line(tmp_path, tiny_clip, images):
    save_sae(random_sae(d_in=7, d_sae=12), tmp_path / "other")
    result = CliRunner().invoke(app, ["scan", *TINY, "--layer", LAYER, "--dataset", str(images),
                                      "--sae", str(tmp_path / "other"), "--cache", str(tmp_path / "c")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "reads 7-channel vectors" in result.output and "256 channels" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    missing = CliRunner().invoke(app, ["visualize", *TINY, "--layer", LAYER, "--unit", "0", "--sae", "nope",
                                       "--cache", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "no SAE named 'nope'" in missing.output and "sae train" in missing.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CFG_NAME).write_text("{not json")
    (tmp_path / "bad" / WEIGHTS_NAME).write_bytes(b"garbage")
    broken = CliRunner().invoke(app, ["text", *TINY, "--layer", LAYER, "--unit", "0", "--sae", str(tmp_path / "bad"),
                                      "--cache", str(tmp_path / "c")])
    assert broken.exit_code == 2 and "Traceback" not in broken.output and "cfg.json" in broken.output


# --------------------------------------------------------------------------------------------- training

def test_training_is_deterministic_and_resumes_bit_for_bit(tmp_path, tiny_clip, images):
    settings = SaeTrainSettings(features="2x", k=8, epochs=2, batch_size=32, held_out=0.2, buffer_vectors=96,
                                sparsity="batchtopk")
    first = run_sae_train(tiny_clip, LAYER, str(images), settings, name="a", cache=Cache(tmp_path / "1"), workers=0)
    again = run_sae_train(tiny_clip, LAYER, str(images), settings, name="a", cache=Cache(tmp_path / "2"), workers=0)
    a, b = load_sae(first.path), load_sae(again.path)
    assert a.config.architecture == "jumprelu"                 # BatchTopK, saved with its threshold
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # 16 training images x 16 cells = 256 vectors per epoch in chunks of 96 vectors (6 images): 3 chunks
    cache = Cache(tmp_path / "3")
    with pytest.raises(KeyboardInterrupt):
        run_sae_train(tiny_clip, LAYER, str(images), settings, name="a", cache=cache, workers=0, stop_after_chunks=4)
    assert (cache.folder("sae", tiny_clip.fingerprint, LAYER) / "a" / "checkpoint.pt").is_file()
    resumed = run_sae_train(tiny_clip, LAYER, str(images), settings, name="a", cache=cache, workers=0)
    assert resumed.resumed_from == 256 + 96           # one epoch (96 + 96 + 64 vectors) and one chunk
    c = load_sae(resumed.path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    assert not (resumed.path / "checkpoint.pt").exists()
    other_seed = run_sae_train(tiny_clip, LAYER, str(images), SaeTrainSettings(**{**settings.as_dict(), "seed": 1}),
                               name="a", cache=Cache(tmp_path / "4"), workers=0)
    assert not torch.equal(load_sae(other_seed.path).W_enc, a.W_enc)


def test_trained_sae_is_saved_in_saelens_layout_with_its_quality_report(tmp_path, tiny_clip, images):
    seen = []
    result = run_sae_train(tiny_clip, LAYER, str(images), SMALL, name="q", cache=Cache(tmp_path), workers=0,
                           on_metrics=seen.append)
    sae = load_sae(result.path)
    assert sae.d_sae == 512 and sae.d_in == 256 and sae.config.architecture == "jumprelu"
    assert result.k == 8 and result.name == "q"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(512))       # unit-norm decoder rows
    assert seen and {"loss", "explained_variance", "dead_share", "vectors", "total"} <= set(seen[-1])
    summary = result.summary()
    for key in ("name", "path", "features", "k", "explained_variance", "l0", "dead_share", "embedding_cosine"):
        assert key in summary, key
    assert summary["held_out_images"] == 4 and summary["held_out_vectors"] == 4 * 16
    assert 0 < summary["l0"] and -1.0 <= summary["embedding_cosine"] <= 1.0
    cfg = json.loads((result.path / CFG_NAME).read_text())
    assert cfg["metadata"]["neurolens"]["quality"]["explained_variance"] == summary["explained_variance"]
    assert cfg["metadata"]["hook_name"] == LAYER
    cached = run_sae_train(tiny_clip, LAYER, str(images), SMALL, name="q", cache=Cache(tmp_path), workers=0)
    assert cached.cached and cached.summary()["explained_variance"] == summary["explained_variance"]
    assert cached.k == 8
    from neurolens.errors import NeurolensError
    with pytest.raises(NeurolensError, match="already exists"):
        run_sae_train(tiny_clip, LAYER, str(images), SaeTrainSettings(features="2x", k=4, epochs=1), name="q",
                      cache=Cache(tmp_path), workers=0)


def _trainer(d_in=2, d_sae=3, k=1, batch_size=2, sparsity="batchtopk"):
    from neurolens.sae.train import Trainer
    settings = SaeTrainSettings(features=str(d_sae), k=k, batch_size=batch_size, sparsity=sparsity)
    return Trainer(d_in, d_sae, settings, total_steps=10, dead_after=100, device=torch.device("cpu"))


def test_batchtopk_keeps_the_k_times_n_largest_activations_of_the_batch():
    """BatchTopK over n vectors keeps the batch's k * n largest pre-activations, whichever vectors they are on, and
    reconstructs from exactly those; TopK keeps k on every vector."""
    trainer = _trainer(d_in=4, d_sae=10, k=3)
    pre = torch.randn(8, 10, generator=torch.Generator().manual_seed(3))
    pre[0] += 5.0                                      # vector 0 takes most of the batch's budget
    values, indices, offsets = trainer.select(pre)
    assert values.shape == indices.shape == (24,) and offsets.shape == (8,)
    dense = torch.zeros_like(pre)
    for row in range(8):
        end = offsets[row + 1] if row < 7 else len(values)
        dense[row, indices[offsets[row]:end]] = values[offsets[row]:end]
    kept = torch.zeros_like(pre, dtype=torch.bool).flatten()
    kept[pre.flatten().topk(24).indices] = True
    torch.testing.assert_close(dense, torch.where(kept.view_as(pre), pre.relu(), torch.zeros_like(pre)))
    assert int((dense[0] != 0).sum()) == 10            # all of vector 0's features, more than k
    with torch.no_grad():
        trainer.sae.W_dec.copy_(torch.randn(10, 4, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(trainer.sae.decode_sparse(values, indices, offsets=offsets), trainer.sae.decode(dense))
    topk = _trainer(d_in=4, d_sae=10, k=3, sparsity="topk")
    values, indices, offsets = topk.select(pre)
    assert values.shape == (8, 3) and offsets is None


def test_batchtopk_threshold_is_the_mean_batch_minimum_and_is_saved_as_jumprelu():
    """Identity encoder, scale 2: batch 1 keeps 3 and 2 (scaled 6 and 4: minimum 4), batch 2 keeps 5 and 4 (10 and
    8: minimum 8); the threshold is their mean, 6 in the scaled space, 3 for raw inputs; the exported JumpReLU SAE
    keeps exactly the raw pre-activations above 3."""
    trainer = _trainer(d_in=2, d_sae=2, k=1, batch_size=2)
    with torch.no_grad():
        trainer.sae.W_enc.copy_(torch.eye(2))
        trainer.sae.b_enc.zero_()
        trainer.sae.b_dec.zero_()
    trainer.state.scale = 2.0
    raw = torch.tensor([[3.0, 1.0], [2.0, 0.0], [5.0, 4.0], [0.0, 0.5], [9.0, 9.0]])   # the last: no full batch
    assert trainer.estimate_threshold(raw) == pytest.approx(6.0)
    trainer.state.threshold = 6.0
    sae = trainer.export()
    assert sae.config.architecture == "jumprelu" and sae.k is None
    torch.testing.assert_close(sae.threshold.detach(), torch.full((2,), 3.0))
    torch.testing.assert_close(sae.encode(torch.tensor([[3.5, 2.9], [2.0, 3.01]])),
                               torch.tensor([[3.5, 0.0], [0.0, 3.01]]))
    with pytest.raises(RuntimeError, match="threshold"):
        trainer.state.threshold = None
        trainer.export()
    topk = _trainer(d_in=2, d_sae=2, k=1, sparsity="topk")
    topk.state.scale = 1.0
    assert topk.export().config.architecture == "topk" and topk.export().k == 1


def test_checkpoint_carries_the_threshold_and_an_older_format_is_one_line(tmp_path, tiny_clip, images):
    from neurolens.errors import NeurolensError
    from neurolens.sae.train import read_checkpoint, write_checkpoint
    trainer = _trainer(d_in=4, d_sae=6)
    trainer.state.scale, trainer.state.threshold = 1.5, 0.25
    write_checkpoint(tmp_path / "c.pt", trainer.checkpoint("key"))
    restored = _trainer(d_in=4, d_sae=6)
    restored.restore(read_checkpoint(tmp_path / "c.pt", "key"))
    assert restored.state.threshold == 0.25 and restored.state.scale == 1.5
    assert read_checkpoint(tmp_path / "c.pt", "other settings") is None

    cache = Cache(tmp_path / "cache")
    folder = cache.folder("sae", tiny_clip.fingerprint, LAYER) / "old"
    old = trainer.checkpoint("key")
    old["format"] = 1
    write_checkpoint(folder / "checkpoint.pt", old)
    with pytest.raises(NeurolensError) as error:
        run_sae_train(tiny_clip, LAYER, str(images), SMALL, name="old", cache=cache, workers=0)
    assert "format 1" in str(error.value) and "--force" in str(error.value) and "\n" not in str(error.value)
    assert (folder / "checkpoint.pt").is_file()          # kept: nothing is lost
    fresh = run_sae_train(tiny_clip, LAYER, str(images), SMALL, name="old", cache=cache, workers=0, force=True)
    assert fresh.resumed_from is None and not (folder / "checkpoint.pt").exists()


def test_sparsity_option_topk_and_the_settings_key(tmp_path, tiny_clip, images):
    """--sparsity topk trains a TopK SAE with exactly k per vector; the sparsity is part of the settings hashed
    into the key (and the default name); an unknown one is one line, exit code 2."""
    from neurolens.pipelines.sae import train_key
    settings = SaeTrainSettings(**{**SMALL.as_dict(), "sparsity": "topk"})
    result = run_sae_train(tiny_clip, LAYER, str(images), settings, cache=Cache(tmp_path / "c"), workers=0)
    sae = load_sae(result.path)
    assert sae.config.architecture == "topk" and sae.k == 8 and result.name.startswith("topk-512-k8-")
    assert 0 < result.summary()["l0"] <= 8
    spec, dataset = resolve_layer(tiny_clip, LAYER), open_dataset(str(images))
    assert train_key(tiny_clip, spec, dataset, settings, 512, "fp32") != train_key(tiny_clip, spec, dataset, SMALL,
                                                                                   512, "fp32")
    bad = CliRunner().invoke(app, ["sae", "train", *TINY, "--layer", LAYER, "--dataset", str(images), "--sparsity",
                                   "gated", "--cache", str(tmp_path / "c"), "--workers", "0"])
    assert bad.exit_code == 2 and "--sparsity must be batchtopk or topk" in bad.output
    assert "Traceback" not in bad.output
    batch = CliRunner().invoke(app, ["sae", "train", *TINY, "--layer", LAYER, "--dataset", str(images), "--features",
                                     "512", "--k", "8", "--epochs", "1", "--batch-size", "64", "--held-out", "0.2",
                                     "--sparsity", "batchtopk", "--cache", str(tmp_path / "c"), "--workers", "0",
                                     "--json"])
    assert batch.exit_code == 0, batch.output
    summary = json.loads(batch.stdout)
    assert summary["name"].startswith("batchtopk-512-k8-") and summary["settings"]["sparsity"] == "batchtopk"
    assert load_sae(summary["path"]).config.architecture == "jumprelu"


def test_explained_variance_and_embedding_cosine_are_what_they_say(tmp_path, tiny_clip, images):
    """A ReLU SAE with identity weights on a non-negative layer (the block's post-ReLU output) reconstructs it
    exactly: all variance explained, embedding unchanged; an SAE that outputs zeros explains less than none."""
    from neurolens.sae.quality import evaluate
    spec = resolve_layer(tiny_clip, LAYER + "_relu")              # non-negative activations
    sae = SparseAutoencoder(SaeConfig(d_in=spec.channels, d_sae=spec.channels, architecture="standard"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(spec.channels))
        sae.W_dec.copy_(torch.eye(spec.channels))
    report = evaluate(tiny_clip, spec, sae, open_dataset(str(images)), range(6))
    assert report.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert report.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    assert report.held_out_vectors == 6 * 16
    zero = SparseAutoencoder(SaeConfig(d_in=spec.channels, d_sae=4, architecture="standard"))  # outputs b_dec = 0
    report = evaluate(tiny_clip, spec, zero, open_dataset(str(images)), range(6))
    assert report.explained_variance < 0 and report.l0 == 0 and report.never_fired_share == 1.0


# ------------------------------------------------------------------------------------ features as units

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip, images):
    root = tmp_path_factory.mktemp("sae-trained")
    cache = Cache(root / "cache")
    result = run_sae_train(tiny_clip, LAYER, str(images), SMALL, name="tiny", cache=cache, workers=0)
    return result, cache


def test_available_bases_lists_the_neurons_and_the_trained_saes(tiny_clip, trained):
    from neurolens.sae.basis import available_bases
    result, cache = trained
    rows = available_bases(tiny_clip, LAYER, cache)
    assert rows[0]["sae"] is None and rows[0]["units"] == 256
    assert [row["sae"] for row in rows[1:]] == ["tiny"] and rows[1]["units"] == 512
    assert rows[1]["quality"]["explained_variance"] == result.summary()["explained_variance"]
    assert load_basis(tiny_clip, LAYER, rows[1]["sae"], cache=cache).units == 512


def test_scan_with_features_matches_brute_force_in_one_pass(tiny_clip, images, trained, tmp_path):
    result, cache = trained
    basis = load_basis(tiny_clip, LAYER, "tiny", cache=cache)
    dataset = open_dataset(str(images))
    forwards = []
    handle = tiny_clip.model.visual.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    try:
        features = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=8, workers=0, cache=cache, basis=basis)
    finally:
        handle.remove()
    # one forward per batch for neurons and features together; the last batch (4 images) is padded to the batch
    # size, so that an image's values never depend on its batch-mates
    assert forwards == [8, 8, 8]
    assert hook_count(tiny_clip.model) == 0
    assert features.basis == basis.id and features.channels == 512 and not features.cached
    neurons = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=8, workers=0, cache=cache)
    assert neurons.cached and neurons.basis == "neurons"   # written by the same pass
    fresh = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=8, workers=0, cache=Cache(tmp_path))
    np.testing.assert_array_equal(neurons.top_indices, fresh.top_indices)
    np.testing.assert_array_equal(neurons.mean_map, features.mean_map)   # the layer's mean map in both

    spec = resolve_layer(tiny_clip, LAYER)
    from neurolens.datasets.decode import preprocess_array
    pixels = torch.from_numpy(np.stack([preprocess_array(dataset.load(i), 64) for i in range(len(dataset))])).float() / 255
    acts = forward_to(tiny_clip.model, tiny_clip.normalize(pixels), [spec])[spec.name]
    with torch.no_grad():
        maps = basis.activations(acts).flatten(2)
    values, cells = maps.max(dim=2)
    np.testing.assert_allclose(features.per_image_max(), values.numpy(), rtol=1e-5, atol=1e-6)
    for feature in range(0, 512, 37):
        order = np.lexsort((np.arange(len(dataset)), -values[:, feature].numpy()))[:5]
        expected = [i for i in order if values[i, feature] > float("-inf")]
        np.testing.assert_array_equal(features.top_indices[feature][:len(expected)], expected)
        rows, cols = features.top_cells[feature][:len(expected)].T
        np.testing.assert_array_equal(rows * 4 + cols, cells[expected, feature].numpy())
    active = (values > 0).any(0)
    assert active.sum() > 50                            # the features respond to these images
    dense = basis.sae.encode(acts.permute(0, 2, 3, 1).reshape(-1, spec.channels))
    pre = basis.sae.pre_activations(acts.permute(0, 2, 3, 1).reshape(-1, spec.channels))
    threshold = basis.sae.threshold                      # BatchTopK's saved form: one global JumpReLU threshold
    assert float(threshold.min()) == float(threshold.max()) > 0
    torch.testing.assert_close(dense, torch.where(pre > threshold, pre, torch.zeros_like(pre)))


def test_interrupted_feature_scan_resumes_to_the_same_result(tiny_clip, images, trained, tmp_path):
    result, cache = trained
    basis = load_basis(tiny_clip, LAYER, "tiny", cache=cache)
    dataset = open_dataset(str(images))
    reference = run_scan(tiny_clip, LAYER, dataset, top_k=4, batch_size=5, workers=0, cache=Cache(tmp_path / "r"),
                         basis=basis)

    def stop(done, total):
        if done >= 10:
            raise KeyboardInterrupt()
    partial = Cache(tmp_path / "p")
    with pytest.raises(KeyboardInterrupt):
        run_scan(tiny_clip, LAYER, dataset, top_k=4, batch_size=5, workers=0, cache=partial, basis=basis,
                 checkpoint_every=1, progress=stop)
    resumed = run_scan(tiny_clip, LAYER, dataset, top_k=4, batch_size=5, workers=0, cache=partial, basis=basis)
    assert resumed.resumed_from == [10]
    np.testing.assert_array_equal(resumed.top_indices, reference.top_indices)
    np.testing.assert_array_equal(resumed.top_values, reference.top_values)
    np.testing.assert_array_equal(resumed.per_image_max(), reference.per_image_max())
    neurons = run_scan(tiny_clip, LAYER, dataset, top_k=4, batch_size=5, workers=0, cache=partial)
    assert neurons.cached


def test_feature_visualization_raises_the_pre_topk_activation_and_names_files(tiny_clip, trained, tmp_path):
    from neurolens.pipelines.visualize import run_visualize
    from neurolens.optvis.loop import evaluate
    from neurolens.types import RenderSettings
    result, cache = trained
    basis = load_basis(tiny_clip, LAYER, "tiny", cache=cache)
    settings = RenderSettings(steps=24, seeds=(0,), transforms="none")
    # features 3 and 5 of the seed-0 SAE: on this random model a feature whose random start is already near its
    # ceiling (7 and 10 here) can end a little lower after 24 steps at lr 0.35; 10 of the first 12 rise
    out = run_visualize(tiny_clip, LAYER, [3, 5], settings, cache=cache, out_dir=tmp_path / "png", basis=basis)
    assert [r.unit for r in out] == [3, 5]
    assert out[0].curve[-1, 0] > out[0].curve[0, 0] and out[1].curve[-1, 0] > out[1].curve[0, 0]
    assert out[0].paths[0].endswith("nl-tiny-RN_image_block_3_0_sae-tiny_feature3_seed0.png")
    spec = resolve_layer(tiny_clip, LAYER)
    images = torch.from_numpy(np.asarray(out[0].images)).permute(0, 3, 1, 2).float() / 255
    acts = forward_to(tiny_clip.model, tiny_clip.normalize(images), [spec])[spec.name]
    pre = basis.sae.pre_activations(acts.permute(0, 2, 3, 1))[..., 3].mean()
    assert float(out[0].activations[0]) == pytest.approx(float(pre), rel=1e-3, abs=1e-3)
    assert float(evaluate(tiny_clip, spec, "channel", [3], images, basis)[0]) == pytest.approx(float(pre), abs=1e-3)
    neuron = run_visualize(tiny_clip, LAYER, [3], settings, cache=cache)
    assert not neuron[0].cached and neuron[0].images.tobytes() != out[0].images.tobytes()   # its own record
    again = run_visualize(tiny_clip, LAYER, [3], settings, cache=cache, basis=basis)
    assert again[0].cached


def test_feature_text_directions_are_decoder_directions_through_the_jacobian(tiny_clip, trained, tmp_path):
    from neurolens.pipelines.text import run_text, unit_directions_cached
    from neurolens.text.directions import image_jacobian
    result, cache = trained
    basis = load_basis(tiny_clip, LAYER, "tiny", cache=cache)
    spec = resolve_layer(tiny_clip, LAYER)
    directions, cached = unit_directions_cached(tiny_clip, spec, None, cache, basis=basis)
    assert directions.shape == (512, tiny_clip.model.visual.output_dim) and not cached
    jacobian = image_jacobian(tiny_clip, spec)
    expected = F.normalize(basis.sae.W_dec.detach() @ jacobian.t(), dim=-1).numpy()
    np.testing.assert_allclose(directions, expected, atol=1e-5)
    # a feature whose decoder row is channel c has exactly neuron c's direction
    one_hot = SparseAutoencoder(SaeConfig(d_in=spec.channels, d_sae=2, architecture="topk", k=1))
    with torch.no_grad():
        one_hot.W_dec[0, 5] = 1.0
        one_hot.W_dec[1, 9] = 2.0
    neuron_dirs, _ = unit_directions_cached(tiny_clip, spec, None, cache)
    np.testing.assert_allclose(load_basis(tiny_clip, LAYER, one_hot, name="onehot").directions(jacobian),
                               neuron_dirs[[5, 9]], atol=1e-5)
    ranking = run_text(tiny_clip, LAYER, str(_vocab(tmp_path)), top_k=2, cache=cache, basis=basis)
    assert ranking.top_indices.shape == (512, 2) and ranking.basis == basis.id


def test_cli_sae_train_list_and_features_in_every_command(tmp_path, images):
    runner = CliRunner()
    cache = str(tmp_path / "cache")
    train = runner.invoke(app, ["sae", "train", *TINY, "--layer", LAYER, "--dataset", str(images), "--features", "512",
                                "--k", "8", "--epochs", "2", "--batch-size", "64", "--held-out", "0.2", "--out", "cli",
                                "--cache", cache, "--workers", "0", "--json"])
    assert train.exit_code == 0, train.output
    summary = json.loads(train.stdout)
    for key in ("name", "path", "features", "k", "explained_variance", "l0", "dead_share", "embedding_cosine"):
        assert key in summary, key
    assert summary["name"] == "cli" and summary["features"] == 512 and summary["k"] == 8
    text_out = runner.invoke(app, ["sae", "train", *TINY, "--layer", LAYER, "--dataset", str(images), "--features",
                                   "512", "--k", "8", "--epochs", "2", "--batch-size", "64", "--held-out", "0.2",
                                   "--out", "cli", "--cache", cache, "--workers", "0"])
    assert text_out.exit_code == 0 and "cached: SAE cli" in text_out.output and "explained variance" in text_out.output
    listed = runner.invoke(app, ["sae", "list", *TINY, "--layer", LAYER, "--cache", cache, "--json"])
    assert listed.exit_code == 0 and [row["name"] for row in json.loads(listed.stdout)] == ["cli"]

    common = [*TINY, "--layer", LAYER, "--sae", "cli", "--cache", cache]
    scan = runner.invoke(app, ["scan", *common, "--dataset", str(images), "--workers", "0", "--json"])
    assert scan.exit_code == 0, scan.output
    assert json.loads(scan.stdout)["units"] == 512 and json.loads(scan.stdout)["basis"].startswith("sae-cli-")
    grid = tmp_path / "samples.png"
    samples = runner.invoke(app, ["samples", *common, "--dataset", str(images), "--unit", "5", "--workers", "0",
                                  "--out", str(grid), "--json"])
    assert samples.exit_code == 0, samples.output
    assert grid.is_file() and all(row["unit"] == 5 for row in json.loads(samples.stdout))
    default_grid = runner.invoke(app, ["samples", *common, "--dataset", str(images), "--unit", "5", "--workers", "0"],
                                 catch_exceptions=False)
    assert default_grid.exit_code == 0 and f"{LAYER}_sae-cli_feature5.png" in default_grid.output
    visual = runner.invoke(app, ["visualize", *common, "--unit", "5", "--steps", "4", "--out", str(tmp_path / "v"),
                                 "--json"])
    assert visual.exit_code == 0, visual.output
    assert json.loads(visual.stdout)["results"][0]["path"].endswith("_sae-cli_feature5_seed0.png")
    text = runner.invoke(app, ["text", *common, "--unit", "5", "--vocab", str(_vocab(tmp_path)), "--top-k", "2"])
    assert text.exit_code == 0 and "feature 5 of SAE cli" in text.output and "512 features" in text.output
    out_of_range = runner.invoke(app, ["visualize", *common, "--unit", "512"])
    assert out_of_range.exit_code == 2 and "feature 512 is out of range" in out_of_range.output


def _vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("red\nblue\na cat\na dog\n")
    return path


def test_vit_patch_tokens_train_scan_and_report(tmp_path, tiny_vit, images):
    """A ViT layer's samples are its patch tokens (the class token left out); the reconstruction goes back in
    place of the patch tokens for the embedding cosine."""
    spec = resolve_layer(tiny_vit, "image_resblock_0")
    assert (spec.height, spec.width) == (4, 4)
    cache = Cache(tmp_path)
    result = run_sae_train(tiny_vit, spec.name, str(images), SaeTrainSettings(features="2x", k=4, epochs=2,
                                                                                 batch_size=64, held_out=0.2,
                                                                                 sparsity="topk"),
                           name="vit", cache=cache, workers=0)
    summary = result.summary()
    assert summary["features"] == 2 * spec.channels and summary["held_out_vectors"] == 4 * 16
    assert -1.0 <= summary["embedding_cosine"] <= 1.0 and summary["l0"] <= 4   # TopK: at most k per token
    basis = load_basis(tiny_vit, spec.name, "vit", cache=cache)
    scan = run_scan(tiny_vit, spec.name, str(images), top_k=3, workers=0, cache=cache, basis=basis)
    assert scan.channels == 2 * spec.channels and scan.top_cells.shape == (2 * spec.channels, 3, 2)
    assert hook_count(tiny_vit.model) == 0


def test_sweep_figure_and_grid_over_features(tiny_clip, images, trained, tmp_path):
    """The sweep's statistics of features are the brute-force AUCs of the features' per-image maxima against
    the labels; the record, flags.csv, the panels and the grid say which basis they hold; the blur policy reads
    the features' flags only for features."""
    import csv
    from neurolens.records.sweep import flagged_in_cache
    from neurolens.pipelines.figures import run_figure, run_grid
    from neurolens.pipelines.flags import flags_path
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.scoring.flags import FlagRule
    result, cache = trained
    basis = load_basis(tiny_clip, LAYER, "tiny", cache=cache)
    table = tmp_path / "data.csv"
    files = sorted(p.name for p in images.iterdir())
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(files):
            writer.writerow([str(images / name), "adult content" if i % 4 == 0 else "a photo of shapes"])
    rule = FlagRule(max_q=1.0, min_auc=0.75)
    vocab = str(_vocab(tmp_path))
    sweep = run_sweep(tiny_clip, LAYER, str(table), vocab=vocab, top_k=4, text_top_k=2, cache=cache,
                      labels=["captions"], detector=False, rule=rule, out=tmp_path / "flags", basis=basis)
    assert sweep.basis == basis.id and sweep.unit_word == "feature" and len(sweep.scores.auc) == 512
    labels = sweep.image_labels
    maxima = sweep.scan.per_image_max().astype(np.float64)
    positive = labels >= 0.5
    pos, neg = maxima[positive], maxima[~positive]
    brute = ((pos[:, None, :] > neg[None, :, :]).sum(axis=(0, 1)) +
             0.5 * (pos[:, None, :] == neg[None, :, :]).sum(axis=(0, 1))) / (len(pos) * len(neg))
    np.testing.assert_allclose(sweep.scores.auc, brute, atol=1e-9)
    assert cache.read(sweep.path).attrs["basis"] == basis.id
    assert "features of SAE tiny" in sweep.flags_csv.read_text().splitlines()[0]
    assert flags_path(LAYER, None, basis).as_posix().endswith(f"sweep/{LAYER}_sae-tiny/flags.csv")
    neurons = run_sweep(tiny_clip, LAYER, str(table), vocab=vocab, top_k=4, text_top_k=2, cache=cache,
                        labels=["captions"], detector=False, rule=rule, write_csv=False)
    assert neurons.basis == "neurons" and len(neurons.scores.auc) == 256 and neurons.path != sweep.path
    assert flagged_in_cache(cache, tiny_clip.fingerprint, LAYER, basis.id) == set(sweep.flagged_units)
    assert flagged_in_cache(cache, tiny_clip.fingerprint, LAYER) == set(neurons.flagged_units)

    top = [int(u) for u in sweep.scores.ranking()[:2]]
    written = run_figure(tiny_clip, LAYER, top[:1], str(table), vocab=vocab, top_k=4, text_top_k=2, cache=cache,
                         labels=["captions"], detector=False, rule=rule, out=tmp_path / "fig", fv=False, basis=basis)
    assert written[0][0].name == f"nl-tiny-RN_{LAYER}_sae-tiny_feature{top[0]}.png"
    path, _, shown = run_grid(tiny_clip, LAYER, top, dataset=str(table), vocab=vocab, top_k=4, text_top_k=2,
                              cache=cache, labels=["captions"], detector=False, rule=rule, out=tmp_path / "grid",
                              basis=basis)
    assert shown == top and path.name == f"nl-tiny-RN_{LAYER}_sae-tiny_grid_units2.png"


def test_a_registered_name_is_not_shadowed_by_a_folder_of_that_name(tiny_clip, trained, tmp_path, monkeypatch):
    from neurolens.sae.registry import locate
    result, cache = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    path, name, made_here = locate(tiny_clip, LAYER, "tiny", cache)
    assert made_here and name == "tiny" and path == result.path
    save_sae(random_sae(d_in=256, d_sae=8, k=2), tmp_path / "elsewhere")
    path, name, made_here = locate(tiny_clip, LAYER, "elsewhere", cache)     # not registered: the folder
    assert not made_here and name == "elsewhere" and path.resolve() == (tmp_path / "elsewhere").resolve()
