"""Model loading: random weights, checkpoints, offline failure, device handling."""
import time

import pytest
import torch

from neurolens.errors import NeurolensError, WeightsUnavailableError
from neurolens.models.build import load_clip
from neurolens.models.checkpoint import read_checkpoint, save_checkpoint


def test_random_weights_are_seeded_and_respond_to_input(tiny_clip):
    again = load_clip("nl-tiny-RN", "none", device="cpu")
    assert again.fingerprint == tiny_clip.fingerprint
    assert any("BatchNorm" in note for note in tiny_clip.notes)
    bn3 = [m.weight for n, m in tiny_clip.model.named_modules() if n.endswith("bn3") and "layer" in n]
    assert bn3 and all(torch.all(w != 0) for w in bn3)
    x = torch.rand(2, 3, 64, 64)
    out = tiny_clip.model.encode_image(tiny_clip.normalize(x))
    assert not torch.allclose(out[0], out[1])


def test_clip_normalization_is_openai_not_imagenet(tiny_clip):
    import open_clip
    assert tuple(tiny_clip.mean) == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(tiny_clip.std) == tuple(open_clip.OPENAI_DATASET_STD)


def test_offline_without_cached_weights_fails_fast_with_ways_out():
    start = time.time()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("RN50x4", "openai", device="cpu")
    assert time.time() - start < 5
    assert "--checkpoint" in str(info.value) and "--pretrained none" in str(info.value)


def test_unknown_model_and_tag_are_clear_errors():
    with pytest.raises(NeurolensError, match="unknown model"):
        load_clip("RN50x5", "none")
    with pytest.raises(NeurolensError, match="unknown pretrained tag"):
        load_clip("nl-tiny-RN", "laion2b")


def test_checkpoint_roundtrip_carries_config(tiny_clip, tmp_path):
    import json
    from pathlib import Path
    config = json.loads((Path(__file__).parent.parent / "neurolens/data/model_configs/nl-tiny-RN.json").read_text())
    path = save_checkpoint(tiny_clip.model, tmp_path / "toy.pt", "nl-checkpoint-test", model_config=config)
    state, meta = read_checkpoint(path)
    assert meta["model_name"] == "nl-checkpoint-test" and "visual.conv1.weight" in state
    loaded = load_clip(model="RN50x4", checkpoint=str(path), device="cpu")  # config in the file wins
    # registered under a neurolens-made name: the claimed name plus a hash of the config
    import re
    assert re.fullmatch(r"nl-checkpoint-test-cfg[0-9a-f]{12}", loaded.name), loaded.name
    assert loaded.image_size == 64
    assert loaded.fingerprint == tiny_clip.fingerprint


def test_safetensors_checkpoint(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    loaded = load_clip(model="nl-tiny-RN", checkpoint=str(path), device="cpu")
    assert loaded.fingerprint == tiny_clip.fingerprint


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(NeurolensError, match="does not exist"):
        load_clip("nl-tiny-RN", checkpoint=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NeurolensError, match="could not be read"):
        load_clip("nl-tiny-RN", checkpoint=str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, wrong)
    with pytest.raises(NeurolensError, match="does not fit"):
        load_clip("nl-tiny-RN", checkpoint=str(wrong))


def test_cuda_request_without_gpu_is_clear():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NeurolensError, match="no CUDA"):
        load_clip("nl-tiny-RN", "none", device="cuda")


def _fake_hub_cache(root, repo_id, files):
    """A Hugging Face cache folder holding `files` {name: bytes} for repo_id at one snapshot."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_pretrained_tag_loads_its_cached_file_with_the_tag_settings(tiny_clip, tmp_path, monkeypatch):
    """A tag's weights come from the hub cache through neurolens's reader (safetensors preferred), with the
    tag's QuickGELU and preprocessing applied to the network open_clip builds."""
    import io
    import huggingface_hub.constants
    import open_clip
    from safetensors.torch import save
    trained = {k: v + 0.01 if v.is_floating_point() else v for k, v in tiny_clip.model.state_dict().items()}
    bin_blob = io.BytesIO()
    torch.save({k: torch.zeros_like(v) for k, v in trained.items()}, bin_blob)  # must lose to the safetensors
    snapshot = _fake_hub_cache(tmp_path / "hub", "test-org/nl-tiny-weights", {
        "open_clip_model.safetensors": save({k: v.contiguous() for k, v in trained.items()}),
        "open_clip_pytorch_model.bin": bin_blob.getvalue()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tag = {"hf_hub": "test-org/nl-tiny-weights/", "quick_gelu": True, "interpolation": "bilinear",
           "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda model, tag_name: dict(tag) if (model, tag_name) == ("nl-tiny-RN", "test-tag")
                        else real(model, tag_name))
    loaded = load_clip("nl-tiny-RN", "test-tag", device="cpu")
    assert loaded.pretrained == "test-tag"
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)
    assert type(loaded.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    assert open_clip.get_model_preprocess_cfg(loaded.model)["interpolation"] == "bilinear"
    (snapshot / "open_clip_model.safetensors").unlink()       # only the .bin left: it is read instead
    zeros = load_clip("nl-tiny-RN", "test-tag", device="cpu")
    assert all(not v.is_floating_point() or not v.any() for v in zeros.model.state_dict().values()
               if v.numel())
